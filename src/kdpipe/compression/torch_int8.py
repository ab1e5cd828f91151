"""PyTorch dynamic int8 (``quantize.method=torch_dynamic``): a student whose Linear and LSTM
weights are int8, run by PyTorch, saved as safetensors.

``quantize_module`` applies ``torch.ao.quantization.quantize_dynamic`` to a student's
``nn.Linear`` and ``nn.LSTM`` layers (int8 weights, per-tensor; activations quantized per
call). PyTorch saves such a model only by pickling its packed weights, so ``save`` writes the
int8 values, scales and zero points as plain safetensors tensors (``<layer>.<weight>.int8``,
``.scale``, ``.zero_point``; float biases and every other tensor under their own names) in
place of the student's ``model.safetensors``, and ``load`` rebuilds the module, quantizes
its structure and puts the stored int8 values back exactly (no re-rounding).

A saved folder is the student folder it came from (a distill or prune output: student.json,
pruning.json, the vocabulary remap) without its tokenizer files, with the weights file
replaced and ``int8.json`` added.

Why the saving is by hand: packed int8 parameters have no safetensors form in torch (nor in
``torch.ao.quantization``, which torch 2.13 marks deprecated in favour of torchao; the
warnings it raises are recorded in ``int8.json``, not shown).
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from kdpipe.errors import KdpipeError
from kdpipe.serving.predictor import TOKENIZER_CONFIG, TOKENIZER_FILE, VOCABULARY_FILES

INT8_RECORD = "int8.json"
RECORD_FORMAT = 1
QUANTIZED_TYPES = (nn.Linear, nn.LSTM)
TOKENIZER_FILES = (TOKENIZER_FILE, TOKENIZER_CONFIG, "special_tokens_map.json",
                   *VOCABULARY_FILES)


@contextlib.contextmanager
def quiet() -> Iterator[list[str]]:
    """Silence torch's deprecation warnings about its quantization API; yields the list
    their first lines are collected in, for the record."""
    seen: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield seen
    for warning in caught:
        line = str(warning.message).strip().splitlines()[0]
        if line not in seen:
            seen.append(line)


def quantize_module(module: nn.Module) -> list[str]:
    """Quantize ``module``'s Linear and LSTM layers to dynamic int8, in place; returns the
    warnings torch gave."""
    with quiet() as warned:
        torch.ao.quantization.quantize_dynamic(module, set(QUANTIZED_TYPES),
                                               dtype=torch.qint8, inplace=True)
    return warned


def _quantized_layers(module: nn.Module) -> dict[str, nn.Module]:
    from torch.ao.nn.quantized import dynamic

    kinds = (dynamic.Linear, dynamic.LSTM)
    return {name: layer for name, layer in module.named_modules() if isinstance(layer, kinds)}


def _weights_and_biases(layer: nn.Module) -> dict[str, Tensor | None]:
    """A quantized layer's weights (quantized tensors) and biases by name."""
    from torch.ao.nn.quantized import dynamic

    if isinstance(layer, dynamic.LSTM):
        parts = layer._weight_bias()
        return {**parts["weight"], **parts["bias"]}
    return {"weight": layer.weight(), "bias": layer.bias()}


def int8_tensors(module: nn.Module) -> dict[str, Tensor]:
    """Every tensor of a ``quantize_module`` output, as plain tensors to save."""
    layers = _quantized_layers(module)
    out: dict[str, Tensor] = {}
    for key, value in module.state_dict().items():
        if isinstance(value, Tensor) and not any(key.startswith(f"{n}.") for n in layers):
            out[key] = value.detach().contiguous()
    for name, layer in layers.items():
        for part, tensor in _weights_and_biases(layer).items():
            key = f"{name}.{part}"
            if tensor is None:
                continue
            if not tensor.is_quantized:
                out[key] = tensor.detach().contiguous()
                continue
            if tensor.qscheme() != torch.per_tensor_affine:
                raise KdpipeError(f"{key}: quantized {tensor.qscheme()}, only per-tensor "
                                  "int8 weights can be saved")
            out[f"{key}.int8"] = tensor.int_repr().contiguous()
            out[f"{key}.scale"] = torch.tensor(tensor.q_scale(), dtype=torch.float64)
            out[f"{key}.zero_point"] = torch.tensor(tensor.q_zero_point(), dtype=torch.int64)
    return out


def load_int8_tensors(module: nn.Module, tensors: dict[str, Tensor], where: Path) -> None:
    """Load ``tensors`` (from ``int8_tensors``) into the float ``module`` built for them,
    quantizing its structure in place; a tensor missing or left over is a ``KdpipeError``
    naming ``where``."""
    parts = (".int8", ".scale", ".zero_point")
    # "<layer>.<weight>.int8" -> "<layer>"
    named = {k.rsplit(".", 2)[0] for k in tensors if k.endswith(".int8")}
    plain = {k: v for k, v in tensors.items() if not k.endswith(parts)}
    # Float tensors first: a quantized layer reads only its own packed form from a state dict.
    result = module.load_state_dict(plain, strict=False)
    missing = [k for k in result.missing_keys if k.rsplit(".", 1)[0] not in named]
    unexpected = result.unexpected_keys + [k for k in tensors if k.endswith(parts)
                                           and k.rsplit(".", 2)[0] not in named]
    if missing or unexpected:
        raise KdpipeError(f"{where}: does not fit the student (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]})")
    quantize_module(module)
    layers = _quantized_layers(module)
    if set(layers) != named:
        raise KdpipeError(f"{where}: int8 layers {sorted(named)} but the student quantizes "
                          f"{sorted(layers)}")
    with quiet():
        for name, layer in layers.items():
            values: dict[str, Tensor | None] = {}
            for part, current in _weights_and_biases(layer).items():
                key = f"{name}.{part}"
                if current is not None and current.is_quantized:
                    if not all(key + p in tensors for p in parts):
                        raise KdpipeError(f"{where}: no int8 weight {key}")
                    values[part] = torch._make_per_tensor_quantized_tensor(
                        tensors[key + ".int8"], float(tensors[key + ".scale"]),
                        int(tensors[key + ".zero_point"]))
                else:
                    values[part] = tensors.get(key)
            if "weight" in values:  # Linear
                layer.set_weight_bias(values["weight"], values["bias"])
            else:
                layer.set_weight_bias(values)


def weights_file(folder: Path) -> Path:
    """The student weights file of a distill or prune output folder."""
    from kdpipe.compression.pruning import PRUNING_FILE, STUDENT_DIR
    from kdpipe.models.students import WEIGHTS_FILE

    folder = Path(folder)
    inner = folder / STUDENT_DIR if (folder / PRUNING_FILE).is_file() else folder
    return inner / WEIGHTS_FILE


def inner_student(module: nn.Module) -> nn.Module:
    """The student a ``PrunedStudent`` wraps (or ``module`` itself)."""
    from kdpipe.compression.pruning import PrunedStudent

    return module.student if isinstance(module, PrunedStudent) else module


def save(student_dir: Path, out: Path) -> dict[str, Any]:
    """Write the int8 copy of the student in ``student_dir`` (a distill or prune output) to
    the new folder ``out``; returns what ``int8.json`` records."""
    import shutil

    from safetensors.torch import save_file

    from kdpipe.compression.pruning import load_for_inference

    module = load_for_inference(student_dir)
    student = inner_student(module)
    fp32_count = sum(p.numel() for p in student.parameters())
    warned = quantize_module(student)
    tensors = int8_tensors(student)
    # The quantized folder holds the tokenizer once, beside this one.
    shutil.copytree(student_dir, out, ignore=shutil.ignore_patterns(*TOKENIZER_FILES))
    target = weights_file(out)
    save_file(tensors, str(target), metadata={"format": "pt"})
    layers = sorted(_quantized_layers(student))
    record = {"format": RECORD_FORMAT, "method": "torch_dynamic", "dtype": "qint8",
              "scheme": "per_tensor_affine", "layers": layers,
              "int8_values": sum(t.numel() for k, t in tensors.items() if k.endswith(".int8")),
              "parameters": fp32_count, "torch": torch.__version__, "torch_warnings": warned}
    (out / INT8_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record


def load(folder: Path) -> nn.Module:
    """The int8 student ``save`` wrote to ``folder``, in eval mode."""
    from kdpipe.compression.pruning import load_for_inference

    folder = Path(folder)
    if not (folder / INT8_RECORD).is_file():
        raise KdpipeError(f"{folder / INT8_RECORD}: not found; {folder} is not a "
                          "torch_dynamic int8 student")
    return load_for_inference(folder, load_weights=load_int8_file)


def load_int8_file(module: nn.Module, path: Path) -> None:
    """``load_weights`` hook of the student loaders: the int8 weights file into ``module``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise KdpipeError(f"{path}: cannot read ({type(exc).__name__})") from None
    load_int8_tensors(module, tensors, path)


class _Port(NamedTuple):
    """What ``Predictor`` reads of an ONNX Runtime session's inputs and outputs."""

    name: str
    type: str
    shape: list[Any]


class TorchSession:
    """The int8 student in ``folder`` (written by ``save``) behind the part of ONNX Runtime's
    ``InferenceSession`` interface that ``kdpipe.serving.predictor.Predictor`` uses: ``get_inputs``,
    ``get_outputs``, ``run(["logits"], feed)``. ``threads``: torch CPU threads for each
    call (None: torch's setting as it is), restored after the call."""

    def __init__(self, folder: Path, threads: int | None = None) -> None:
        from kdpipe.compression.onnx_export import LogitsOnly

        student = load(folder)
        self.module = LogitsOnly(student).eval()
        self.num_labels = int(inner_student(student).student_record["num_labels"])
        self.threads = threads
        # The float student's count: int8 keeps every value (packed weights are not
        # nn.Parameters, so the module cannot count them).
        self.parameter_count = int(json.loads(
            (Path(folder) / INT8_RECORD).read_text(encoding="utf-8"))["parameters"])

    def get_inputs(self) -> list[_Port]:
        return [_Port(name, "tensor(int64)", ["batch", "sequence"])
                for name in ("input_ids", "attention_mask")]

    def get_outputs(self) -> list[_Port]:
        return [_Port("logits", "tensor(float)", ["batch", self.num_labels])]

    def run(self, outputs: list[str] | None, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        from kdpipe.threads import torch_threads

        with torch_threads(self.threads), torch.inference_mode():
            logits = self.module(torch.from_numpy(feed["input_ids"]),
                                 torch.from_numpy(feed["attention_mask"]))
        return [logits.float().numpy()]
