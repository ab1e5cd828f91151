"""TextCNN student (Kim 2014): word embeddings, one convolution per filter width, max over
time, a linear classifier."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdpipe.config import StudentConfig
from kdpipe.models.base import Student, StudentOutput
from kdpipe.models.surgery import conv_rows, kept_count, linear_columns, strongest


class TextCNN(Student):
    """Embed → Conv1d per width (``num_filters`` each) → ReLU → max over the windows of the
    text → concat → dropout → Linear.

    ``forward(input_ids, attention_mask)``: both (B, L), right-padded (as BERT tokenizers
    pad), mask 1 for real tokens. Returns ``StudentOutput(logits (B, num_labels), features
    (B, feature_dim), None)`` with ``feature_dim = num_filters * len(filter_sizes)``. Extra
    padding does not change the output.
    """

    arch = "textcnn"

    @classmethod
    def from_record(cls, cfg: StudentConfig, record: dict[str, Any]) -> TextCNN:
        return cls(record["vocab_size"], cfg.embedding_dim, record["pad_id"],
                   cfg.textcnn.filter_sizes, cfg.textcnn.num_filters, record["num_labels"],
                   cfg.dropout)

    def __init__(self, vocab_size: int, embedding_dim: int, pad_id: int,
                 filter_sizes: Sequence[int], num_filters: int, num_labels: int,
                 dropout: float) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_dim, padding_idx=pad_id)
        self.convs = nn.ModuleList(nn.Conv1d(embedding_dim, num_filters, width)
                                   for width in filter_sizes)
        self.filter_sizes = tuple(filter_sizes)
        self.feature_dim = num_filters * len(self.filter_sizes)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(self.feature_dim, num_labels)
        # Set on the copy that is exported (``export_form``): ONNX Runtime quantizes a MatMul
        # to its fast int8 kernels, but its integer Conv is slower than its float one, so
        # the exported graph computes the same windows as one MatMul.
        self.windows_as_matmul = False

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> StudentOutput:
        mask = attention_mask.to(self.embedding.weight.dtype)
        # Zero padded positions whatever the pad row holds, so padding adds nothing to a window.
        embedded = self.embedding(input_ids) * mask.unsqueeze(-1)
        pool = self._pool_by_matmul if self.windows_as_matmul else self._pool_by_conv
        features = pool(embedded, attention_mask.sum(1))
        return StudentOutput(self.classifier(self.dropout(features)), features, None)

    def _pool_by_conv(self, embedded: Tensor, lengths: Tensor) -> Tensor:
        """Each width's Conv1d, ReLU, max over the windows kept: (B, feature_dim)."""
        # Always pad by widest - 1 zeros (no branch on the length, so it exports with a dynamic
        # length): every filter then has a window even on a text shorter than it.
        embedded = F.pad(embedded.transpose(1, 2), (0, max(self.filter_sizes) - 1))  # (B, E, L')
        pooled = []
        for width, conv in zip(self.filter_sizes, self.convs, strict=True):
            scores = F.relu(conv(embedded))  # (B, num_filters, windows)
            # Keep windows wholly inside the text; a text shorter than the filter keeps only its
            # first window (the text and zeros). So more padding never adds a window.
            keep = windows_kept(lengths, width).unsqueeze(1)
            windows = torch.arange(scores.shape[-1], device=scores.device).unsqueeze(0)
            valid = (windows < keep).unsqueeze(1)  # (B, 1, windows)
            pooled.append(scores.masked_fill(~valid, float("-inf")).amax(-1))
        return torch.cat(pooled, dim=1)

    def _pool_by_matmul(self, embedded: Tensor, lengths: Tensor) -> Tensor:
        """The pooled features of ``forward``'s convolutions, computed as one matrix
        product: each position's next ``widest`` embeddings side by side (B, L, widest * E)
        times every filter flattened and zero-filled to the widest width (widest * E, F).
        Only the first L windows can be kept (a kept window starts inside the text), so L
        windows per width are enough. The same numbers as the Conv1d path up to float
        summation order (checked by the export step's parity report and by the tests)."""
        widest = max(self.filter_sizes)
        length = embedded.shape[1]
        padded = F.pad(embedded, (0, 0, 0, widest - 1))  # (B, L + widest - 1, E)
        # One Gather of every window's positions: in ONNX Runtime it costs about a third of
        # ``widest`` Slices and a Concat (bench/ort_ops.py).
        positions = torch.arange(length, device=embedded.device)
        stacked = padded[:, positions.unsqueeze(1) + torch.arange(widest, device=embedded.device)
                         ].flatten(2)
        weight = torch.cat([
            F.pad(conv.weight, (0, widest - conv.kernel_size[0])).permute(0, 2, 1)
            .reshape(conv.out_channels, -1) for conv in self.convs])  # (F, widest * E)
        bias = torch.cat([conv.bias for conv in self.convs])
        scores = torch.matmul(stacked, weight.t()) + bias  # (B, L, F), before the ReLU
        keep = torch.stack([windows_kept(lengths, width) for width in self.filter_sizes], 1)
        valid = (positions.view(1, -1, 1) < keep.unsqueeze(1)).to(scores.dtype)  # (B, L, widths)
        # Zeroing the windows dropped and taking the ReLU after the max is exact: ReLU is
        # monotonic, and every text keeps a window, so a 0 wins the max only where the kept
        # maximum is negative, which the ReLU turns into 0 anyway. It spares the graph a
        # (B, L, F) mask and its -inf fill: one mask per width, broadcast over its filters.
        counts = [conv.out_channels for conv in self.convs]
        if len(set(counts)) == 1:
            scores = scores.unflatten(-1, (len(counts), counts[0])) * valid.unsqueeze(-1)
            return F.relu(scores.amax(1).flatten(1))
        width_of_filter = torch.repeat_interleave(
            torch.arange(len(counts), device=scores.device),
            torch.tensor(counts, device=scores.device))
        return F.relu((scores * valid[..., width_of_filter]).amax(1))

    def shrink(self, fraction: float) -> None:
        """Keep the strongest filters, the same count per width (self.json has one
        ``num_filters``)."""
        n = self.convs[0].out_channels
        keep = kept_count(n, fraction)
        columns = []
        for i, conv in enumerate(self.convs):
            rows = strongest(conv.weight.detach().abs().sum(dim=(1, 2)), keep)
            self.convs[i] = conv_rows(conv, rows)
            columns.append(i * n + rows)  # features are the widths' pooled filters, concatenated
        self.classifier = linear_columns(self.classifier, torch.cat(columns))
        self.feature_dim = keep * len(self.convs)
        self.student_record["student"]["textcnn"]["num_filters"] = keep

    def sizes(self) -> dict[str, Any]:
        return {"filter_sizes": list(self.filter_sizes),
                "num_filters": self.convs[0].out_channels}

    @contextlib.contextmanager
    def export_form(self) -> Iterator[None]:
        """The convolutions as one MatMul (``_pool_by_matmul``)."""
        before, self.windows_as_matmul = self.windows_as_matmul, True
        try:
            yield
        finally:
            self.windows_as_matmul = before


def windows_kept(lengths: Tensor, width: int) -> Tensor:
    """Windows of ``width`` tokens wholly inside each text; 1 for a text shorter than the
    filter (its first window: the text and zeros)."""
    return (lengths - width + 1).clamp(min=1)
