"""Augmented transfer set after Tang et al. 2019, "Distilling task-specific knowledge from
BERT into simple neural networks": noisy variants of the training texts that the teacher
labels, so the student sees many more (text, soft label) pairs than there are gold labels.

Of the paper's three rules this keeps masking and n-gram sampling (its POS-guided word
swap needs a tagger) and adds optional adjacent-word-order noise.
"""

from __future__ import annotations

import numpy as np

from kdpipe.config import AugmentConfig

# A draw that repeats the source (or an earlier variant of it) is retried this many times
# before it is given up. Short texts often cannot make ``variants`` distinct variants (a
# one-word text has one: the mask), so giving up, not looping forever, is the contract.
MAX_DRAWS_PER_VARIANT = 10


def make_variants(texts: list[str], cfg: AugmentConfig, seed: int,
                  mask_token: str) -> tuple[list[str], np.ndarray]:
    """Make up to ``cfg.variants`` distinct noisy variants of every text.

    A text is split on whitespace into words. Each draw of a variant, in this order:

    1. masking: each word independently becomes ``mask_token`` with ``cfg.mask_prob``;
    2. n-gram sampling: with ``cfg.ngram_prob`` the variant is cut to a random contiguous
       n-gram, ``n`` uniform in ``1..cfg.ngram_max`` and clipped to the number of words,
       start uniform over the positions where it fits;
    3. word-order noise: left to right, each adjacent pair (i, i+1) is swapped with
       ``cfg.word_order_noise``.

    Words are joined by single spaces. A draw equal to the source (after the same
    whitespace normalisation) or to an earlier variant of the same source is redrawn, at
    most ``MAX_DRAWS_PER_VARIANT`` times per variant, and then dropped; a text with no
    words has no variants. So a source gets between 0 and ``cfg.variants`` variants:
    exactly ``cfg.variants`` unless the settings or the text cannot produce that many
    distinct ones (e.g. all probabilities 0 gives none, ``mask_prob=1`` with no n-gram
    sampling gives one per text).

    Returns ``(variant_texts, source_index)``: variants grouped by source in input order,
    and an int64 array with, for each variant, the index in ``texts`` it came from.
    Deterministic in ``(texts, cfg, seed, mask_token)``: it uses its own
    ``numpy.random.Generator`` seeded from ``seed`` and no global random state.
    """
    rng = np.random.default_rng(seed)
    variants: list[str] = []
    sources: list[int] = []
    for index, text in enumerate(texts):
        words = text.split()
        if not words:
            continue
        seen = {" ".join(words)}
        for _ in range(cfg.variants):
            for _ in range(MAX_DRAWS_PER_VARIANT):
                variant = " ".join(_noisy_words(words, cfg, rng, mask_token))
                if variant not in seen:
                    seen.add(variant)
                    variants.append(variant)
                    sources.append(index)
                    break
    return variants, np.asarray(sources, dtype=np.int64)


def _noisy_words(words: list[str], cfg: AugmentConfig, rng: np.random.Generator,
                 mask_token: str) -> list[str]:
    """One draw of the three noise rules over ``words`` (see ``make_variants``)."""
    masked = rng.random(len(words)) < cfg.mask_prob
    out = [mask_token if m else w for w, m in zip(words, masked, strict=True)]
    if rng.random() < cfg.ngram_prob:
        n = min(int(rng.integers(1, cfg.ngram_max + 1)), len(out))
        start = int(rng.integers(0, len(out) - n + 1))
        out = out[start : start + n]
    if cfg.word_order_noise > 0 and len(out) > 1:
        swaps = rng.random(len(out) - 1) < cfg.word_order_noise
        for i in np.flatnonzero(swaps):
            out[i], out[i + 1] = out[i + 1], out[i]
    return out
