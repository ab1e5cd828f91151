"""The teacher as ONNX (fp32) and int8: the baseline a student has to beat on a CPU.

``export_teacher`` writes an exported folder that ``kdpipe.serving.predictor.Predictor`` reads, the
way ``kdpipe.steps.export`` does for a student: ``model.onnx`` traced at ``export.opset``
and optimised at ``export.optimize``, the tokenizer files, ``labels.json`` and
``export.json`` (how it was made and a parity report against the PyTorch teacher; above
``export.parity_tolerance`` it is a ``KdpipeError``). ``quantize_teacher`` copies that
folder and replaces ``model.onnx`` with its int8 version, recorded in ``quantize.json``.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from kdpipe.atomic import write_json
from kdpipe.config import Config
from kdpipe.serving.predictor import LABELS_FILE, MODEL_FILE, RECORD_FILE, Predictor

RECORD_FORMAT = 1
QUANTIZE_FILE = "quantize.json"
PARITY_ROWS = 128  # texts compared with PyTorch: enough to catch a wrong graph, cheap for BERT
INT8_METHODS = ("ort_dynamic", "ort_static")


def export_teacher(cfg: Config, teacher_dir: Path, module: Any, tokenizer: Any,
                   texts: list[str], labels_path: Path, out: Path, threads: int) -> dict:
    """Export the Hugging Face classifier ``module`` (loaded from ``teacher_dir``) into the
    new folder ``out``; ``texts`` (the first ``PARITY_ROWS`` of them) check it. Returns the
    record written to export.json."""
    import onnx
    import onnxruntime
    import torch

    from kdpipe.compression.onnx_export import (
        TORCHSCRIPT_MAX_OPSET,
        check_parity,
        example_inputs,
        export_onnx,
        parity_report,
        torch_logits,
    )
    from kdpipe.serving.ort import save_optimized

    e = cfg.export
    out.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="kdpipe-teacher-onnx-") as scratch:
        raw = Path(scratch) / "exported.onnx"
        export_onnx(module, example_inputs(tokenizer, texts), raw, e.opset)
        save_optimized(raw, out / MODEL_FILE, e.optimize)
    tokenizer.save_pretrained(out)
    shutil.copyfile(labels_path, out / LABELS_FILE)
    record: dict[str, Any] = {
        "format": RECORD_FORMAT, "source": str(teacher_dir), "arch": "teacher",
        "model_type": getattr(module.config, "model_type", None),
        "module": type(module).__name__, "num_labels": int(module.config.num_labels),
        "opset": e.opset, "traced_at_opset": min(e.opset, TORCHSCRIPT_MAX_OPSET),
        "optimize": e.optimize, "max_length": cfg.ingest.max_length,
        "onnx_bytes": (out / MODEL_FILE).stat().st_size,
        "inputs": ["input_ids", "attention_mask"], "outputs": ["logits"],
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__,
                     "onnxruntime": onnxruntime.__version__}}
    write_json(out / RECORD_FILE, record)  # the Predictor reads max_length from it
    predictor = Predictor(out, threads=threads)
    feeds = list(predictor.encode(texts[:PARITY_ROWS]))
    exported = np.concatenate([predictor.run(f) for f in feeds])
    record["parity"] = parity_report(torch_logits(module, feeds), exported, e.parity_tolerance)
    check_parity(record["parity"], "ONNX Runtime", teacher_dir)
    write_json(out / RECORD_FILE, record)
    return record


def quantize_teacher(cfg: Config, onnx_dir: Path, prepared_dir: Path, out: Path,
                     source: Path | None = None) -> dict:
    """Copy the exported teacher ``onnx_dir`` into the new folder ``out`` with an int8
    ``model.onnx``: by ``quantize.method`` when that is an int8 method (ort_dynamic,
    ort_static), else by ort_dynamic (this model is the int8 baseline whatever the student
    got). ``source``: the path to record (where ``onnx_dir`` will end up). Returns the record
    written to quantize.json."""
    from kdpipe.compression.ort_quantize import quantize_model

    method = cfg.quantize.method if cfg.quantize.method in INT8_METHODS else "ort_dynamic"
    q_cfg = cfg.model_copy(update={"quantize": cfg.quantize.model_copy(
        update={"method": method})})
    shutil.copytree(onnx_dir, out)
    with tempfile.TemporaryDirectory(prefix="kdpipe-teacher-int8-") as scratch:
        quantized = Path(scratch) / "quantized.onnx"
        details = quantize_model(q_cfg.quantize, onnx_dir / MODEL_FILE, quantized, onnx_dir,
                                 prepared_dir, Path(scratch))
        shutil.copyfile(quantized, out / MODEL_FILE)
    record = {"format": RECORD_FORMAT, "source": str(source or onnx_dir), "method": method,
              "configured_method": cfg.quantize.method, **details,
              "sizes": {"fp32_bytes": (onnx_dir / MODEL_FILE).stat().st_size,
                        "int8_bytes": (out / MODEL_FILE).stat().st_size}}
    write_json(out / QUANTIZE_FILE, record)
    return record
