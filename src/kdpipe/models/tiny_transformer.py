"""Tiny transformer student: a shallower BERT built from the teacher's own config and
initialised from its weights, layer by chosen layer (as DistilBERT was from BERT)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from torch import Tensor, nn

from kdpipe.errors import KdpipeError
from kdpipe.models.students import StudentOutput
from kdpipe.models.teacher import quiet_transformers

if TYPE_CHECKING:  # transformers is slow to import; the functions import it when called
    from transformers import BertConfig


def every_other_layer(num_layers: int) -> list[int]:
    """Teacher layers 0, 2, 4, … (0-based): the default copy, e.g. [0, 2, 4] of 6."""
    return list(range(0, num_layers, 2))


def student_bert_config(teacher_dir: Path, teacher_layers: Sequence[int] | None,
                        num_labels: int, dropout: float) -> tuple[BertConfig, list[int]]:
    """The teacher's BERT config with one layer per chosen teacher layer, a ``num_labels``
    head and classifier dropout ``dropout``; and the chosen layers (0-based) resolved."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(teacher_dir)
    if config.model_type != "bert":
        raise KdpipeError(
            f"student.arch 'transformer' copies a BERT teacher; {teacher_dir} is "
            f"{config.model_type!r}: use student.arch textcnn or bilstm with this teacher")
    layers = (every_other_layer(config.num_hidden_layers) if teacher_layers is None
              else list(teacher_layers))
    if not layers or not all(0 <= i < config.num_hidden_layers for i in layers):
        raise KdpipeError(
            f"student.transformer.teacher_layers {layers}: need at least one layer, each in "
            f"0..{config.num_hidden_layers - 1} (the teacher has {config.num_hidden_layers})")
    config.num_hidden_layers = len(layers)
    config.architectures = ["BertForSequenceClassification"]
    config.num_labels = num_labels
    config.classifier_dropout = dropout
    return config, layers


class TinyTransformer(nn.Module):
    """A ``BertForSequenceClassification`` (pooler + classifier on [CLS]).

    ``forward(input_ids, attention_mask)``: both (B, L), mask 1 for real tokens. Returns
    ``StudentOutput(logits (B, num_labels), features (B, hidden_size), hidden_states)`` with
    hidden_states = (embeddings, layer 1, …, layer N), each (B, L, hidden_size).

    Features are the last layer's [CLS] state, the vector the head reads, rather than the
    pooler's tanh output: it lives in the same space as the teacher's cached [CLS] features,
    so feature alignment needs no projection for this student.
    """

    def __init__(self, config: BertConfig) -> None:
        from transformers import BertForSequenceClassification

        super().__init__()
        self.model = BertForSequenceClassification(config)
        self.hidden_size = self.feature_dim = config.hidden_size

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> StudentOutput:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         output_hidden_states=True)
        return StudentOutput(out.logits, out.hidden_states[-1][:, 0], out.hidden_states)


def copy_teacher(student: TinyTransformer, teacher_dir: Path,
                 teacher_layers: Sequence[int]) -> None:
    """Copy the teacher's embeddings, layer ``teacher_layers[i]`` into student layer ``i``,
    the pooler, and the classifier (a fine-tuned teacher's head when its label count matches;
    otherwise the freshly initialised one transformers makes)."""
    from transformers import AutoModelForSequenceClassification

    num_labels = student.model.config.num_labels
    with quiet_transformers():
        teacher = AutoModelForSequenceClassification.from_pretrained(
            teacher_dir, num_labels=num_labels, ignore_mismatched_sizes=True)
    source, target = teacher.bert, student.model.bert
    target.embeddings.load_state_dict(source.embeddings.state_dict())
    for mine, theirs in enumerate(teacher_layers):
        target.encoder.layer[mine].load_state_dict(source.encoder.layer[theirs].state_dict())
    target.pooler.load_state_dict(source.pooler.state_dict())
    student.model.classifier.load_state_dict(teacher.classifier.state_dict())
