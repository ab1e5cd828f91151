"""Padding token id lists into batches (distill's batches, the Predictor's feeds)."""

from __future__ import annotations

import numpy as np
import torch

from kdpipe.serving.padding import pad_ids
from kdpipe.steps import distill

ROWS = [[5, 6, 7], [8], [9, 10]]


def test_pad_ids_right_pads_each_row_and_masks_its_real_tokens():
    ids, mask = pad_ids(ROWS, pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0]]
    assert mask.tolist() == [[True] * 3, [True, False, False], [True, True, False]]
    assert ids.dtype == np.int64


def test_pad_ids_pads_to_a_given_width():
    ids, mask = pad_ids(ROWS, pad_id=1, width=5)
    assert ids.tolist() == [[5, 6, 7, 1, 1], [8, 1, 1, 1, 1], [9, 10, 1, 1, 1]]
    assert mask.sum(1).tolist() == [3, 1, 2]


def test_distill_pad_gives_long_tensors():
    ids, mask = distill.pad(ROWS, pad_id=0)
    assert ids.dtype == mask.dtype == torch.long
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
