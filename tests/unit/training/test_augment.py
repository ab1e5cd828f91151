import random

import numpy as np
import pytest

from kdpipe.config import AugmentConfig
from kdpipe.training.augment import make_variants

MASK = "[MASK]"
TEXTS = [
    "the food was really very good and the service quite nice",
    "this phone is broken and the film was so dull but it is fine",
    "a great movie",
    "it was awful",
]


def settings(**kw) -> AugmentConfig:
    base = {"enabled": True, "variants": 4, "mask_prob": 0.0, "ngram_prob": 0.0,
            "ngram_max": 5, "word_order_noise": 0.0}
    return AugmentConfig(**(base | kw))


def test_long_texts_get_exactly_variants_each_grouped_by_source():
    cfg = settings(variants=3, mask_prob=0.5)
    texts = TEXTS[:2]  # 11 and 14 words: 3 distinct draws are all but certain
    variants, source = make_variants(texts, cfg, seed=0, mask_token=MASK)
    assert len(variants) == 3 * len(texts)
    assert source.dtype == np.int64
    np.testing.assert_array_equal(source, [0, 0, 0, 1, 1, 1])
    for i, text in enumerate(texts):
        mine = [v for v, s in zip(variants, source, strict=True) if s == i]
        assert len(set(mine)) == 3 and text not in mine


def test_same_seed_same_variants_whatever_the_global_random_state():
    cfg = settings(mask_prob=0.3, ngram_prob=0.5, word_order_noise=0.2)
    random.seed(1)
    np.random.seed(1)
    first = make_variants(TEXTS, cfg, seed=7, mask_token=MASK)
    random.seed(2)
    np.random.seed(2)
    np.random.random(10)
    second = make_variants(TEXTS, cfg, seed=7, mask_token=MASK)
    assert first[0] == second[0]
    np.testing.assert_array_equal(first[1], second[1])


def test_another_seed_gives_other_variants():
    cfg = settings(mask_prob=0.3, ngram_prob=0.5)
    a, _ = make_variants(TEXTS, cfg, seed=1, mask_token=MASK)
    b, _ = make_variants(TEXTS, cfg, seed=2, mask_token=MASK)
    assert a != b


def test_mask_prob_one_masks_every_word_and_keeps_one_variant_per_text():
    # Every draw is the same all-mask text, so the duplicates are dropped: one per source.
    variants, source = make_variants(TEXTS, settings(mask_prob=1.0), seed=0, mask_token=MASK)
    assert variants == [" ".join([MASK] * len(t.split())) for t in TEXTS]
    np.testing.assert_array_equal(source, [0, 1, 2, 3])


def test_ngram_sampling_keeps_a_contiguous_run_of_at_most_ngram_max_words():
    cfg = settings(variants=6, ngram_prob=1.0, ngram_max=3)
    variants, source = make_variants(TEXTS, cfg, seed=3, mask_token=MASK)
    assert variants
    lengths = set()
    for variant, i in zip(variants, source, strict=True):
        words, cut = TEXTS[i].split(), variant.split()
        lengths.add(len(cut))
        assert 1 <= len(cut) <= 3
        assert any(words[k : k + len(cut)] == cut for k in range(len(words)))
    assert lengths == {1, 2, 3}


def test_ngram_longer_than_the_text_is_clipped():
    # "it was awful": n in 1..10 clipped to 3 words; the 3-gram is the source (redrawn).
    variants, _ = make_variants(["it was awful"], settings(variants=10, ngram_prob=1.0,
                                                           ngram_max=10), 0, MASK)
    assert sorted(variants) == sorted(["it", "was", "awful", "it was", "was awful"])


def test_word_order_noise_permutes_words():
    cfg = settings(word_order_noise=1.0, variants=1)
    variants, _ = make_variants(["a b c d"], cfg, seed=0, mask_token=MASK)
    # Every pair swapped, left to right: a b c d -> b a c d -> b c a d -> b c d a
    assert variants == ["b c d a"]


def test_settings_that_change_nothing_give_no_variants():
    variants, source = make_variants(TEXTS, settings(), seed=0, mask_token=MASK)
    assert variants == [] and source.shape == (0,) and source.dtype == np.int64


def test_empty_text_has_no_variants_and_short_text_has_few():
    variants, source = make_variants(["", "   ", "good"], settings(mask_prob=0.5), 0, MASK)
    assert variants == [MASK]  # the only text "good" can become other than itself
    np.testing.assert_array_equal(source, [2])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_whitespace_only_differences_count_as_the_source(seed):
    # Masking nothing: the only draw is the source with single spaces, which is not new.
    variants, _ = make_variants(["good   movie\tit was"], settings(mask_prob=0.0), seed, MASK)
    assert variants == []
