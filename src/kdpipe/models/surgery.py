"""Layer surgery for structured pruning: smaller layers built from chosen rows or columns
of a layer, and how many and which units to keep. The students' ``shrink`` methods compose
these (as transformers' ``prune_linear_layer`` serves its models' ``prune_heads``)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import skip_init


def kept_count(n: int, fraction: float) -> int:
    """How many of ``n`` units survive removing ``fraction`` of them (at least one)."""
    return max(1, round(n * (1 - fraction)))


def strongest(scores: Tensor, keep: int) -> Tensor:
    """Indices of the ``keep`` largest ``scores``, in increasing index order (so kept units
    keep their relative order)."""
    return scores.topk(keep).indices.sort().values


def filled(new: nn.Module, weight: Tensor, bias: Tensor | None) -> nn.Module:
    """``new`` (made with ``skip_init``) holding ``weight`` and ``bias``."""
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    return new


def linear_rows(linear: nn.Linear, rows: Tensor) -> nn.Linear:
    """A Linear computing only the output features ``rows`` of ``linear``."""
    new = skip_init(nn.Linear, linear.in_features, rows.numel(), bias=linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype)
    return filled(new, linear.weight[rows], None if linear.bias is None else linear.bias[rows])


def linear_columns(linear: nn.Linear, columns: Tensor) -> nn.Linear:
    """A Linear reading only the input features ``columns`` of ``linear`` (same outputs)."""
    new = skip_init(nn.Linear, columns.numel(), linear.out_features,
                    bias=linear.bias is not None, device=linear.weight.device,
                    dtype=linear.weight.dtype)
    return filled(new, linear.weight[:, columns], linear.bias)


def conv_rows(conv: nn.Conv1d, rows: Tensor) -> nn.Conv1d:
    """A Conv1d with only the output channels ``rows`` of ``conv`` (groups must be 1)."""
    new = skip_init(nn.Conv1d, conv.in_channels, rows.numel(), conv.kernel_size, conv.stride,
                    conv.padding, conv.dilation, bias=conv.bias is not None,
                    device=conv.weight.device, dtype=conv.weight.dtype)
    return filled(new, conv.weight[rows], None if conv.bias is None else conv.bias[rows])
