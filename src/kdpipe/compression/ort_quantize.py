"""ONNX Runtime's quantizers (and fp16) over one exported ONNX file.

``quantize_model`` writes the quantized model per ``quantize.method`` and returns what to
record about how; the quantize step (``kdpipe.steps.quantize``) adds the accuracy gate, and
the teacher's int8 baseline (``kdpipe.evaluation.teacher_onnx``) uses it as is.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from kdpipe.config import QuantizeConfig
from kdpipe.data.prepare import read_split
from kdpipe.errors import KdpipeError
from kdpipe.serving.predictor import Predictor

CALIBRATION_BATCH = 32
_FLOAT_DEFAULT = {"DefaultTensorType": 1}  # onnx.TensorProto.FLOAT


def quantize_model(q: QuantizeConfig, fp32: Path, out: Path, export_dir: Path,
                   prepared_dir: Path, scratch: Path) -> dict[str, Any]:
    """Write the quantized ONNX ``fp32`` to ``out``; return what to record about how."""
    method = q.method
    if method == "none":
        shutil.copyfile(fp32, out)
        return {}
    if method == "torch_dynamic":
        raise KdpipeError("quantize.method torch_dynamic quantizes a PyTorch student, not "
                          "an ONNX file (see kdpipe.compression.torch_int8)")
    if method == "fp16":
        return _fp16(fp32, out)
    from kdpipe.telemetry import disable_onnxruntime_telemetry

    disable_onnxruntime_telemetry()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if method == "ort_dynamic":
        # The exported graph may hold ONNX Runtime's fused operators, whose outputs shape
        # inference cannot type: they are float.
        quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8,
                         op_types_to_quantize=list(q.op_types) or None,
                         extra_options=_FLOAT_DEFAULT)
        return {"op_types": list(q.op_types) or "default",
                "left_in_float": runtime_only_ops(fp32)}
    if method == "ort_static":
        return _static(q, fp32, out, export_dir, prepared_dir, scratch)
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


def _static(q: QuantizeConfig, fp32: Path, out: Path, export_dir: Path, prepared_dir: Path,
            scratch: Path) -> dict[str, Any]:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

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
