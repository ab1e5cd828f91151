"""export: turn a student into a self-contained ONNX folder, checked against PyTorch.

Reads ``model_dir`` (a student with its tokenizer: a distill output, or a prune output,
whose module maps the tokenizer's ids through its ``vocab_remap`` buffer first) and
``prepared_dir`` (labels.json, validation.parquet). Writes ``out_dir`` atomically:

- ``model.onnx``: inputs ``input_ids``, ``attention_mask`` (int64, batch x sequence, both
  dynamic), output ``logits`` (batch x labels, float32); traced with the TorchScript
  exporter at ``export.opset`` (above 20, its limit, at 20 and converted with
  ``onnx.version_converter``), checked with ``onnx.checker``, then optimised by ONNX
  Runtime at ``export.optimize`` and saved as one file (weights inside). The default,
  ``basic``, keeps standard ONNX operators (constant folding, redundant nodes removed): the
  file stays quantizable and TensorRT-readable, and ONNX Runtime still applies its fusions
  when a session loads it. ``extended``/``all`` save ONNX Runtime's own fused operators
  (e.g. ``FusedConv``), which the quantizer leaves in float and only ONNX Runtime runs.
  A TextCNN is traced with its convolutions as one MatMul over stacked windows
  (``TextCNN.windows_as_matmul``; the folded weight is an initializer), so the quantize
  step's int8 MatMul kernels apply to them;
- the tokenizer files, ``labels.json``;
- ``export.json``: how the file was made (opset, optimisation, max_length, size, versions),
  the parity report, and the TensorRT status;
- ``bag.safetensors``, for the fast student only: its tables, which the Predictor serves with
  numpy (``kdpipe.serving.bag_numpy``; its parity is checked too, ``numpy_parity``);
- ``model.plan``: a TensorRT engine, only where TensorRT and a CUDA GPU exist and
  ``export.tensorrt`` is on.

Parity: every validation text goes through the exported folder exactly as a user's would
(``kdpipe.serving.predictor.Predictor``: its tokenizer, batches and session) and the same
token arrays through the PyTorch student. A max |logit difference| above
``export.parity_tolerance`` is a ``KdpipeError`` and nothing is written.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kdpipe.atomic import atomic_dir, write_json
from kdpipe.compression.onnx_export import (
    TORCHSCRIPT_MAX_OPSET,
    check_parity,
    example_inputs,
    export_onnx,
    parity_report,
    tensorrt_unavailable,
    torch_logits,
)
from kdpipe.config import Config
from kdpipe.data.prepare import read_labels, read_split
from kdpipe.errors import KdpipeError
from kdpipe.models.students import student_record
from kdpipe.serving.ort import save_optimized
from kdpipe.serving.predictor import BATCH_SIZE, MODEL_FILE, RECORD_FILE, Predictor, load_tokenizer
from kdpipe.step_result import StepResult

PLAN_FILE = "model.plan"
RECORD_FORMAT = 1


def run(cfg: Config, model_dir: Path, prepared_dir: Path, out_dir: Path) -> StepResult:
    """Export the student in ``model_dir`` to ``out_dir`` (see the module docstring).

    Metrics: ``onnx_bytes``, ``parity_max_abs_diff``, ``parity_label_agreement`` (share of
    validation texts whose argmax label matches), ``export_seconds``; with a TensorRT
    engine also ``tensorrt_latency_ms_p50``.
    """
    start = time.perf_counter()
    model_dir, prepared_dir, out_dir = Path(model_dir), Path(prepared_dir), Path(out_dir)
    model = load_model(model_dir)
    tokenizer = load_tokenizer(model_dir)  # distill saves the teacher's beside the student
    labels, texts = _read_prepared(prepared_dir)
    num_labels = student_record(model)["num_labels"]
    if num_labels != len(labels):
        raise KdpipeError(f"{model_dir} predicts {num_labels} labels but "
                          f"{prepared_dir / 'labels.json'} names {len(labels)}")
    e = cfg.export
    with atomic_dir(out_dir) as tmp, tempfile.TemporaryDirectory(prefix="kdpipe-export-") as s:
        raw = Path(s) / "exported.onnx"  # plain ONNX operators: what TensorRT parses
        export_onnx(model, example_inputs(tokenizer, texts), raw, e.opset)
        save_optimized(raw, tmp / MODEL_FILE, e.optimize)
        tokenizer.save_pretrained(tmp)
        shutil.copyfile(prepared_dir / "labels.json", tmp / "labels.json")
        record = export_record(cfg, model, model_dir, tmp / MODEL_FILE)
        write_json(tmp / RECORD_FILE, record)  # the Predictor reads max_length from it
        # Parity through the folder as a user will load it: its tokenizer, batches, session.
        predictor = Predictor(tmp)
        feeds = list(predictor.encode(texts))
        reference = torch_logits(model, feeds)
        exported = np.concatenate([predictor.run(f) for f in feeds])
        record["parity"] = parity_report(reference, exported, e.parity_tolerance)
        check_parity(record["parity"], "ONNX Runtime", model_dir)
        if record["arch"] == "fast":
            record["numpy_parity"] = numpy_tables(model, predictor, reference, texts,
                                                  e.parity_tolerance)
            check_parity(record["numpy_parity"], "numpy", model_dir)
        record["tensorrt"], engine = tensorrt_engine(cfg, raw, tmp / PLAN_FILE, feeds,
                                                     reference)
        if engine is not None:
            check_parity(engine["parity"], f"TensorRT ({engine['precision']})", model_dir)
            record["tensorrt_engine"] = engine
        record["seconds"] = round(time.perf_counter() - start, 2)
        write_json(tmp / RECORD_FILE, record)
    parity = record["parity"]
    metrics = {"onnx_bytes": float(record["onnx_bytes"]),
               "parity_max_abs_diff": parity["max_abs_diff"],
               "parity_label_agreement": parity["label_agreement"],
               "export_seconds": time.perf_counter() - start}
    if engine is not None:
        metrics["tensorrt_latency_ms_p50"] = engine["latency_ms_p50"]
    summary = (f"{record['arch']}: {record['onnx_bytes'] / 1e6:.2f} MB ONNX (opset {e.opset}, "
               f"{e.optimize}), max |Δlogit| {parity['max_abs_diff']:.1e}, label agreement "
               f"{parity['label_agreement']:.1%} on {parity['rows']} validation texts; "
               f"TensorRT {record['tensorrt']}")
    return StepResult("export", out_dir, metrics, [out_dir / RECORD_FILE], summary)


def numpy_tables(model: nn.Module, predictor: Predictor, reference: np.ndarray,
                 texts: list[str], tolerance: float) -> dict[str, Any]:
    """Write the fast student's tables for numpy serving (``kdpipe.serving.bag_numpy``) into
    the predictor's folder and report their parity: the texts through the predictor, which
    then serves them with numpy, against ``reference`` (PyTorch's logits, in text order)."""
    from safetensors.numpy import save_file

    from kdpipe.models.bag import serving_tables
    from kdpipe.serving.bag_numpy import BAG_FILE

    # C order: safetensors' numpy writer stores an array's bytes as they lie, so a
    # Fortran-ordered table would read back transposed.
    tables = {name: np.ascontiguousarray(table) for name, table in serving_tables(model).items()}
    save_file(tables, str(predictor.folder / BAG_FILE), metadata={"format": "np"})
    if predictor.load_bag() is None:
        raise KdpipeError(f"{predictor.folder}: its tokenizer has no fast backend, so the "
                          "fast student cannot be served by numpy")
    return parity_report(reference, predictor.logits(texts), tolerance)


def load_model(model_dir: Path) -> nn.Module:
    """The module of a distill or prune output folder, in eval mode, reading the tokenizer's
    own ids."""
    from kdpipe.compression.pruning import load_for_inference

    return load_for_inference(model_dir)


def _read_prepared(prepared_dir: Path) -> tuple[list[str], list[str]]:
    """Label names and validation texts."""
    for name in ("labels.json", "validation.parquet"):
        if not (prepared_dir / name).is_file():
            raise KdpipeError(f"{prepared_dir / name}: not found; run `kdpipe ingest` first")
    texts = read_split(prepared_dir / "validation.parquet").texts
    if not texts:
        raise KdpipeError(f"{prepared_dir / 'validation.parquet'}: no rows to check the "
                          "export's parity on")
    return read_labels(prepared_dir), list(texts)


def export_record(cfg: Config, model: nn.Module, model_dir: Path, onnx_path: Path) -> dict:
    import onnx
    import onnxruntime

    student = student_record(model)
    return {"format": RECORD_FORMAT, "source": str(model_dir), "arch": student["arch"],
            "module": type(model).__name__, "num_labels": student["num_labels"],
            "opset": cfg.export.opset,
            "traced_at_opset": min(cfg.export.opset, TORCHSCRIPT_MAX_OPSET),
            "optimize": cfg.export.optimize,
            "max_length": cfg.ingest.max_length, "onnx_bytes": onnx_path.stat().st_size,
            "inputs": ["input_ids", "attention_mask"], "outputs": ["logits"],
            "versions": {"torch": torch.__version__, "onnx": onnx.__version__,
                         "onnxruntime": onnxruntime.__version__}}


def tensorrt_engine(cfg: Config, onnx_path: Path, plan_path: Path,
                    feeds: list[dict[str, np.ndarray]],
                    reference: np.ndarray) -> tuple[str, dict[str, Any] | None]:
    """Build and check a TensorRT engine where one can be built: (status, engine record).

    The status is ``"built"`` or ``"skipped: <why>"``. The engine's logits are compared
    with PyTorch's like the ONNX file's (the report's ``passed`` says whether the tolerance
    holds); at fp16/int8 no tolerance applies and the difference is only reported, as it is
    expected to exceed an fp32 tolerance.
    """
    if not cfg.export.tensorrt:
        return "skipped: export.tensorrt is false", None
    reason = tensorrt_unavailable()
    if reason is not None:
        return f"skipped: {reason}", None
    from kdpipe.compression.onnx_export import build_tensorrt_engine

    precision = cfg.export.tensorrt_precision
    logits, engine = build_tensorrt_engine(onnx_path, plan_path, precision, feeds,
                                           cfg.ingest.max_length, BATCH_SIZE)
    tolerance = cfg.export.parity_tolerance if precision == "fp32" else None
    engine["file"] = PLAN_FILE
    engine["parity"] = parity_report(reference, logits, tolerance)
    return "built", engine
