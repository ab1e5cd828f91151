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
  student folder with int8 weights in safetensors, ``kdpipe.torch_int8``), which the
  Predictor runs with PyTorch. Embeddings and convolutions stay float, so on the default
  TextCNN it quantizes only the classifier; it is meant for BiLSTM and transformer
  students served by PyTorch (torch 2.13 deprecates this API in favour of torchao; the
  warnings are recorded in ``torch/int8.json``);
- ``none``: the model copied unchanged.

Accuracy gate: validation accuracy of the fp32 and the quantized folder, both through
``kdpipe.serve.Predictor``. If the quantized model loses more than
``quantize.max_accuracy_drop`` the fp32 ``model.onnx`` is kept (and why is recorded).
Everything but the model is copied as is; ``quantize.json`` records the method,
sizes, accuracies, which model was kept (``kept``: its precision, int8, fp16 or fp32) and
why.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from kdpipe.atomic import atomic_dir, write_json
from kdpipe.config import Config
from kdpipe.errors import KdpipeError
from kdpipe.serve import MODEL_FILE, TORCH_DIR, Predictor, model_path
from kdpipe.steps import StepResult
from kdpipe.data.prepare import read_split

QUANTIZE_FILE = "quantize.json"
CALIBRATION_BATCH = 32
RECORD_FORMAT = 1
_FLOAT_DEFAULT = {"DefaultTensorType": 1}  # onnx.TensorProto.FLOAT
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
        shutil.copytree(export_dir, tmp, dirs_exist_ok=True)
        fp32 = export_dir / MODEL_FILE
        if q.method == "torch_dynamic":
            from kdpipe import torch_int8

            quantized = Path(s) / TORCH_DIR
            record["torch"] = torch_int8.save(Path(student_dir), quantized)
            record["student"] = str(student_dir)
        else:
            quantized = Path(s) / "quantized.onnx"
            record.update(quantize_model(cfg, fp32, quantized, export_dir, prepared_dir,
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


def quantize_model(cfg: Config, fp32: Path, out: Path, export_dir: Path,
                   prepared_dir: Path, scratch: Path) -> dict[str, Any]:
    """Write the quantized ONNX ``fp32`` to ``out``; return what to record about how."""
    method = cfg.quantize.method
    if method == "none":
        shutil.copyfile(fp32, out)
        return {}
    if method == "torch_dynamic":
        raise KdpipeError("quantize.method torch_dynamic quantizes a PyTorch student, not "
                          "an ONNX file (see kdpipe.torch_int8)")
    if method == "fp16":
        return _fp16(fp32, out)
    from kdpipe.telemetry import disable_onnxruntime_telemetry

    disable_onnxruntime_telemetry()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if method == "ort_dynamic":
        # The exported graph may hold ONNX Runtime's fused operators, whose outputs shape
        # inference cannot type: they are float.
        quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8,
                         op_types_to_quantize=list(cfg.quantize.op_types) or None,
                         extra_options=_FLOAT_DEFAULT)
        return {"op_types": list(cfg.quantize.op_types) or "default",
                "left_in_float": runtime_only_ops(fp32)}
    if method == "ort_static":
        return _static(cfg, fp32, out, export_dir, prepared_dir, scratch)
    raise KdpipeError(f"quantize.method {method!r}: unknown")


def _fp16(fp32: Path, out: Path) -> dict[str, Any]:
    try:
        from onnxconverter_common import float16
    except ImportError:
        raise KdpipeError("quantize.method fp16 needs onnxconverter-common: "
                          "`pip install onnxconverter-common`") from None
    import onnx

    # Cast nodes stay float32 (casts are inserted around them): the converter retypes a
    # Cast's output to float16 without changing its `to` attribute, which ORT then refuses.
    blocked = [*float16.DEFAULT_OP_BLOCK_LIST, "Cast"]
    model = float16.convert_float_to_float16(onnx.load(str(fp32)), keep_io_types=True,
                                             op_block_list=blocked)
    onnx.save(model, str(out))
    return {}


def _static(cfg: Config, fp32: Path, out: Path, export_dir: Path, prepared_dir: Path,
            scratch: Path) -> dict[str, Any]:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    q = cfg.quantize
    train_path = prepared_dir / "train.parquet"
    if not train_path.is_file():
        raise KdpipeError(f"{train_path}: not found; static quantization calibrates on train "
                          "texts (run `kdpipe ingest` first)")
    texts = list(read_split(train_path).texts)[: q.calibration_batches * CALIBRATION_BATCH]
    if not texts:
        raise KdpipeError(f"{train_path}: no rows to calibrate on")
    predictor = Predictor(export_dir, batch_size=CALIBRATION_BATCH)
    # The entropy and percentile calibrators stack all batches' activations into one array.
    feeds = list(predictor.encode(texts, same_width=True))

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it: Iterator[dict[str, np.ndarray]] = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

        def rewind(self) -> None:
            self._it = iter(feeds)

    source, pre = fp32, {"ran": False, "why": None}
    from onnxruntime.quantization.shape_inference import quant_pre_process

    failures = []
    for skip_symbolic in (False, True):  # ORT's fused operators defeat symbolic inference
        prepped = scratch / "preprocessed.onnx"
        try:
            # Its symbolic shape inference leaves temporary files in the working folder.
            with contextlib.chdir(scratch):
                quant_pre_process(str(fp32.resolve()), str(prepped),
                                  skip_symbolic_shape=skip_symbolic)
        except Exception as exc:  # noqa: BLE001 -- optional step: recorded and skipped
            failures.append(f"{'without' if skip_symbolic else 'with'} symbolic shape "
                            f"inference: {type(exc).__name__}: {str(exc)[:200]}")
            continue
        source = prepped
        pre = {"ran": True, "skip_symbolic_shape": skip_symbolic}
        break
    pre["why"] = "; ".join(failures) or None
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    def quantize(extra: dict[str, Any]) -> None:
        quantize_static(str(source), str(out), Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        calibrate_method=methods[q.calibration],
                        nodes_to_exclude=list(q.exclude_nodes) or None,
                        op_types_to_quantize=list(q.op_types) or None,
                        extra_options={**_FLOAT_DEFAULT, **extra})

    bias = {"quantized": True, "why": None}
    try:
        quantize({})
    except ValueError as exc:  # a bias whose input has no scale (after a fused operator)
        bias = {"quantized": False, "why": f"{type(exc).__name__}: {str(exc)[:200]}"}
        quantize({"QuantizeBias": False})
    return {"pre_process": pre, "bias": bias, "calibration_texts": len(texts),
            "calibration_batches": len(feeds),
            "calibration_width": int(feeds[0]["input_ids"].shape[1]),
            "exclude_nodes": list(q.exclude_nodes), "op_types": list(q.op_types) or "default",
            "left_in_float": runtime_only_ops(fp32)}


def runtime_only_ops(path: Path) -> list[str]:
    """ONNX Runtime's own operators in ``path`` (saved by export.optimize above ``basic``):
    the quantizer does not know them, so they stay in float; recorded so a small gain in size
    can be explained."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return sorted({node.op_type for node in graph.node if node.domain not in ("", "ai.onnx")})


def accuracy(predictor: Predictor, split: Any) -> float:
    """Share of ``split``'s texts whose argmax label id equals the gold label id."""
    predicted = predictor.logits(list(split.texts)).argmax(1)
    return float((predicted == np.asarray(split.labels, dtype=np.int64)).mean())
