"""Between PyTorch, ONNX and the runtimes that execute ONNX files (ONNX Runtime, TensorRT).

- ``exportable(model)``: a copy of a student that returns logits only and that the
  TorchScript-based ONNX exporter can trace (each student's ``export_form``).
- ``build_tensorrt_engine``: imports TensorRT itself, so call it only once
  ``tensorrt_unavailable()`` returned None.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from kdpipe.errors import KdpipeError
from kdpipe.serving.ort import first_line as _first_line

# The TorchScript exporter's newest opset (torch 2.13); newer ones are reached by converting
# its graph with onnx.version_converter (it would otherwise stamp a newer number on opset-20
# operators, with a warning).
TORCHSCRIPT_MAX_OPSET = 20


# --- PyTorch -> ONNX ----------------------------------------------------------------------

class LogitsOnly(nn.Module):
    """``forward(input_ids, attention_mask) -> logits (B, C)`` of a student (or anything that
    returns an object with ``.logits`` or a tuple whose first item is the logits)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        out = self.model(input_ids, attention_mask)
        return out.logits if hasattr(out, "logits") else out[0]


@contextlib.contextmanager
def exportable(model: nn.Module) -> Iterator[nn.Module]:
    """A logits-only copy of ``model`` (eval mode) that traces to ONNX; ``model`` is untouched.

    The module's own ``forward`` runs, buffers included (e.g. a vocabulary remap), with every
    student inside it in its export form (``Student.export_form``: the BiLSTM's LSTM as ONNX
    LSTM nodes, the TextCNN's convolutions as one MatMul).
    """
    from kdpipe.models.base import Student

    twin = copy.deepcopy(model).eval()
    with contextlib.ExitStack() as forms:
        for module in list(twin.modules()):
            if isinstance(module, Student):
                forms.enter_context(module.export_form())
        yield LogitsOnly(twin).eval()


def export_onnx(model: nn.Module, example: tuple[Tensor, Tensor], path: Path,
                opset: int) -> None:
    """Trace ``model`` (a student) with the TorchScript exporter into ``path``: inputs
    ``input_ids``, ``attention_mask`` (int64, batch x sequence), output ``logits`` (batch x
    labels), then check the file with ``onnx.checker``. Opsets above
    ``TORCHSCRIPT_MAX_OPSET`` are traced at that one and converted.

    ``example`` should hold a padded row: some models branch on "no padding at all" while
    tracing, and a trace from an all-ones mask would drop the mask."""
    import warnings

    import onnx

    with exportable(model) as module, warnings.catch_warnings(), torch.no_grad():
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        # Generic cautions (BERT's mask indexing, unfolded slices); the parity check on real
        # padded batches is what tells whether the graph is right.
        warnings.filterwarnings("ignore", message="Exporting aten::index operator")
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")
        torch.onnx.export(
            module, example, str(path), dynamo=False,
            opset_version=min(opset, TORCHSCRIPT_MAX_OPSET),
            input_names=["input_ids", "attention_mask"], output_names=["logits"],
            dynamic_axes={"input_ids": {0: "batch", 1: "sequence"},
                          "attention_mask": {0: "batch", 1: "sequence"},
                          "logits": {0: "batch"}})
    if opset > TORCHSCRIPT_MAX_OPSET:
        from onnx import version_converter

        onnx.save(version_converter.convert_version(onnx.load(str(path)), opset), str(path))
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise KdpipeError(f"{path}: exported ONNX graph is invalid: {exc}") from None


# --- TensorRT -----------------------------------------------------------------------------

_SKIP_TENSORRT = "export.tensorrt=false"

def tensorrt_unavailable() -> str | None:
    """Why a TensorRT engine cannot be built here, or None when it can (TensorRT imports and
    a CUDA GPU is present)."""
    try:
        import tensorrt  # noqa: F401
    except ModuleNotFoundError as exc:
        if exc.name == "tensorrt":
            return "TensorRT not available"
        return f"TensorRT not available ({type(exc).__name__}: {_first_line(exc)})"
    except Exception as exc:  # installed without its CUDA libraries, or for another CUDA
        return f"TensorRT not available ({type(exc).__name__}: {_first_line(exc)})"
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    return None


def build_tensorrt_engine(onnx_path: Path, plan_path: Path, precision: str,
                          feeds: list[dict[str, np.ndarray]], max_length: int,
                          max_batch: int) -> tuple[np.ndarray, dict[str, Any]]:
    """Build a TensorRT engine from ``onnx_path`` (plain ONNX ops, not ORT-optimised) into
    ``plan_path`` at ``precision`` (fp32 without TF32, fp16, or int8 calibrated on ``feeds``),
    run ``feeds`` through it and time one batch.

    Inputs are dynamic from (1, 1) to (``max_batch``, ``max_length``). Returns the logits of
    every feed (n, C) and a record: precision, plan bytes, build seconds, timing.
    """
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flag = getattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH", None)
    network = builder.create_network(0 if flag is None else 1 << int(flag))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise KdpipeError(f"TensorRT cannot parse the exported ONNX graph: {errors}; "
                          f"-S {_SKIP_TENSORRT} skips the engine")
    config = builder.create_builder_config()
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    opt_batch = min(max_batch, max(len(next(iter(f.values()))) for f in feeds))
    profile = builder.create_optimization_profile()
    for name in names:
        profile.set_shape(name, (1, 1), (opt_batch, max_length), (max_batch, max_length))
    config.add_optimization_profile(profile)
    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # TF32 would cost fp32 its parity
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
        dtypes = {network.get_input(i).name: trt.nptype(network.get_input(i).dtype)
                  for i in range(network.num_inputs)}
        calibration, calibrator = _int8_calibrator(builder, dtypes, feeds, max_length)
        config.set_calibration_profile(calibration)
        config.int8_calibrator = calibrator
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise KdpipeError(f"TensorRT could not build a {precision} engine (its log above "
                          f"says why); -S {_SKIP_TENSORRT} skips the engine")
    build_seconds = time.perf_counter() - start
    plan_path.write_bytes(bytes(serialized))
    engine = trt.Runtime(logger).deserialize_cuda_engine(serialized)
    context = engine.create_execution_context()
    logits = np.concatenate([_run_engine(trt, engine, context, f) for f in feeds])
    timed = feeds[0]
    for _ in range(5):
        _run_engine(trt, engine, context, timed)
    times = []
    for _ in range(50):
        start = time.perf_counter()
        _run_engine(trt, engine, context, timed)
        times.append(time.perf_counter() - start)
    shape = list(next(iter(timed.values())).shape)
    return logits, {"precision": precision, "plan_bytes": plan_path.stat().st_size,
                    "build_seconds": round(build_seconds, 2), "timed_batch_shape": shape,
                    "latency_ms_p50": round(1000 * float(np.median(times)), 3),
                    "tensorrt_version": trt.__version__}


def _run_engine(trt: Any, engine: Any, context: Any, feed: dict[str, np.ndarray]) -> np.ndarray:
    """One batch through the engine (copies in and out included, as a caller would see)."""
    alive = []  # device inputs must outlive the run
    for name, array in feed.items():
        dtype = torch.from_numpy(np.zeros(0, trt.nptype(engine.get_tensor_dtype(name)))).dtype
        tensor = torch.from_numpy(array).to("cuda", dtype).contiguous()
        alive.append(tensor)
        context.set_input_shape(name, tuple(tensor.shape))
        context.set_tensor_address(name, tensor.data_ptr())
    out_dtype = torch.from_numpy(np.zeros(0, trt.nptype(engine.get_tensor_dtype("logits"))))
    out = torch.empty(tuple(context.get_tensor_shape("logits")), dtype=out_dtype.dtype,
                      device="cuda")
    context.set_tensor_address("logits", out.data_ptr())
    stream = torch.cuda.current_stream()
    if not context.execute_async_v3(stream.cuda_stream):
        raise KdpipeError("TensorRT engine failed to run a batch")
    stream.synchronize()
    return out.float().cpu().numpy()


def _int8_calibrator(builder: Any, dtypes: dict[str, Any], feeds: list[dict[str, np.ndarray]],
                     max_length: int) -> tuple[Any, Any]:
    """A calibration profile fixed at (batch, max_length) and an entropy calibrator that feeds
    the validation batches padded to it (TensorRT calibrates at one shape). ``dtypes``: the
    network's input name -> numpy type (TensorRT 8 narrows int64 inputs to int32)."""
    import tensorrt as trt

    batch = max(len(next(iter(f.values()))) for f in feeds)
    profile = builder.create_optimization_profile()
    for name in dtypes:
        profile.set_shape(name, (batch, max_length), (batch, max_length), (batch, max_length))

    def padded(name: str, array: np.ndarray) -> Tensor:
        out = np.zeros((batch, max_length), dtypes[name])  # pad id 0, mask 0
        out[: array.shape[0], : array.shape[1]] = array
        return torch.from_numpy(out).to("cuda")

    class Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            super().__init__()
            self.batches = iter(feeds)
            self.current: list[Tensor] = []

        def get_batch_size(self) -> int:
            return batch

        def get_batch(self, wanted: list[str]) -> list[int] | None:
            feed = next(self.batches, None)
            if feed is None:
                return None
            self.current = [padded(name, feed[name]) for name in wanted]  # kept alive
            return [t.data_ptr() for t in self.current]

        def read_calibration_cache(self) -> None:
            return None

        def write_calibration_cache(self, cache: Any) -> None:
            return None

    return profile, Calibrator()


def example_inputs(tokenizer: Any, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Two tokenized texts, right-padded, plus one more padding column, so the traced
    example always holds padding (a model may skip its mask when it sees none)."""
    rows = (texts * 2)[:2]
    encoded = tokenizer(rows, truncation=True, max_length=32, padding=True,
                        return_tensors="pt")
    ids, mask = encoded["input_ids"].long(), encoded["attention_mask"].long()
    pad = torch.full((2, 1), tokenizer.pad_token_id or 0, dtype=torch.long)
    return torch.cat([ids, pad], 1), torch.cat([mask, torch.zeros_like(pad)], 1)


def torch_logits(model: nn.Module, feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    """The PyTorch student's logits (n, C) on the same token arrays the ONNX model got."""
    module = LogitsOnly(model).eval()
    with torch.inference_mode():
        return np.concatenate([
            module(torch.from_numpy(f["input_ids"]).long(),
                   torch.from_numpy(f["attention_mask"]).long()).float().numpy()
            for f in feeds])


def parity_report(reference: np.ndarray, exported: np.ndarray,
                  tolerance: float | None) -> dict[str, Any]:
    """max/mean |Δlogit| and argmax agreement of ``exported`` against ``reference`` (n, C).
    A NaN or infinity on either side counts as an infinite difference."""
    diff = np.abs(reference.astype(np.float64) - exported.astype(np.float64))
    diff[~np.isfinite(diff)] = np.inf
    agreement = float((reference.argmax(1) == exported.argmax(1)).mean())
    max_diff = float(diff.max())
    return {"split": "validation", "rows": int(len(reference)), "max_abs_diff": max_diff,
            "mean_abs_diff": float(diff.mean()), "label_agreement": agreement,
            "tolerance": tolerance,
            "passed": tolerance is None or bool(max_diff <= tolerance)}


def check_parity(report: dict[str, Any], runtime: str, model_dir: Path) -> None:
    if not report["passed"]:
        raise KdpipeError(
            f"export parity failed: {runtime} max |Δlogit| {report['max_abs_diff']:.3g} > "
            f"export.parity_tolerance {report['tolerance']:g} over {report['rows']} "
            f"validation texts (label agreement {report['label_agreement']:.2%}); the "
            f"exported model does not reproduce {model_dir}")
