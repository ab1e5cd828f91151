"""The student interface: what pruning, export, trained rows and the registry ask of a
student, answered by the student itself (as Hugging Face models answer
``get_input_embeddings`` and ``prune_heads``).

Every student reads the teacher tokenizer's ``input_ids`` and ``attention_mask`` (B, L)
and returns a ``StudentOutput``. The class attribute ``arch`` is its name in
``student.arch``; ``kdpipe.models.students`` builds, saves and loads students by it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

from torch import Tensor, nn

from kdpipe.config import StudentConfig
from kdpipe.errors import KdpipeError


class StudentOutput(NamedTuple):
    """What every student returns.

    logits: (B, num_labels). features: (B, feature_dim), the pooled vector the classifier
    reads (feature alignment, CRD). hidden_states: (embeddings, layer 1, …, layer N), each
    (B, L, hidden_size), for the transformer student; None for the others. attentions: per
    layer (B, heads, L, L), when asked for with ``return_attentions``; else None.
    """

    logits: Tensor
    features: Tensor
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None


class Student(nn.Module):
    """A student architecture. Subclasses set ``arch``, build their layers in ``from_record``
    and override what differs from a student with its own word embedding ``self.embedding``
    (the default for the embedding methods and ``init_from_teacher``).

    ``student_record``: what student.json holds (arch, the student config, label count,
    vocabulary size, pad id, and what ``teacher_shape`` added); a structural change
    (``shrink``, ``set_input_embeddings``) keeps it true. ``feature_dim``: width of
    ``StudentOutput.features``.
    """

    arch: ClassVar[str]
    student_record: dict[str, Any]
    feature_dim: int
    embedding: nn.Embedding

    # ---- building

    @classmethod
    def teacher_shape(cls, cfg: StudentConfig, num_labels: int,
                      teacher_dir: Path) -> dict[str, Any]:
        """What the teacher decides about the module's shape, saved in student.json so that
        loading needs no teacher."""
        return {}

    @classmethod
    def from_record(cls, cfg: StudentConfig, record: dict[str, Any]) -> Student:
        """The module, randomly initialised, from the config and the record."""
        raise NotImplementedError

    def init_from_teacher(self, teacher_dir: Path) -> None:
        """Copy the teacher's weights in (``student.init_from_teacher``): by default its
        word embeddings, brought to this student's width (``teacher_vectors``)."""
        from kdpipe.models.teacher_vectors import copy_word_embeddings

        copy_word_embeddings(self.embedding, self.student_record, teacher_dir)

    # ---- its word embedding (vocabulary pruning, trained rows)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embedding

    def set_input_embeddings(self, embedding: nn.Embedding) -> None:
        """Replace the word embedding (a pruned or row-restricted one). The record's
        vocabulary size and pad id are the caller's to set: a restricted embedding keeps
        them."""
        self.embedding = embedding

    def forward_ids(self, input_ids: Tensor, original_ids: Tensor,
                    attention_mask: Tensor) -> StudentOutput:
        """``forward`` behind a pruned vocabulary: ``input_ids`` renumbered for the shrunk
        word embedding, ``original_ids`` as the tokenizer gave them, for a student that
        reads more than its word rows from them (the fast student hashes its bigrams)."""
        return self(input_ids, attention_mask)

    def row_tables(self, token_ids: Iterable[Sequence[int]]) -> dict[str, Any]:
        """Each embedding table of the student (attribute name) and the rows each text of
        ``token_ids`` reads from it: distill trains only rows that are read
        (``kdpipe.training.trained_rows``). By default the word embedding alone, named
        ``"embedding"`` (``get_input_embeddings``)."""
        return {"embedding": token_ids}

    # ---- attention transfer

    def return_attentions(self, on: bool) -> None:
        """From now on, also return the attention maps (``StudentOutput.attentions``)."""
        raise KdpipeError(f"student.arch {self.arch!r} has no attention maps; attention "
                          "transfer needs student.arch=transformer")

    # ---- structured pruning

    def shrink(self, fraction: float) -> None:
        """Remove the lowest-L1 ``fraction`` of the prunable units (at least one per group)
        by building smaller layers; the record follows the new sizes."""
        raise NotImplementedError

    def sizes(self) -> dict[str, Any]:
        """The prunable sizes, for reports and pruning.json."""
        raise NotImplementedError

    def reshape(self, sizes: dict[str, Any]) -> None:
        """Give a freshly built student the saved ``sizes`` where student.json cannot say
        them, before its weights are loaded. By default the record says them all."""

    # ---- export

    @contextlib.contextmanager
    def export_form(self) -> Iterator[None]:
        """Within the block, this module (a copy made for export) computes the same logits
        in a form that traces to fast ONNX. By default it already does."""
        yield
