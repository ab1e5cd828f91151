"""Pruning a student so that it really gets smaller, and the pruned folder format.

Three kinds, each a function that changes a ``PrunedStudent`` in place:

- ``prune_vocabulary``: keep only the word-embedding rows of tokens that occur in the training
  data (plus special tokens). The module still takes the ORIGINAL tokenizer ids: a buffer
  ``vocab_remap`` (old id -> new id; an id not kept maps to its nearest kept token's new id,
  to [UNK]'s, or to its own low-rank row in a ``FallbackEmbedding``) is applied first.
- ``prune_structure``: remove the lowest-L1 share of TextCNN filters (per width), BiLSTM hidden
  units (per layer and direction) or transformer attention heads and FFN neurons (per layer),
  building new, smaller modules from the kept rows and columns.
- ``prune_magnitude``: global magnitude pruning of Linear / Conv1d / LSTM weights
  (``torch.nn.utils.prune``), made permanent; the tensors keep their shapes, with zeros.

What differs between architectures (where the embedding is, how it shrinks, what its sizes
are) each student answers itself (``kdpipe.models.base.Student``). A pruned folder
(``save_pruned`` / ``write_pruned``, ``load_pruned``) holds:

- ``student/``: the inner student as ``save_student`` writes it (it reads NEW token ids, so it
  sits in a subfolder: ``load_student`` on the pruned folder itself fails instead of silently
  misreading the tokenizer's ids);
- ``vocab_remap.safetensors``: int64 ``vocab_remap`` (original vocabulary size,), when the
  vocabulary was pruned;
- ``pruning.json``: format, arch, the vocabulary kept and the structured sizes (what
  ``load_pruned`` needs to rebuild shapes the student record cannot express: the transformer's
  per-layer head counts).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import prune as torch_prune
from torch.nn.utils import skip_init

from kdpipe.atomic import atomic_dir
from kdpipe.config import StudentConfig
from kdpipe.errors import KdpipeError
from kdpipe.models.base import Student, StudentOutput
from kdpipe.models.students import (
    RECORD_FILE,
    WEIGHTS_FILE,
    LoadWeights,
    load_student,
    rebuild_student,
    save_student,
    strict_load,
)
from kdpipe.models.teacher_vectors import principal_components

PRUNING_FILE = "pruning.json"
VOCAB_REMAP_FILE = "vocab_remap.safetensors"
STUDENT_DIR = "student"
PRUNING_FORMAT = 1


class PrunedStudent(nn.Module):
    """A student that reads the original tokenizer's ids, whatever was pruned inside.

    ``forward(input_ids, attention_mask)``: both (B, L) with ids of the tokenizer the student
    was distilled with; returns the inner student's ``StudentOutput``. ``vocab_remap``: int64
    (original vocabulary size,) buffer, old id -> row of the shrunk embedding, or None when the
    vocabulary was not pruned.
    """

    def __init__(self, student: Student, vocab_remap: Tensor | None = None) -> None:
        super().__init__()
        self.student = student
        self.register_buffer("vocab_remap", vocab_remap)

    @property
    def arch(self) -> str:
        return self.student.student_record["arch"]

    @property
    def feature_dim(self) -> int:
        return self.student.feature_dim

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> StudentOutput:
        if self.vocab_remap is None:
            return self.student(input_ids, attention_mask)
        return self.student.forward_ids(self.vocab_remap[input_ids], input_ids, attention_mask)


# ---------------------------------------------------------------- vocabulary


def kept_token_ids(token_ids: Iterable[Sequence[int]], always: Iterable[int]) -> list[int]:
    """Sorted distinct ids that occur in ``token_ids`` (tokenized texts) or in ``always``
    (the tokenizer's special ids and [UNK])."""
    kept = set(always)
    for ids in token_ids:
        kept.update(ids)
    return sorted(kept)


def prune_vocabulary(model: PrunedStudent, kept: Sequence[int], unk_id: int,
                     nearest_among: Sequence[int] | None = None, own_rank: int = 0) -> None:
    """Shrink the word embedding to the rows ``kept`` (original ids, in their order) and set
    ``model.vocab_remap``. ``unk_id`` and the padding id must be kept (padding keeps its role
    under its new number). An original id not kept reads, with ``own_rank`` > 0, a rank-
    ``own_rank`` approximation of its own row (a ``FallbackEmbedding``); else the row of the
    id in ``nearest_among`` (a subset of ``kept``) whose embedding is closest to its own by
    cosine, or [UNK]'s row when ``nearest_among`` is None.

    Why not [UNK]: the student's rows for tokens absent from training still hold the
    teacher's (projected) embeddings, which place an unseen word near words of like meaning;
    [UNK] throws that away. Why its own row over the nearest word's: a third of SST-2's
    test texts hold a dropped token, and its own row, even cut to a low rank, lost less
    accuracy than the nearest word's
    (``docs/decisions.md#unseen-tokens-keep-their-own-row-at-rank-16``).
    """
    if own_rank and nearest_among:
        raise ValueError("prune_vocabulary: own_rank and nearest_among exclude each other")
    if model.vocab_remap is not None:
        raise ValueError("prune_vocabulary: the vocabulary is already pruned")
    old = model.student.get_input_embeddings()
    rows = torch.tensor(sorted(set(kept)), dtype=torch.long)
    if rows.numel() == 0 or rows[0] < 0 or rows[-1] >= old.num_embeddings:
        raise ValueError(f"kept ids must lie in 0..{old.num_embeddings - 1}")
    remap = torch.full((old.num_embeddings,), -1, dtype=torch.long)
    remap[rows] = torch.arange(rows.numel())
    for name, token in (("unknown", unk_id), ("padding", old.padding_idx)):
        if token is not None and remap[token] < 0:
            raise ValueError(f"the {name} token's id {token} must be among the kept ids")
    dropped = (remap < 0).nonzero().flatten()
    own = own_rank > 0 and dropped.numel() > 0
    if own:
        remap[dropped] = rows.numel() + torch.arange(dropped.numel())
    elif nearest_among is None or len(nearest_among) == 0:
        remap[dropped] = int(remap[unk_id])
    else:
        targets = torch.tensor(sorted(set(nearest_among)), dtype=torch.long)
        if (remap[targets] < 0).any():
            raise ValueError("nearest_among must be a subset of the kept ids")
        remap[dropped] = remap[targets[nearest_rows(old.weight.detach(), dropped, targets)]]
    pad = None if old.padding_idx is None else int(remap[old.padding_idx])
    if own:
        new = FallbackEmbedding(rows.numel(), old.embedding_dim, pad, dropped.numel(),
                                min(own_rank, old.embedding_dim, dropped.numel()),
                                device=old.weight.device, dtype=old.weight.dtype)
        new.fit_unseen(old.weight.detach()[dropped])
    else:
        new = skip_init(nn.Embedding, rows.numel(), old.embedding_dim, padding_idx=pad,
                        device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(old.weight[rows])
    model.student.set_input_embeddings(new)
    record = model.student.student_record
    record["vocab_size"] = rows.numel()
    if pad is not None:
        record["pad_id"] = pad
    model.vocab_remap = remap.to(old.weight.device)


class FallbackEmbedding(nn.Embedding):
    """A pruned word embedding that still has a row for every token: ``weight`` holds the
    kept tokens' rows (ids ``0..num_embeddings-1``, as ``nn.Embedding``); an id
    ``num_embeddings + j`` (the ``j``-th dropped token) reads ``unseen[j] @ basis + center``,
    a rank-``rank`` approximation (PCA) of that token's row before pruning.

    Why: a dropped token's row was never trained (the token is absent from the training data)
    and still holds the teacher's projected embedding, which is worth keeping; at rank 16 it
    costs 16 numbers per dropped token instead of ``embedding_dim``.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None,
                 unseen_rows: int, rank: int, device: Any = None, dtype: Any = None) -> None:
        super().__init__(num_embeddings, embedding_dim, padding_idx=padding_idx,
                         device=device, dtype=dtype)
        like = {"device": device, "dtype": dtype}
        # Parameters (counted, saved and exported as weights) that no training touches: the
        # dropped tokens are absent from the training data, and weight decay must not fade them.
        self.unseen = nn.Parameter(torch.zeros(unseen_rows, rank, **like), requires_grad=False)
        self.basis = nn.Parameter(torch.zeros(rank, embedding_dim, **like), requires_grad=False)
        self.center = nn.Parameter(torch.zeros(embedding_dim, **like), requires_grad=False)

    def fit_unseen(self, rows: Tensor) -> None:
        """Set ``unseen``, ``basis`` and ``center`` to the top principal components of
        ``rows`` (unseen_rows, embedding_dim)."""
        center, basis = principal_components(rows, self.basis.shape[0])
        self.unseen.copy_((rows.double() - center) @ basis.T)
        self.basis.copy_(basis)
        self.center.copy_(center)

    def forward(self, input_ids: Tensor) -> Tensor:
        kept = input_ids < self.num_embeddings
        rows = super().forward(torch.where(kept, input_ids, 0))
        # Clamped so that a kept id (read from ``rows``) indexes some valid unseen row.
        unseen = nn.functional.embedding((input_ids - self.num_embeddings).clamp(min=0),
                                         self.unseen)
        return torch.where(kept.unsqueeze(-1), rows, unseen @ self.basis + self.center)


def nearest_rows(weight: Tensor, queries: Tensor, targets: Tensor, chunk: int = 4096) -> Tensor:
    """For each row id in ``queries``, the index into ``targets`` of the row of ``weight``
    with the highest cosine similarity (chunked: 30k x 15k similarities would take 1.8 GB)."""
    unit = torch.nn.functional.normalize(weight.float(), dim=1)
    candidates = unit[targets].T
    best = [(unit[queries[i:i + chunk]] @ candidates).argmax(dim=1)
            for i in range(0, queries.numel(), chunk)]
    return torch.cat(best) if best else torch.empty(0, dtype=torch.long)


# ---------------------------------------------------------------- structured


def prune_structure(model: PrunedStudent, fraction: float) -> None:
    """Remove the lowest-L1 ``fraction`` of the student's units (at least one kept per
    group) by building smaller modules (``Student.shrink``); the student record follows."""
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction: expected in [0, 1), got {fraction}")
    model.student.shrink(fraction)


def structured_sizes(model: PrunedStudent) -> dict[str, Any]:
    """The arch's prunable sizes, e.g. ``{"num_filters": 100, "filter_sizes": [3, 4, 5]}``."""
    return model.student.sizes()


# ---------------------------------------------------------------- unstructured


def prunable_weights(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, parameter name) of every Linear / Conv1d weight and LSTM weight matrix:
    what magnitude pruning acts on. Embeddings, biases and LayerNorms are left alone."""
    found: list[tuple[nn.Module, str]] = []
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv1d)):
            found.append((module, "weight"))
        elif isinstance(module, nn.LSTM):
            found += [(module, name) for name, _ in module.named_parameters(recurse=False)
                      if name.startswith("weight_")]
    return found


def prune_magnitude(model: nn.Module, sparsity: float) -> None:
    """Zero the ``sparsity`` share (rounded to a count) of ``prunable_weights`` with the
    smallest magnitude, ranked across all of them together, and make it permanent (no
    ``*_orig`` parameter or ``*_mask`` buffer remains)."""
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity: expected in [0, 1), got {sparsity}")
    weights = prunable_weights(model)
    torch_prune.global_unstructured(weights, pruning_method=torch_prune.L1Unstructured,
                                    amount=sparsity)
    for module, name in weights:
        torch_prune.remove(module, name)
    for module in model.modules():
        if isinstance(module, nn.LSTM):
            module.flatten_parameters()  # new weight storage: re-pack for cuDNN (CPU: no-op)


def weight_sparsity(model: nn.Module) -> float:
    """Share of zeros among ``prunable_weights``."""
    tensors = [getattr(m, name) for m, name in prunable_weights(model)]
    total = sum(t.numel() for t in tensors)
    return sum(int((t == 0).sum()) for t in tensors) / max(total, 1)


# ---------------------------------------------------------------- counts


def parameter_counts(model: PrunedStudent) -> dict[str, int]:
    """``total`` parameters, ``embedding`` (the word embedding's, with a
    ``FallbackEmbedding``'s low-rank rows) and ``nonzero``."""
    params = list(model.parameters())
    return {"total": sum(p.numel() for p in params),
            "embedding": sum(p.numel() for p in
                             model.student.get_input_embeddings().parameters()),
            "nonzero": sum(int(p.count_nonzero()) for p in params)}


# ---------------------------------------------------------------- folder


def describe(model: PrunedStudent) -> dict[str, Any]:
    """What pruning.json records for ``model``."""
    remap = model.vocab_remap
    embedding = model.student.get_input_embeddings()
    vocabulary = None if remap is None else {
        "original_size": remap.numel(), "kept": embedding.num_embeddings}
    if isinstance(embedding, FallbackEmbedding):
        vocabulary.update(unseen_rows=embedding.unseen.shape[0], rank=embedding.unseen.shape[1])
    return {"format": PRUNING_FORMAT, "arch": model.arch, "vocabulary": vocabulary,
            "sizes": structured_sizes(model)}


def write_pruned(model: PrunedStudent, folder: Path) -> None:
    """Write ``model`` into the existing, empty ``folder`` (for use inside ``atomic_dir``):
    ``student/``, ``vocab_remap.safetensors`` (when the vocabulary was pruned), pruning.json."""
    from safetensors.torch import save_file

    folder = Path(folder)
    save_student(model.student, folder / STUDENT_DIR)
    if model.vocab_remap is not None:
        save_file({"vocab_remap": model.vocab_remap.contiguous().cpu()},
                  str(folder / VOCAB_REMAP_FILE), metadata={"format": "pt"})
    (folder / PRUNING_FILE).write_text(json.dumps(describe(model), indent=2) + "\n",
                                       encoding="utf-8")


def save_pruned(model: PrunedStudent, folder: Path) -> None:
    """Write ``folder`` (replaced whole, atomically) with ``write_pruned``."""
    with atomic_dir(Path(folder)) as tmp:
        write_pruned(model, tmp)


def load_pruned(folder: Path, load_weights: LoadWeights | None = None) -> PrunedStudent:
    """The pruned student saved in ``folder``, in eval mode, reading the original tokenizer's
    ids. Raises ``KdpipeError`` naming the file when something is missing or does not fit.
    ``load_weights``: as for ``load_student``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    description = _read_json(folder / PRUNING_FILE, "a pruned student folder")
    inner = folder / STUDENT_DIR
    record = _read_json(inner / RECORD_FILE, "a saved student")
    try:
        cfg = StudentConfig.model_validate(record["student"])
        student = rebuild_student(cfg, record)
        student.reshape(description["sizes"])
        if (description["vocabulary"] or {}).get("unseen_rows"):
            _use_fallback(student, description["vocabulary"])
        (load_weights or strict_load)(student, inner / WEIGHTS_FILE)
        remap = (load_file(folder / VOCAB_REMAP_FILE)["vocab_remap"]
                 if description["vocabulary"] else None)
    except (KeyError, TypeError, ValueError, RuntimeError, OSError, SafetensorError) as exc:
        raise KdpipeError(f"{folder}: cannot load the pruned student "
                          f"({type(exc).__name__}: {_first_line(exc)})") from None
    return PrunedStudent(student, remap).eval()


def _use_fallback(student: Student, vocabulary: dict[str, Any]) -> None:
    """Swap a freshly built student's embedding for an empty ``FallbackEmbedding`` of the
    saved shape, for its weights to be loaded into."""
    old = student.get_input_embeddings()
    student.set_input_embeddings(FallbackEmbedding(
        old.num_embeddings, old.embedding_dim, old.padding_idx, int(vocabulary["unseen_rows"]),
        int(vocabulary["rank"])))


def load_for_inference(folder: Path, load_weights: LoadWeights | None = None) -> nn.Module:
    """The model of a distill or a prune output folder, in eval mode; either way it reads the
    original tokenizer's ids (a pruned folder is the one with pruning.json).
    ``load_weights``: as for ``load_student``."""
    if (Path(folder) / PRUNING_FILE).is_file():
        return load_pruned(folder, load_weights)
    return load_student(folder, load_weights)


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KdpipeError(f"{path}: not found; is {path.parent} {what}?") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KdpipeError(f"{path}: unreadable ({type(exc).__name__})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
