"""quantize: shrink an exported folder's ONNX model, kept only if it stays accurate.

Reads ``export_dir`` (written by ``kdpipe.steps.export``: model.onnx, tokenizer files,
labels.json, export.json) and ``prepared_dir`` (train.parquet for static calibration,
validation.parquet for the accuracy gate). Writes ``out_dir`` atomically: a copy of the
exported folder whose ``model.onnx`` is replaced by the quantized model per
``quantize.method``:

- ``ort_dynamic`` (default): ``onnxruntime.quantization.quantize_dynamic``, int8 weights;
- ``ort_static``: ``quantize_static`` in QDQ format, int8 weights and activations,
  calibrated (``quantize.calibration``: minmax, entropy, percentile) on
  ``quantize.calibration_batches`` batches of 32 train texts tokenized as the folder's
  Predictor does, every batch padded to the longest of them (the entropy and percentile
  calibrators need batches of one shape); ``quantize.exclude_nodes`` stay in float. ORT's
  ``quant_pre_process`` runs first where it can; where it fails the reason is recorded and
  it is skipped;
- ``fp16``: float16 weights and activations (``onnxconverter_common``), inputs and outputs
  kept as they were; for GPU targets (ONNX Runtime's CUDA/TensorRT providers, TensorRT):
  on a CPU it halves the file but runs no faster;
- ``torch_dynamic``: PyTorch's dynamic int8 (``torch.ao.quantization.quantize_dynamic``)
  of the PyTorch student in ``student_dir`` (the prune output the folder was exported
  from): int8 Linear and LSTM weights, activations quantized per call. Its quantized
  operators have no ONNX form, so ``model.onnx`` is replaced by a ``torch`` folder (the
  student folder with int8 weights in safetensors, ``kdpipe.compression.torch_int8``), which the
  Predictor runs with PyTorch. Embeddings and convolutions stay float, so on the default
  TextCNN it quantizes only the classifier; it is meant for BiLSTM and transformer
  students served by PyTorch (torch 2.13 deprecates this API in favour of torchao; the
  warnings are recorded in ``torch/int8.json``);
- ``none``: the model copied unchanged.

Accuracy gate: validation accuracy of the fp32 and the quantized folder, both through
``kdpipe.serving.predictor.Predictor``. If the quantized model loses more than
``quantize.max_accuracy_drop`` the fp32 ``model.onnx`` is kept (and why is recorded).
Everything but the model is copied as is; ``quantize.json`` records the method,
sizes, accuracies, which model was kept (``kept``: its precision, int8, fp16 or fp32) and
why.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from kdpipe.atomic import atomic_dir, write_json
from kdpipe.compression.ort_quantize import quantize_model
from kdpipe.config import Config
from kdpipe.data.prepare import read_split
from kdpipe.errors import KdpipeError
from kdpipe.serving.bag_numpy import BAG_FILE
from kdpipe.serving.predictor import MODEL_FILE, TORCH_DIR, Predictor, model_path
from kdpipe.step_result import StepResult

QUANTIZE_FILE = "quantize.json"
RECORD_FORMAT = 1
# What each method's model computes in: quantize.json's "kept" names it (or "fp32" when the
# gate kept the exported model).
PRECISION = {"ort_dynamic": "int8", "ort_static": "int8", "torch_dynamic": "int8",
             "fp16": "fp16", "none": "fp32"}


def run(cfg: Config, export_dir: Path, prepared_dir: Path, out_dir: Path,
        student_dir: Path | None = None) -> StepResult:
    """Quantize the exported folder ``export_dir`` into ``out_dir`` (see the module docstring).
    ``student_dir``: the PyTorch student ``export_dir`` was made from; read only by
    ``torch_dynamic``.

    Metrics: ``size_bytes`` (the model kept), ``fp32_bytes``, ``int8_bytes`` (the quantized
    model, whatever its precision), ``val_accuracy_fp32``, ``val_accuracy_int8``,
    ``kept_int8`` (1 if the quantized model was kept, else 0).
    """
    start = time.perf_counter()
    export_dir, prepared_dir, out_dir = Path(export_dir), Path(prepared_dir), Path(out_dir)
    q = cfg.quantize
    _check_inputs(export_dir, prepared_dir)
    if q.method == "torch_dynamic":
        _check_student(student_dir)
    validation = read_split(prepared_dir / "validation.parquet")
    if not validation.texts:
        raise KdpipeError(f"{prepared_dir / 'validation.parquet'}: no rows to measure "
                          "accuracy on")
    record: dict[str, Any] = {"format": RECORD_FORMAT, "source": str(export_dir),
                              "method": q.method,
                              "calibration": q.calibration if q.method == "ort_static" else None,
                              "max_accuracy_drop": q.max_accuracy_drop}
    with atomic_dir(out_dir) as tmp, tempfile.TemporaryDirectory(prefix="kdpipe-quant-") as s:
        # Not the fast student's float tables: the Predictor would serve them in place of
        # the int8 model this folder is for.
        shutil.copytree(export_dir, tmp, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns(BAG_FILE))
        fp32 = export_dir / MODEL_FILE
        if q.method == "torch_dynamic":
            from kdpipe.compression import torch_int8

            quantized = Path(s) / TORCH_DIR
            record["torch"] = torch_int8.save(Path(student_dir), quantized)
            record["student"] = str(student_dir)
        else:
            quantized = Path(s) / "quantized.onnx"
            record.update(quantize_model(cfg.quantize, fp32, quantized, export_dir, prepared_dir,
                                         Path(s)))
        fp32_accuracy = accuracy(Predictor(export_dir), validation)
        install(quantized, tmp)
        int8_accuracy = accuracy(Predictor(tmp), validation)
        record["sizes"] = {"fp32_bytes": fp32.stat().st_size,
                           "int8_bytes": model_bytes(quantized)}
        record["accuracy"] = {"split": "validation", "rows": len(validation.texts),
                              "fp32": fp32_accuracy, "int8": int8_accuracy}
        drop = fp32_accuracy - int8_accuracy
        precision = PRECISION[q.method]
        kept_quantized = int8_accuracy >= fp32_accuracy - q.max_accuracy_drop
        record["kept"] = precision if kept_quantized else "fp32"
        record["why"] = (f"{precision} lost {100 * drop:.2f} points "
                         f"{'<=' if kept_quantized else '>'} max_accuracy_drop "
                         f"{100 * q.max_accuracy_drop:.2f}")
        if not kept_quantized:
            install(fp32, tmp)
        record["size_bytes"] = model_bytes(model_path(tmp))
        record["seconds"] = round(time.perf_counter() - start, 2)
        write_json(tmp / QUANTIZE_FILE, record)
    sizes, acc = record["sizes"], record["accuracy"]
    metrics = {"size_bytes": float(record["size_bytes"]),
               "fp32_bytes": float(sizes["fp32_bytes"]),
               "int8_bytes": float(sizes["int8_bytes"]),
               "val_accuracy_fp32": acc["fp32"], "val_accuracy_int8": acc["int8"],
               "kept_int8": 1.0 if kept_quantized else 0.0}
    summary = (f"{q.method}: {sizes['fp32_bytes'] / 1e6:.2f} MB -> "
               f"{sizes['int8_bytes'] / 1e6:.2f} MB, validation accuracy "
               f"{acc['fp32']:.2%} -> {acc['int8']:.2%}; kept {record['kept']}")
    return StepResult("quantize", out_dir, metrics, [out_dir / QUANTIZE_FILE], summary)


def install(model: Path, folder: Path) -> None:
    """Make ``model`` (an ONNX file or a torch_dynamic ``torch`` folder) the model of the
    exported ``folder``, removing the other kind."""
    for old in (folder / MODEL_FILE, folder / TORCH_DIR):
        if old.is_dir():
            shutil.rmtree(old)
        elif old.exists():
            old.unlink()
    if model.is_dir():
        shutil.copytree(model, folder / TORCH_DIR)
    else:
        shutil.copyfile(model, folder / MODEL_FILE)


def model_bytes(model: Path) -> int:
    """Size of an ONNX file, or of every file in a ``torch`` folder."""
    if model.is_dir():
        return sum(p.stat().st_size for p in model.rglob("*") if p.is_file())
    return model.stat().st_size


def _check_student(student_dir: Path | None) -> None:
    if student_dir is None:
        raise KdpipeError("quantize.method torch_dynamic quantizes the PyTorch student: give "
                          "the prune output the folder was exported from")
    if not Path(student_dir).is_dir():
        raise KdpipeError(f"{student_dir}: not found; quantize.method torch_dynamic reads "
                          "the PyTorch student (run `kdpipe prune` first)")


def _check_inputs(export_dir: Path, prepared_dir: Path) -> None:
    for path, hint in ((export_dir / MODEL_FILE, "run `kdpipe export` first"),
                       (prepared_dir / "validation.parquet", "run `kdpipe ingest` first")):
        if not path.is_file():
            raise KdpipeError(f"{path}: not found; {hint}")


def accuracy(predictor: Predictor, split: Any) -> float:
    """Share of ``split``'s texts whose argmax label id equals the gold label id."""
    predicted = predictor.logits(list(split.texts)).argmax(1)
    return float((predicted == np.asarray(split.labels, dtype=np.int64)).mean())
