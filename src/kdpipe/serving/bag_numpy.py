"""The fast student served by numpy: ``bag.safetensors`` in an exported folder.

Why numpy beside the ONNX graph: the fast student (``kdpipe.models.bag``) is two table
lookups, a mean and two small matrix products. ONNX Runtime runs its graph as some twenty
kernels, and at batch 1 their fixed cost is most of the call; numpy does the same work in a
handful of calls (``docs/decisions.md#the-fast-student-served-by-numpy``).
The export step writes the tables and checks this path's parity with PyTorch, as it does the
graph's; ``model.onnx`` stays for every other runtime (TensorRT, ONNX Runtime elsewhere).

``bag.safetensors`` holds float32 arrays, the first layer after the mean folded into the
tables (``kdpipe.models.bag.serving_tables``):

- ``words`` (tokenizer vocabulary, D): the row each tokenizer id reads, a pruned vocabulary's
  renumbering and low-rank rows applied, times the first layer's weight;
- ``bigrams`` (buckets, D), likewise; absent without bigrams;
- with a hidden layer (D = its units): ``hidden.bias``, ``classifier.weight`` (C, D) and
  ``classifier.bias``; without one (D = C, the labels): ``classifier.bias``.

Every product is numpy's own (``einsum``), not BLAS: OpenBLAS runs a product of this size
on every core, and its threads, asleep between calls and waking on a busy machine, turned a
0.5 ms call into tens of ms under load. One thread, as the Predictor's ``threads=1`` says.

Serving must not import torch, so the hash constant is repeated here (checked equal to
``kdpipe.models.bag.BIGRAM_PRIME`` by the tests).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from kdpipe.errors import KdpipeError
from kdpipe.serving.padding import pad_ids

BAG_FILE = "bag.safetensors"
BIGRAM_PRIME = 1_000_003
REQUIRED = ("words", "classifier.bias")


class BagSession:
    """``logits(rows)``: the fast student's logits (n, C) float32 for unpadded token id
    lists (each text's ids as the tokenizer gives them, special tokens included)."""

    def __init__(self, path: Path) -> None:
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            tables = load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise KdpipeError(f"{path}: cannot read the fast student's tables: {exc}") from None
        missing = [name for name in REQUIRED if name not in tables]
        if "hidden.bias" in tables and "classifier.weight" not in tables:
            missing.append("classifier.weight")
        if missing:
            raise KdpipeError(f"{path}: has no {', '.join(missing)}; re-run `kdpipe export`")
        # One table, words then bigram buckets (``words`` and ``bigrams`` are views into
        # it): a text's rows are then one gather and one sum, not two.
        words, bigrams = tables["words"], tables.get("bigrams")
        self.table = words if bigrams is None else np.concatenate((words, bigrams))
        self.vocab_size = words.shape[0]
        self.words = self.table[: self.vocab_size]
        self.bigrams = None if bigrams is None else self.table[self.vocab_size:]
        self.hidden_bias = tables.get("hidden.bias")
        self.classifier = tables.get("classifier.weight")
        self.bias = tables["classifier.bias"]
        self.num_labels = self.bias.shape[0]

    def logits(self, rows: Sequence[Sequence[int]]) -> np.ndarray:
        if not rows:
            return np.zeros((0, self.num_labels), np.float32)
        if len(rows) == 1:  # one text: no padding, a plain mean
            ids, weights = np.asarray(rows[0], np.int64)[None], None
            if ids.shape[1] == 0:
                raise KdpipeError("the fast student needs at least one token per text")
        else:
            # Padded to the longest (id 0, masked out): a (B, L, D) gather summed against the
            # mask is some three times faster than np.add.reduceat over the unpadded rows,
            # whose cost is per row.
            ids, mask = pad_ids(rows, 0)
            if mask.shape[1] == 0 or not mask[:, 0].all():
                raise KdpipeError("the fast student needs at least one token per text")
            weights = mask.astype(np.float32)
        if self.bigrams is not None and ids.shape[1] > 1:
            buckets = ((ids[:, :-1] * BIGRAM_PRIME + ids[:, 1:]) % self.bigrams.shape[0]
                       + self.vocab_size)
            ids = np.concatenate((ids, buckets), axis=1)
            if weights is not None:
                weights = np.concatenate((weights, weights[:, :-1] * weights[:, 1:]), axis=1)
        if weights is None:
            out = self.table[ids].mean(1)
        else:
            out = (np.einsum("bl,bld->bd", weights, self.table[ids])
                   / weights.sum(1, keepdims=True))
        if self.hidden_bias is not None:
            hidden = np.maximum(out + self.hidden_bias, 0)
            # One row: a matrix-vector product, which OpenBLAS keeps on one thread at this
            # size; more rows: einsum (see the module docstring).
            out = (hidden @ self.classifier.T if len(hidden) == 1
                   else np.einsum("bd,cd->bc", hidden, self.classifier))
        return (out + self.bias).astype(np.float32, copy=False)
