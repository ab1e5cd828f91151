"""Student models by name (``STUDENTS``): build one from ``StudentConfig`` (optionally
started from the teacher's weights), save it, load it back without the teacher.

Every student is a ``kdpipe.models.base.Student``: it reads the teacher tokenizer's
``input_ids`` and ``attention_mask`` (B, L), so there is no vocabulary to map, and returns
a ``StudentOutput``. A saved student is a folder:
``model.safetensors`` (the state dict) and ``student.json`` (everything needed to rebuild
the module: arch, the student config, label count, vocabulary size, pad id, and for the
transformer its BERT config and which teacher layers it came from).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

from kdpipe.atomic import atomic_dir
from kdpipe.config import StudentConfig
from kdpipe.errors import KdpipeError
from kdpipe.models.bag import BagOfNgrams
from kdpipe.models.base import Student
from kdpipe.models.bilstm import BiLSTM
from kdpipe.models.textcnn import TextCNN
from kdpipe.models.tiny_transformer import TinyTransformer

WEIGHTS_FILE = "model.safetensors"
RECORD_FILE = "student.json"
RECORD_FORMAT = 1
# Reads a weights file into a built student (see load_student).
LoadWeights = Callable[[nn.Module, Path], None]


STUDENTS: dict[str, type[Student]] = {
    cls.arch: cls for cls in (TextCNN, BiLSTM, TinyTransformer, BagOfNgrams)}


def build_student(cfg: StudentConfig, num_labels: int, teacher_dir: Path, pad_id: int,
                  vocab_size: int) -> nn.Module:
    """A new student of ``cfg.arch`` in train mode, reading token ids < ``vocab_size``.

    With ``cfg.init_from_teacher`` its word embeddings (textcnn, bilstm) or its embeddings,
    layers and head (transformer) start from the teacher in ``teacher_dir``; everything else
    is drawn from torch's global RNG: seed it first for a reproducible start. The transformer
    always takes its shape from the teacher's config.
    """
    arch = STUDENTS[cfg.arch]
    record = {"format": RECORD_FORMAT, "arch": cfg.arch, "student": cfg.model_dump(mode="json"),
              "num_labels": num_labels, "vocab_size": vocab_size, "pad_id": pad_id,
              **arch.teacher_shape(cfg, num_labels, Path(teacher_dir))}
    model = arch.from_record(cfg, record)
    model.student_record = record
    if cfg.init_from_teacher:
        model.init_from_teacher(Path(teacher_dir))
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (a shared tensor counted once)."""
    return sum(param.numel() for param in model.parameters())


def save_student(model: nn.Module, folder: Path) -> None:
    """Write ``folder`` (replaced whole, atomically): model.safetensors + student.json.

    ``model`` must come from ``build_student`` or ``load_student`` (it carries the record).
    Shared tensors are stored once (safetensors' ``save_model``) and re-tied on load.
    """
    from safetensors.torch import save_model

    record = getattr(model, "student_record", None)
    if record is None:
        raise ValueError("save_student: model has no student_record; make it with "
                         "build_student or load_student")
    with atomic_dir(Path(folder)) as tmp:
        # One metadata key only: safetensors writes several in hash order, so the same
        # weights would give different bytes and DVC would rerun every later stage.
        save_model(model, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def load_student(folder: Path, load_weights: LoadWeights | None = None) -> nn.Module:
    """The student saved in ``folder``, in eval mode; needs no teacher folder.
    ``load_weights(model, path)``: reads the weights file into the built module (default:
    safetensors' strict ``load_model``; ``kdpipe.compression.torch_int8`` passes its int8 reader).

    Raises ``KdpipeError`` naming the file when student.json or model.safetensors is
    missing, unreadable or does not describe the same module.
    """
    from safetensors import SafetensorError

    record_path = Path(folder) / RECORD_FILE
    weights_path = Path(folder) / WEIGHTS_FILE
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        cfg = StudentConfig.model_validate(record["student"])
    except FileNotFoundError:
        raise KdpipeError(f"{record_path}: not found; is {folder} a saved student?") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError,
            ValidationError) as exc:
        raise KdpipeError(f"{record_path}: not a readable student record "
                          f"({type(exc).__name__}: {_first_line(exc)})") from None
    if not weights_path.is_file():
        raise KdpipeError(f"{weights_path}: not found; the student in {folder} is incomplete")
    try:
        model = rebuild_student(cfg, record)
    except (KeyError, TypeError, ValueError) as exc:
        raise KdpipeError(f"{record_path}: cannot rebuild the {cfg.arch} student "
                          f"({type(exc).__name__}: {_first_line(exc)})") from None
    try:
        (load_weights or strict_load)(model, weights_path)
    except (SafetensorError, RuntimeError, OSError) as exc:
        raise KdpipeError(f"{weights_path}: cannot load weights: {_first_line(exc)}") from None
    return model.eval()


def rebuild_student(cfg: StudentConfig, record: dict[str, Any]) -> Student:
    """The module ``record`` (a student.json) describes, its weights not yet loaded. Building
    draws initial weights that a file then replaces: the caller's RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        model = STUDENTS[cfg.arch].from_record(cfg, record)
    model.student_record = record
    return model


def strict_load(model: nn.Module, path: Path) -> None:
    """Read the safetensors file ``path`` into ``model``; every tensor must fit."""
    from safetensors.torch import load_model

    load_model(model, path, strict=True)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def student_record(model: nn.Module) -> dict[str, Any]:
    """student.json of ``model``, or of the student inside it (a pruned model wraps one)."""
    for module in model.modules():
        if hasattr(module, "student_record"):
            return module.student_record
    raise KdpipeError(f"{type(model).__name__} holds no student record")


def load_student_tokenizer(student_dir: Path) -> Any:
    """The tokenizer distill saved beside the student (the folder has no model config.json,
    so ``kdpipe.models.teacher.load_tokenizer`` would refuse it)."""
    from transformers import AutoTokenizer

    from kdpipe.models.teacher import quiet_transformers

    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(student_dir)
    except (OSError, ValueError) as exc:
        raise KdpipeError(f"{student_dir}: no readable tokenizer beside the student "
                          f"({type(exc).__name__}); run `kdpipe distill` again") from None
