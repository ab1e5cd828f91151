"""Training batches of similar-length texts, still shuffled across an epoch.

Sorting within random buckets keeps dynamic padding small (``kdpipe.serving.padding``
pads each batch to its longest text) without ordering an epoch by length.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def bucketed_batches(lengths: Sequence[int], batch_size: int, rng: np.random.Generator,
                     bucket_size: int = 50) -> list[np.ndarray]:
    """Shuffled index batches of similar length (for training).

    Shuffle, cut into buckets of ``bucket_size * batch_size``, sort each bucket by length,
    cut it into batches, then shuffle the batches. Every index appears exactly once.
    """
    lengths = np.asarray(lengths)
    order = rng.permutation(len(lengths))
    span = batch_size * bucket_size
    batches = []
    for start in range(0, len(order), span):
        bucket = order[start : start + span]
        bucket = bucket[np.argsort(lengths[bucket], kind="stable")]
        batches.extend(bucket[i : i + batch_size] for i in range(0, len(bucket), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]
