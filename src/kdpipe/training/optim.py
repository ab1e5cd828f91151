"""The optimizer every training loop of kdpipe uses: torch's AdamW, fused where it can be.

Fused AdamW updates every tensor in one kernel instead of a Python loop of small ops per
tensor; it is the same update rule (``docs/decisions.md#fused-adamw``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

FUSED_DEVICES = ("cpu", "cuda")


def adamw(params: Iterable[Any], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over ``params`` (tensors or parameter groups), fused when every tensor is a
    floating-point tensor on a device fused AdamW supports."""
    groups = list(params)
    tensors = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    fused = bool(tensors) and all(p.device.type in FUSED_DEVICES and p.is_floating_point()
                                  for p in tensors)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, fused=fused or None)
