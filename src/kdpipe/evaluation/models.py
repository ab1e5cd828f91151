"""One interface over every model the evaluate step compares.

A ``ModelUnderTest`` gives ``tokenize(texts)`` (what the model's own call does before its
forward pass, for timing tokenization alone) and ``logits(texts)`` ((n, C) float32, rows in
input order, texts tokenized, padded per batch of ``batch_size`` and cut at ``max_length``).

- the teacher: a Hugging Face sequence-classification folder, with its own tokenizer;
- students (distill output) and pruned students (prune output): ``load_for_inference``,
  fed the TEACHER's token ids, as they were trained;
- ONNX folders (export / quantize outputs, the teacher's ONNX copies): ``Predictor``, which
  tokenizes with the tokenizer saved beside the model.

PyTorch models run under ``torch.inference_mode`` on the threads the caller set (the step
wraps the whole evaluation in ``kdpipe.threads.torch_threads``), ONNX ones on the
``threads`` given here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kdpipe.errors import KdpipeError

# Kinds of model served by a Predictor over an exported folder (``module`` is the Predictor).
EXPORTED_KINDS = ("onnx", "pytorch-int8")


@dataclass(frozen=True)
class ModelUnderTest:
    name: str
    kind: str  # "pytorch", or an exported folder's: "onnx" | "pytorch-int8" (EXPORTED_KINDS)
    path: Path
    num_labels: int
    params: int
    tokenize: Callable[[list[str]], Any]
    logits: Callable[[list[str]], np.ndarray]
    module: Any = None  # the torch module or the Predictor behind the calls


def pytorch_teacher(name: str, folder: Path, tokenizer: Any, max_length: int,
                    batch_size: int) -> ModelUnderTest:
    """The fine-tuned teacher in ``folder`` (``save_pretrained`` output)."""
    model = load_hf_classifier(folder)

    def forward(feed: dict[str, Any]) -> Any:
        return model(**feed).logits

    return _pytorch(name, folder, model, int(model.config.num_labels), tokenizer, max_length,
                    batch_size, forward)


def pytorch_student(name: str, folder: Path, tokenizer: Any, max_length: int,
                    batch_size: int) -> ModelUnderTest:
    """A distill or prune output in ``folder``; ``tokenizer``: the teacher's."""
    from kdpipe.compression.onnx_export import LogitsOnly
    from kdpipe.compression.pruning import load_for_inference
    from kdpipe.models.students import student_record

    module = load_for_inference(folder)
    logits_only = LogitsOnly(module).eval()

    def forward(feed: dict[str, Any]) -> Any:
        return logits_only(feed["input_ids"], feed["attention_mask"])

    return _pytorch(name, folder, module, int(student_record(module)["num_labels"]),
                    tokenizer, max_length, batch_size, forward)


def onnx_folder(name: str, folder: Path, threads: int, batch_size: int,
                numpy_bag: bool = True) -> ModelUnderTest:
    """An exported folder (model.onnx, or a torch_dynamic ``torch`` folder; tokenizer,
    labels.json, export.json), served as the Predictor serves it (``numpy_bag``: see
    ``Predictor``)."""
    from kdpipe.serving.predictor import Predictor

    predictor = Predictor(folder, threads=threads, batch_size=batch_size, numpy_bag=numpy_bag)

    def tokenize(texts: list[str]) -> list[dict[str, np.ndarray]]:
        return list(predictor.encode(texts))

    if predictor.on_torch:
        kind, params = "pytorch-int8", predictor.session.parameter_count
    else:
        kind, params = "onnx", onnx_parameter_count(predictor.model_path)
    return ModelUnderTest(name, kind, Path(folder), len(predictor.labels), params, tokenize,
                          predictor.logits, predictor)


def _pytorch(name: str, folder: Path, module: Any, num_labels: int, tokenizer: Any,
             max_length: int, batch_size: int,
             forward: Callable[[dict[str, Any]], Any]) -> ModelUnderTest:
    import torch

    module.eval()

    def encode(texts: list[str]) -> dict[str, Any]:
        return tokenizer(texts, padding=True, truncation=True, max_length=max_length,
                         return_tensors="pt")

    def tokenize(texts: list[str]) -> list[dict[str, Any]]:
        return [encode(texts[i: i + batch_size]) for i in range(0, len(texts), batch_size)]

    def logits(texts: list[str]) -> np.ndarray:
        out = []
        with torch.inference_mode():
            for feed in tokenize(texts):
                out.append(forward(dict(feed)).float().numpy())
        return np.concatenate(out) if out else np.zeros((0, num_labels), np.float32)

    params = sum(p.numel() for p in module.parameters())  # a tied tensor counts once
    return ModelUnderTest(name, "pytorch", Path(folder), num_labels, params, tokenize, logits,
                          module)


def load_hf_classifier(folder: Path) -> Any:
    """A Hugging Face sequence classifier saved in ``folder``, in eval mode."""
    from transformers import AutoModelForSequenceClassification

    from kdpipe.models.teacher import quiet_transformers

    try:
        with quiet_transformers():
            model = AutoModelForSequenceClassification.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise KdpipeError(f"{folder}: cannot load the teacher: {first}") from None
    return model.eval()


def predict_logits(model: ModelUnderTest, texts: Sequence[str], batch_size: int,
                   advance: Callable[[], None] | None = None) -> np.ndarray:
    """``model``'s logits (n, C) for every text, in batches of similar length (so little
    padding is computed), rows put back in the order of ``texts``."""
    order = np.argsort([len(t) for t in texts], kind="stable")
    out = np.zeros((len(texts), model.num_labels), np.float32)
    for start in range(0, len(order), batch_size):
        rows = order[start: start + batch_size]
        out[rows] = model.logits([texts[i] for i in rows])
        if advance is not None:
            advance()
    return out


def folder_bytes(folder: Path) -> int:
    """Bytes of every file under ``folder`` (what shipping the model folder costs)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def onnx_parameter_count(path: Path) -> int:
    """Elements of every initializer (dense and sparse) of the ONNX file's main graph:
    weights, biases, and for a quantized model its int8 weights plus scales and zero
    points."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    dense = sum(int(np.prod(t.dims, dtype=np.int64)) for t in graph.initializer)
    sparse = sum(int(np.prod(s.values.dims, dtype=np.int64))  # the values stored
                 for s in graph.sparse_initializer)
    return dense + sparse
