"""The fast student (``student.arch: fast``): a bag of token and hashed token-bigram
embeddings, averaged, into a small MLP — fastText's model (Joulin et al. 2017), distilled.

Why this shape: a served call of the BiLSTM student is mostly its recurrent kernel; a bag
has no sequential work, so a call costs two table lookups, a sum and two small matrix
products, and the tokenizer (the word cache: ``kdpipe.serving.word_cache``) dominates. The
bigrams give back some word order (fastText's ``wordNgrams 2``: "not good" is not "good").

It reads the teacher tokenizer's ids like every student, so the soft labels, the augmented
transfer set and every distill loss apply unchanged, and its word table starts from the
teacher's (``student.init_from_teacher``). A bigram of adjacent real tokens ``(a, b)`` reads
row ``(a * BIGRAM_PRIME + b) mod buckets`` of a second table; hashing, as fastText does,
bounds the table whatever the data. The hash is of the tokenizer's original ids: a pruned
vocabulary renumbers the word rows, not the bigrams (``forward_ids``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdpipe.config import StudentConfig
from kdpipe.errors import KdpipeError
from kdpipe.models.base import Student, StudentOutput
from kdpipe.models.surgery import kept_count, linear_columns, linear_rows, strongest

# A prime above any tokenizer's vocabulary (so (a, b) -> a * P + b is one-to-one before the
# modulo) and small enough that a * P + b stays far inside int64 for ids < 2**31.
BIGRAM_PRIME = 1_000_003


def bigram_buckets(ids: Sequence[int], buckets: int) -> list[int]:
    """The bigram rows a text's ids read (the same hash as the module's, in Python)."""
    return [(a * BIGRAM_PRIME + b) % buckets for a, b in zip(ids, ids[1:], strict=False)]


class BagOfNgrams(Student):
    """Mean of the word rows of a text's tokens and the bigram rows of its adjacent token
    pairs → (Linear → ReLU, when ``hidden_size`` > 0) → dropout → Linear.

    ``forward(input_ids, attention_mask)``: both (B, L), right-padded, mask 1 for real
    tokens. Returns ``StudentOutput(logits, features, None)``; ``features`` is what the
    classifier reads: the hidden layer's output, or the mean itself without one. Padding
    adds nothing, so extra padding does not change the output.
    """

    arch = "fast"

    @classmethod
    def from_record(cls, cfg: StudentConfig, record: dict[str, Any]) -> BagOfNgrams:
        return cls(record["vocab_size"], cfg.embedding_dim, record["pad_id"],
                   cfg.fast.buckets, cfg.fast.hidden_size, record["num_labels"], cfg.dropout)

    def __init__(self, vocab_size: int, embedding_dim: int, pad_id: int, buckets: int,
                 hidden_size: int, num_labels: int, dropout: float) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_dim, padding_idx=pad_id)
        self.bigrams = nn.Embedding(buckets, embedding_dim) if buckets else None
        if self.bigrams is not None:
            # fastText's start: uniform in +-1/dim, small beside the teacher-initialised word
            # rows (std 1), so the words decide the first steps.
            nn.init.uniform_(self.bigrams.weight, -1 / embedding_dim, 1 / embedding_dim)
        self.hidden = nn.Linear(embedding_dim, hidden_size) if hidden_size else None
        self.feature_dim = hidden_size or embedding_dim
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(self.feature_dim, num_labels)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> StudentOutput:
        return self.forward_ids(input_ids, input_ids, attention_mask)

    def forward_ids(self, input_ids: Tensor, original_ids: Tensor,
                    attention_mask: Tensor) -> StudentOutput:
        """``forward`` where the word rows are read at ``input_ids`` (renumbered by a pruned
        vocabulary) and the bigrams hashed from ``original_ids`` (the tokenizer's)."""
        mask = attention_mask.to(self.embedding.weight.dtype)
        total = (self.embedding(input_ids) * mask.unsqueeze(-1)).sum(1)
        count = mask.sum(1)
        if self.bigrams is not None:
            pairs = mask[:, :-1] * mask[:, 1:]
            rows = torch.remainder(original_ids[:, :-1] * BIGRAM_PRIME + original_ids[:, 1:],
                                   self.bigrams.num_embeddings)
            total = total + (self.bigrams(rows) * pairs.unsqueeze(-1)).sum(1)
            count = count + pairs.sum(1)
        features = total / count.clamp(min=1).unsqueeze(-1)
        if self.hidden is not None:
            features = F.relu(self.hidden(self.dropout(features)))
        return StudentOutput(self.classifier(self.dropout(features)), features, None)

    def row_tables(self, token_ids: Iterable[Sequence[int]]) -> dict[str, list[list[int]]]:
        texts = [list(ids) for ids in token_ids]
        tables = {"embedding": texts}
        if self.bigrams is not None:
            buckets = self.bigrams.num_embeddings
            tables["bigrams"] = [bigram_buckets(ids, buckets) for ids in texts]
        return tables

    def shrink(self, fraction: float) -> None:
        """Remove the weakest hidden units (L1 of their input and output weights)."""
        if self.hidden is None:
            raise KdpipeError("prune.structured_fraction > 0 with student.arch fast needs "
                              "student.fast.hidden_size > 0 (its hidden units are what "
                              "structured pruning removes)")
        scores = (self.hidden.weight.detach().abs().sum(1)
                  + self.classifier.weight.detach().abs().sum(0))
        rows = strongest(scores, kept_count(self.hidden.out_features, fraction))
        self.hidden = linear_rows(self.hidden, rows)
        self.classifier = linear_columns(self.classifier, rows)
        self.feature_dim = rows.numel()
        self.student_record["student"]["fast"]["hidden_size"] = rows.numel()

    def sizes(self) -> dict[str, Any]:
        return {"hidden_size": self.hidden.out_features if self.hidden is not None else 0,
                "buckets": self.bigrams.num_embeddings if self.bigrams is not None else 0}


def serving_tables(model: nn.Module) -> dict[str, Any]:
    """What ``kdpipe.serving.bag_numpy`` serves, as float32 numpy arrays, from a fast student
    or a pruned one (``PrunedStudent``).

    The first linear layer after the mean (the hidden layer, or the classifier without one)
    is folded into the tables: the mean of rows times a matrix is the mean of the rows times
    it, so ``words`` holds each tokenizer id's word row (a pruned vocabulary's renumbering
    and low-rank rows applied) times that layer, ``bigrams`` each bucket's, and serving
    skips that product. Then ``hidden.bias``, ``classifier.weight`` and ``classifier.bias``
    with a hidden layer; ``classifier.bias`` alone without.
    """
    remap = getattr(model, "vocab_remap", None)
    student: BagOfNgrams = getattr(model, "student", model)
    embedding = student.get_input_embeddings()
    ids = torch.arange(embedding.num_embeddings if remap is None else remap.numel())
    first = student.hidden if student.hidden is not None else student.classifier
    with torch.no_grad():
        rows = {"words": embedding(ids if remap is None else remap[ids])}
        if student.bigrams is not None:
            rows["bigrams"] = student.bigrams.weight
        tables = {name: table.double() @ first.weight.double().T for name, table in rows.items()}
        if student.hidden is not None:
            tables["hidden.bias"] = student.hidden.bias
            tables["classifier.weight"] = student.classifier.weight
        tables["classifier.bias"] = student.classifier.bias
        return {name: t.detach().float().contiguous().numpy() for name, t in tables.items()}
