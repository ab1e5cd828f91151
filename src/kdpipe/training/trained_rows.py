"""Train only the word-embedding rows that the transfer set can reach.

A distilled student's embedding is the teacher's vocabulary wide (30,522 rows for BERT), yet
SST-2's training texts hold 11,572 distinct tokens. The rows of the others never receive a
gradient, but the backward pass, gradient clipping and a dense optimizer still go over all
of them on every step (the saving, measured by ``bench/train_step.py``:
``docs/decisions.md#only-reachable-embedding-rows-are-trained``). ``RowSubsetEmbedding``
keeps the reachable rows as the trainable parameter and the rest as a frozen buffer;
``merge`` turns it back into a plain ``nn.Embedding`` before the student is saved.

The result is the same model a full-table run trains (the unreached rows get zero gradient,
so Adam leaves them as they were; gradient clipping sees the same norm) provided there is no
weight decay, which would shrink them: distill therefore restricts only when
``distill.weight_decay`` is 0 (the default). torch's ``sparse=True`` embeddings would also
avoid the dense update, but need SparseAdam (lazy moments: different training) and do not
work with ``clip_grad_norm_`` (no norm kernel for sparse tensors in torch 2.13).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from kdpipe.models.base import Student

WORDS = "embedding"  # Student.row_tables' name for the word embedding


class RowSubsetEmbedding(nn.Module):
    """``embedding`` with only the rows of ``trained`` ids as a parameter (``weight``); the
    others, the padding row included, read a frozen copy (``frozen``)."""

    def __init__(self, embedding: nn.Embedding, trained: Tensor) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = embedding.weight.shape
        self.padding_idx = embedding.padding_idx
        full = embedding.weight.detach()
        slot = torch.full((self.num_embeddings,), -1, dtype=torch.long, device=full.device)
        slot[trained] = torch.arange(trained.numel(), device=full.device)
        self.register_buffer("slot", slot)
        self.register_buffer("frozen", full.clone())
        self.weight = nn.Parameter(full[trained].clone())

    def forward(self, input_ids: Tensor) -> Tensor:
        slot = self.slot[input_ids]
        trained = nn.functional.embedding(slot.clamp(min=0), self.weight)
        frozen = nn.functional.embedding(input_ids, self.frozen)
        return torch.where((slot >= 0).unsqueeze(-1), trained, frozen)

    def merged(self) -> nn.Embedding:
        """The whole table as a plain embedding: the frozen rows with the trained ones in."""
        full = self.frozen.clone()
        rows = (self.slot >= 0).nonzero().flatten()
        full[rows] = self.weight.detach()[self.slot[rows]]
        merged = nn.Embedding(self.num_embeddings, self.embedding_dim,
                              padding_idx=self.padding_idx, _weight=full)
        return merged.to(self.weight.device)


def reachable_ids(token_ids: Iterable[Sequence[int]], padding_idx: int | None) -> Tensor:
    """Sorted distinct ids in ``token_ids``, without the padding id (its row gets no
    gradient in ``nn.Embedding`` either)."""
    seen = {i for ids in token_ids for i in ids}
    return torch.tensor(sorted(seen - {padding_idx}), dtype=torch.long)


def restrict(student: Student, token_ids: Iterable[Sequence[int]]) -> None:
    """Make only the rows that the texts ``token_ids`` read trainable, in each of
    ``student``'s embedding tables (``Student.row_tables``: the word embedding, and the
    fast student's bigram table)."""
    for name, rows in student.row_tables(token_ids).items():
        embedding = _table(student, name)
        _set_table(student, name, RowSubsetEmbedding(
            embedding, reachable_ids(rows, embedding.padding_idx)))


def merge(student: Student) -> Student:
    """``student`` with plain embeddings again (in place; returned for chaining)."""
    for name in student.row_tables([]):
        embedding = _table(student, name)
        if isinstance(embedding, RowSubsetEmbedding):
            _set_table(student, name, embedding.merged())
    return student


def _table(student: Student, name: str) -> nn.Module:
    # The word embedding through the student's accessor: the transformer's sits inside BERT.
    return student.get_input_embeddings() if name == WORDS else getattr(student, name)


def _set_table(student: Student, name: str, table: nn.Module) -> None:
    if name == WORDS:
        student.set_input_embeddings(table)  # type: ignore[arg-type]
    else:
        setattr(student, name, table)
