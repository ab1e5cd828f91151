"""ONNX Runtime sessions, without PyTorch.

Serving (``kdpipe.serving.predictor``, the MLflow pyfunc model) needs only this module, numpy and a
tokenizer: importing it must never pull in torch, which costs seconds and gigabytes in a
serving image. ``kdpipe.compression.onnx_export`` (the PyTorch side) re-exports these names.

- ``import_onnxruntime()``: onnxruntime with its telemetry switched off;
- ``ort_session``: a CPU ``InferenceSession`` at a graph optimisation level;
- ``save_optimized``: a file with ONNX Runtime's graph optimisation saved into it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdpipe.errors import KdpipeError

# params.yaml export.optimize -> onnxruntime.GraphOptimizationLevel member
ORT_LEVELS = {"none": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
              "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


def import_onnxruntime() -> Any:
    """onnxruntime, with its telemetry switched off (it has no environment switch)."""
    import onnxruntime

    from kdpipe.telemetry import disable_onnxruntime_telemetry

    disable_onnxruntime_telemetry()
    return onnxruntime


def ort_session(path: Path, threads: int | None = None, optimize: str = "all",
                optimized_path: Path | None = None) -> Any:
    """A CPU ``InferenceSession`` on ``path``; ``threads`` intra-op threads (None: ORT's
    default, one per core). With ``optimized_path`` the graph, optimised at ``optimize``
    (a key of ``ORT_LEVELS``), is also written there, as one self-contained file."""
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, ORT_LEVELS[optimize])
    options.log_severity_level = 3  # errors only; ORT warns about every unused initializer
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
        raise KdpipeError(f"{path}: ONNX Runtime cannot load it: {first_line(exc)}") from None


def save_optimized(source: Path, target: Path, optimize: str) -> None:
    """Write ``source`` optimised by ONNX Runtime at level ``optimize`` to ``target``, with
    every weight inside the file (no external data)."""
    import shutil

    import onnx
    from onnx.external_data_helper import uses_external_data

    if optimize == "none":
        shutil.copyfile(source, target)
    else:
        ort_session(source, threads=1, optimize=optimize, optimized_path=target)
    graph = onnx.load(str(target), load_external_data=False).graph
    if any(uses_external_data(t) for t in graph.initializer):
        raise KdpipeError(f"{target}: ONNX Runtime wrote weights to an external file; "
                          "this model is too large for a single-file export")


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
