"""Latency and throughput of a model's call on a fixed batch of texts.

Every model is timed on the same texts: the first ``b`` of the evaluated split (repeated
when the split has fewer), at each batch size ``b``. A timed call is what a user's call
costs: tokenization plus the forward pass (``logits``); tokenization is also timed alone
(``tokenize``), so the share it takes is visible. Untimed warm-up calls come first (first
calls allocate and, in ONNX Runtime, finish planning); the garbage collector is off while
timing so that a collection does not land inside one model's calls.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from kdpipe.evaluation.models import ModelUnderTest


def batch_of(texts: Sequence[str], size: int) -> list[str]:
    """The first ``size`` texts, cycling through ``texts`` when it has fewer."""
    if not texts:
        raise ValueError("batch_of: no texts")
    return [texts[i % len(texts)] for i in range(size)]


def time_calls(call: Callable[[], Any], warmup: int, repeats: int,
               advance: Callable[[], None] | None = None) -> np.ndarray:
    """Seconds of each of ``repeats`` timed calls of ``call``, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        call()
        if advance is not None:
            advance()
    times = np.empty(repeats)
    enabled = gc.isenabled()
    gc.disable()
    try:
        for i in range(repeats):
            start = time.perf_counter()
            call()
            times[i] = time.perf_counter() - start
            if advance is not None:
                advance()
    finally:
        if enabled:
            gc.enable()
    return times


def percentiles_ms(seconds: np.ndarray) -> dict[str, float]:
    """``{"p50", "p95"}`` of ``seconds``, in milliseconds."""
    return {"p50": float(np.percentile(seconds, 50) * 1000),
            "p95": float(np.percentile(seconds, 95) * 1000)}


def measure(model: ModelUnderTest, texts: Sequence[str], batch_sizes: Sequence[int],
            warmup: int, repeats: int,
            advance: Callable[[], None] | None = None) -> dict[str, dict[str, Any]]:
    """For each batch size b (key ``"b{b}"``): ``latency_ms`` (p50/p95 of ``logits``,
    tokenization included), ``tokenize_ms`` (p50/p95 of ``tokenize`` alone) and
    ``throughput`` (texts per second over the timed ``logits`` calls: b x calls / their
    total time)."""
    out: dict[str, dict[str, Any]] = {"latency_ms": {}, "tokenize_ms": {}, "throughput": {}}
    for size in batch_sizes:
        batch = batch_of(texts, size)
        key = f"b{size}"
        full = time_calls(lambda b=batch: model.logits(b), warmup, repeats, advance)
        alone = time_calls(lambda b=batch: model.tokenize(b), warmup, repeats, advance)
        out["latency_ms"][key] = percentiles_ms(full)
        out["tokenize_ms"][key] = percentiles_ms(alone)
        out["throughput"][key] = float(size * len(full) / full.sum())
    return out


def calls_per_model(batch_sizes: Sequence[int], warmup: int, repeats: int) -> int:
    """How many calls ``measure`` makes (for a progress bar's total)."""
    return 2 * len(batch_sizes) * (warmup + repeats)
