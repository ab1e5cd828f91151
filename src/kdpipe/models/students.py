"""Student models by name: build one from ``StudentConfig`` (optionally started from the
teacher's weights), save it, load it back without the teacher.

Every student reads the teacher tokenizer's ``input_ids`` and ``attention_mask`` (B, L), so
there is no vocabulary to map, and returns a ``StudentOutput``. A saved student is a folder:
``model.safetensors`` (the state dict) and ``student.json`` (everything needed to rebuild
the module: arch, the student config, label count, vocabulary size, pad id, and for the
transformer its BERT config and which teacher layers it came from).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from pydantic import ValidationError
from torch import Tensor, nn

from kdpipe.atomic import atomic_dir
from kdpipe.config import StudentConfig
from kdpipe.errors import KdpipeError
from kdpipe.models.teacher import quiet_transformers

WEIGHTS_FILE = "model.safetensors"
RECORD_FILE = "student.json"
RECORD_FORMAT = 1
# Reads a weights file into a built student (see load_student).
LoadWeights = Callable[[nn.Module, Path], None]


class StudentOutput(NamedTuple):
    """What every student returns.

    logits: (B, num_labels). features: (B, feature_dim), the pooled vector the classifier
    reads (feature alignment, CRD). hidden_states: (embeddings, layer 1, …, layer N), each
    (B, L, hidden_size), for the transformer student; None for the others.
    """

    logits: Tensor
    features: Tensor
    hidden_states: tuple[Tensor, ...] | None = None


# The architecture modules import StudentOutput from here, so they come after it; the
# builders below only reach into them when called, so either side may be imported first.
from kdpipe.models import bilstm, textcnn, tiny_transformer  # noqa: E402


@dataclass(frozen=True)
class Arch:
    """How to make one architecture.

    ``shape(cfg, num_labels, teacher_dir)``: what the teacher decides about the module's
    shape, saved in student.json so loading needs no teacher. ``make(cfg, record)``: the
    module, randomly initialised, from the config and the record. ``init(model, record,
    teacher_dir)``: copy the teacher's weights in (``cfg.init_from_teacher``).
    """

    shape: Callable[[StudentConfig, int, Path], dict[str, Any]]
    make: Callable[[StudentConfig, dict[str, Any]], nn.Module]
    init: Callable[[nn.Module, dict[str, Any], Path], None]


def _no_shape(cfg: StudentConfig, num_labels: int, teacher_dir: Path) -> dict[str, Any]:
    return {}


def _make_textcnn(cfg: StudentConfig, record: dict[str, Any]) -> nn.Module:
    return textcnn.TextCNN(record["vocab_size"], cfg.embedding_dim, record["pad_id"],
                           cfg.textcnn.filter_sizes, cfg.textcnn.num_filters,
                           record["num_labels"], cfg.dropout)


def _make_bilstm(cfg: StudentConfig, record: dict[str, Any]) -> nn.Module:
    return bilstm.BiLSTM(record["vocab_size"], cfg.embedding_dim, record["pad_id"],
                         cfg.bilstm.hidden_size, cfg.bilstm.layers, record["num_labels"],
                         cfg.dropout)


def _transformer_shape(cfg: StudentConfig, num_labels: int,
                       teacher_dir: Path) -> dict[str, Any]:
    config, layers = tiny_transformer.student_bert_config(
        teacher_dir, cfg.transformer.teacher_layers, num_labels, cfg.dropout)
    return {"teacher_layers": layers, "bert_config": config.to_dict()}


def _make_transformer(cfg: StudentConfig, record: dict[str, Any]) -> nn.Module:
    from transformers import BertConfig

    config = BertConfig.from_dict(record["bert_config"])
    if record["vocab_size"] > config.vocab_size:
        raise KdpipeError(f"vocabulary of {record['vocab_size']} tokens does not fit the "
                          f"teacher's embeddings ({config.vocab_size} rows)")
    return tiny_transformer.TinyTransformer(config)


def _copy_transformer(model: nn.Module, record: dict[str, Any], teacher_dir: Path) -> None:
    tiny_transformer.copy_teacher(model, teacher_dir, record["teacher_layers"])


def _copy_word_embeddings(model: nn.Module, record: dict[str, Any], teacher_dir: Path) -> None:
    weight = model.embedding.weight
    rows = teacher_word_embeddings(teacher_dir, weight.shape[1], record["student"]["init_layer"])
    if rows.shape[0] < weight.shape[0]:
        raise KdpipeError(f"vocabulary of {weight.shape[0]} tokens does not fit the teacher's "
                          f"embeddings ({rows.shape[0]} rows) in {teacher_dir}")
    with torch.no_grad():
        weight.copy_(rows[: weight.shape[0]])
        weight[record["pad_id"]] = 0  # padding_idx: the pad row stays zero (and gets no grad)


STUDENTS: dict[str, Arch] = {
    "textcnn": Arch(shape=_no_shape, make=_make_textcnn, init=_copy_word_embeddings),
    "bilstm": Arch(shape=_no_shape, make=_make_bilstm, init=_copy_word_embeddings),
    "transformer": Arch(shape=_transformer_shape, make=_make_transformer,
                        init=_copy_transformer),
}


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
              **arch.shape(cfg, num_labels, Path(teacher_dir))}
    model = arch.make(cfg, record)
    if cfg.init_from_teacher:
        arch.init(model, record, Path(teacher_dir))
    model.student_record = record
    return model


def teacher_word_embeddings(teacher_dir: Path, dim: int, layer: int = 0) -> Tensor:
    """One vector per teacher vocabulary token (``teacher_token_vectors`` at ``layer``),
    brought to (vocab, ``dim``).

    Narrower: PCA onto the top ``dim`` components. Same width: as is. Wider: as is, with zero
    columns after (learned in training). Then one scale for the whole matrix sets the std
    of the teacher's part to 1: BERT's raw embeddings (std ~0.05) are rescaled by a LayerNorm
    inside BERT, which these students lack. Std 1 is what ``nn.Embedding`` draws without the
    teacher, so both starts feed the same scale to layers whose default init assumes it,
    and one learning rate fits both. A single scale keeps the geometry (every dot-product
    ratio); per-dimension whitening would blow weak noise directions up to full size.
    """
    matrix = teacher_token_vectors(teacher_dir, layer)
    if dim < matrix.shape[1]:
        matrix = pca_project(matrix, dim)
    matrix = matrix / matrix.std()
    if dim > matrix.shape[1]:
        matrix = torch.nn.functional.pad(matrix, (0, dim - matrix.shape[1]))
    return matrix


# Tokens per forward pass of teacher_token_vectors: ~10 s for MiniLM's 30,522 to layer 3.
TOKEN_BATCH = 1024


def teacher_token_vectors(teacher_dir: Path, layer: int) -> Tensor:
    """(vocab, hidden) float32: a vector for every row of the teacher's input embeddings.

    ``layer`` 0: the word-embedding matrix itself. ``layer`` k >= 1: the hidden state after
    teacher layer k at the token's position when the token is run alone between the
    tokenizer's special tokens (``[CLS] token [SEP]`` for BERT). Those states already went
    through k layers of the fine-tuned teacher, so they carry what the task made of each
    word; a word-embedding layer can hold only one vector per token, so the context-free
    state is the one it can take. On SST-2 the middle layer gave the TextCNN +1.1 points on
    validation but -0.2 on test over the raw matrix (4 seeds, docs/benchmarks.md), so 0
    stays the default.
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from kdpipe.progress import progress_bar  # training only: served models lack rich

    depth = AutoConfig.from_pretrained(teacher_dir).num_hidden_layers
    if not 0 <= layer <= depth:
        raise KdpipeError(f"student.init_layer {layer}: the teacher in {teacher_dir} has "
                          f"{depth} layers (0 is its word embeddings)")
    # Only the first ``layer`` layers are loaded: the ones after it would run for nothing.
    with quiet_transformers():
        teacher = AutoModel.from_pretrained(teacher_dir,
                                            num_hidden_layers=max(layer, 1)).eval()
    embeddings = teacher.get_input_embeddings().weight.detach().float()
    if layer == 0:
        return embeddings
    template, position = _one_token_template(AutoTokenizer.from_pretrained(teacher_dir))
    vocab = embeddings.shape[0]
    ids = torch.tensor(template).repeat(vocab, 1)
    ids[:, position] = torch.arange(vocab)
    rows = []
    with torch.inference_mode(), progress_bar() as progress:
        task = progress.add_task(f"teacher layer {layer} per token", total=vocab)
        for chunk in ids.split(TOKEN_BATCH):
            states = teacher(input_ids=chunk, attention_mask=torch.ones_like(chunk),
                             output_hidden_states=True).hidden_states
            rows.append(states[layer][:, position].float())
            progress.advance(task, len(chunk))
    return torch.cat(rows)


def _one_token_template(tokenizer: Any) -> tuple[list[int], int]:
    """The ids the tokenizer gives a one-token text, special tokens included, and where the
    token sits. Read from an encoding: transformers 5 tokenizers no longer have
    ``build_inputs_with_special_tokens``."""
    ids = tokenizer("a")["input_ids"]
    special = tokenizer.get_special_tokens_mask(ids, already_has_special_tokens=True)
    plain = [i for i, flag in enumerate(special) if not flag]
    if len(plain) != 1:
        raise KdpipeError(f"student.init_layer: the teacher's tokenizer splits 'a' into "
                          f"{len(plain)} tokens; use student.init_layer=0")
    return ids, plain[0]


def pca_project(matrix: Tensor, dim: int) -> Tensor:
    """Rows of ``matrix`` (N, H), centred, on its top ``dim`` <= H principal components:
    (N, dim), deterministic (``principal_components``)."""
    center, components = principal_components(matrix, dim)
    return ((matrix.double() - center) @ components.T).to(matrix.dtype)


def principal_components(matrix: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """The mean (H,) of the rows of ``matrix`` (N, H) and its top ``dim`` principal components
    (dim, H), float64. Each component's sign is fixed (its largest-magnitude coordinate
    positive), as an SVD may return either sign."""
    center = matrix.double().mean(0)
    _, _, vh = torch.linalg.svd(matrix.double() - center, full_matrices=False)
    components = vh[:dim]
    signs = components.gather(1, components.abs().argmax(1, keepdim=True)).sign()
    return center, components * signs


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
    # Building draws initial weights that the file then replaces; keep the caller's RNG as is.
    with torch.random.fork_rng(devices=[]):
        try:
            model = STUDENTS[cfg.arch].make(cfg, record)
        except (KeyError, TypeError, ValueError) as exc:
            raise KdpipeError(f"{record_path}: cannot rebuild the {cfg.arch} student "
                              f"({type(exc).__name__}: {_first_line(exc)})") from None
    try:
        (load_weights or strict_load)(model, weights_path)
    except (SafetensorError, RuntimeError, OSError) as exc:
        raise KdpipeError(f"{weights_path}: cannot load weights: {_first_line(exc)}") from None
    model.student_record = record
    return model.eval()


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
