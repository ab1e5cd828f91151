"""The fast student served by numpy: ``bag.safetensors`` in an exported folder.

Why numpy beside the ONNX graph: the fast student (``kdpipe.models.bag``) is two table
lookups, a mean and two small matrix products. ONNX Runtime runs its graph as some twenty
kernels, and at batch 1 their fixed cost is most of the call; numpy does the same work in a
handful of calls and reads the texts unpadded
(``docs/decisions.md#the-fast-student-served-by-numpy``).
The export step writes the tables and checks this path's parity with PyTorch, as it does the
graph's; ``model.onnx`` stays for every other runtime (TensorRT, ONNX Runtime elsewhere).

``bag.safetensors`` holds float32 arrays:

- ``words`` (tokenizer vocabulary, E): the row each tokenizer id reads, a pruned vocabulary's
  renumbering and low-rank rows already applied;
- ``bigrams`` (buckets, E), absent without bigrams;
- ``hidden.weight`` (H, E), ``hidden.bias`` (H), absent without a hidden layer;
- ``classifier.weight`` (C, H or E), ``classifier.bias`` (C).

Serving must not import torch, so the hash constant is repeated here (checked equal to
``kdpipe.models.bag.BIGRAM_PRIME`` by the tests).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain
from pathlib import Path

import numpy as np

from kdpipe.errors import KdpipeError

BAG_FILE = "bag.safetensors"
BIGRAM_PRIME = 1_000_003
REQUIRED = ("words", "classifier.weight", "classifier.bias")


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
        if missing:
            raise KdpipeError(f"{path}: has no {', '.join(missing)}; re-run `kdpipe export`")
        self.words = tables["words"]
        self.bigrams = tables.get("bigrams")
        # Transposed once here, so each call is a plain (n, E) @ (E, H) product.
        hidden = tables.get("hidden.weight")
        self.hidden = None if hidden is None else (np.ascontiguousarray(hidden.T),
                                                   tables["hidden.bias"])
        self.classifier = (np.ascontiguousarray(tables["classifier.weight"].T),
                           tables["classifier.bias"])
        self.num_labels = self.classifier[1].shape[0]
        self.vocab_size = self.words.shape[0]

    def logits(self, rows: Sequence[Sequence[int]]) -> np.ndarray:
        if not rows:
            return np.zeros((0, self.num_labels), np.float32)
        lengths = np.fromiter(map(len, rows), np.int64, len(rows))
        if lengths.min() < 1:
            raise KdpipeError("the fast student needs at least one token per text")
        ids = np.fromiter(chain.from_iterable(rows), np.int64, int(lengths.sum()))
        if len(rows) == 1:  # one text: plain sums, no segment bookkeeping
            total = self.words[ids].sum(0, keepdims=True)
            count = lengths.astype(np.float32)
            if self.bigrams is not None and len(ids) > 1:
                total += self.bigrams[self._buckets(ids)].sum(0)
                count += len(ids) - 1
        else:
            starts = np.cumsum(lengths) - lengths
            total = np.add.reduceat(self.words[ids], starts, axis=0)
            count = lengths.astype(np.float32)
            if self.bigrams is not None:
                total, count = self._add_bigrams(ids, lengths, starts, total, count)
        pooled = total / count[:, None]
        if self.hidden is not None:
            pooled = np.maximum(pooled @ self.hidden[0] + self.hidden[1], 0)
        return (pooled @ self.classifier[0] + self.classifier[1]).astype(np.float32, copy=False)

    def _buckets(self, ids: np.ndarray) -> np.ndarray:
        return (ids[:-1] * BIGRAM_PRIME + ids[1:]) % self.bigrams.shape[0]

    def _add_bigrams(self, ids: np.ndarray, lengths: np.ndarray, starts: np.ndarray,
                     total: np.ndarray, count: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each text's bigram rows added to its sum: pairs of adjacent ids, less those that
        straddle two texts."""
        pairs = lengths - 1
        keep = np.ones(len(ids) - 1, bool)
        keep[(starts + lengths)[:-1] - 1] = False  # the last id of a text and the next's first
        rows = self.bigrams[self._buckets(ids)[keep]]
        has = pairs > 0
        if has.any():
            # reduceat on the texts that have pairs only: it cannot sum an empty segment.
            pair_starts = (np.cumsum(pairs) - pairs)[has]
            total[has] += np.add.reduceat(rows, pair_starts, axis=0)
        return total, count + pairs
