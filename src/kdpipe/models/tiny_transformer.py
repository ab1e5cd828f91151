"""Tiny transformer student: a shallower BERT built from the teacher's own config and
initialised from its weights, layer by chosen layer (as DistilBERT was from BERT)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from kdpipe.config import StudentConfig
from kdpipe.errors import KdpipeError
from kdpipe.models.base import Student, StudentOutput
from kdpipe.models.surgery import kept_count, linear_columns, linear_rows, strongest
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


class TinyTransformer(Student):
    """A ``BertForSequenceClassification`` (pooler + classifier on [CLS]).

    ``forward(input_ids, attention_mask)``: both (B, L), mask 1 for real tokens. Returns
    ``StudentOutput(logits (B, num_labels), features (B, hidden_size), hidden_states)`` with
    hidden_states = (embeddings, layer 1, …, layer N), each (B, L, hidden_size).

    Features are the last layer's [CLS] state, the vector the head reads, rather than the
    pooler's tanh output: it lives in the same space as the teacher's cached [CLS] features,
    so feature alignment needs no projection for this student.
    """

    arch = "transformer"

    @classmethod
    def teacher_shape(cls, cfg: StudentConfig, num_labels: int,
                      teacher_dir: Path) -> dict[str, Any]:
        """The teacher's BERT config cut to the chosen layers, and which layers."""
        config, layers = student_bert_config(teacher_dir, cfg.transformer.teacher_layers,
                                             num_labels, cfg.dropout)
        return {"teacher_layers": layers, "bert_config": config.to_dict()}

    @classmethod
    def from_record(cls, cfg: StudentConfig, record: dict[str, Any]) -> TinyTransformer:
        from transformers import BertConfig

        config = BertConfig.from_dict(record["bert_config"])
        if record["vocab_size"] > config.vocab_size:
            raise KdpipeError(f"vocabulary of {record['vocab_size']} tokens does not fit the "
                              f"teacher's embeddings ({config.vocab_size} rows)")
        return cls(config)

    def __init__(self, config: BertConfig) -> None:
        from transformers import BertForSequenceClassification

        super().__init__()
        self.model = BertForSequenceClassification(config)
        self.hidden_size = self.feature_dim = config.hidden_size
        self.attentions = False

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> StudentOutput:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         output_hidden_states=True, output_attentions=self.attentions)
        return StudentOutput(out.logits, out.hidden_states[-1][:, 0], out.hidden_states,
                             out.attentions if self.attentions else None)

    def return_attentions(self, on: bool) -> None:
        """Attention maps need the eager attention: the fused kernels do not make them. (A
        saved student is rebuilt without either, so export and serving keep the fast path.)"""
        if on:
            self.model.set_attn_implementation("eager")
        self.attentions = on


    def init_from_teacher(self, teacher_dir: Path) -> None:
        """The teacher's embeddings, chosen layers, pooler and head (``copy_teacher``)."""
        copy_teacher(self, teacher_dir, self.student_record["teacher_layers"])

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, embedding: nn.Embedding) -> None:
        self.model.set_input_embeddings(embedding)
        sizes = {"vocab_size": embedding.num_embeddings, "pad_token_id": embedding.padding_idx}
        self.model.config.update(sizes)
        self.student_record["bert_config"].update(sizes)

    def shrink(self, fraction: float) -> None:
        """Per layer: the lowest-L1 heads (Q/K/V/O) and FFN neurons (intermediate rows) go."""
        config = self.model.config
        for layer in _bert_layers(self):
            heads = layer.attention.self.num_attention_heads
            _keep_heads(layer, strongest(_head_scores(layer), kept_count(heads, fraction)))
            rows = layer.intermediate.dense.weight.detach().abs().sum(1)
            _keep_neurons(layer, strongest(rows, kept_count(rows.numel(), fraction)))
        # Every layer keeps the same FFN width, so the config can say it; the head counts it
        # cannot (head size = hidden / num_attention_heads): pruning.json carries those.
        config.intermediate_size = _bert_layers(self)[0].intermediate.dense.out_features
        self.student_record["bert_config"]["intermediate_size"] = config.intermediate_size

    def sizes(self) -> dict[str, Any]:
        layers = _bert_layers(self)
        return {"heads_per_layer": [x.attention.self.num_attention_heads for x in layers],
                "intermediate_per_layer": [x.intermediate.dense.out_features for x in layers]}

    def reshape(self, sizes: dict[str, Any]) -> None:
        """Give a freshly built transformer the saved per-layer shapes (values come from the
        file)."""
        layers = _bert_layers(self)
        for layer, heads, width in zip(layers, sizes["heads_per_layer"],
                                       sizes["intermediate_per_layer"], strict=True):
            if heads != layer.attention.self.num_attention_heads:
                _keep_heads(layer, torch.arange(heads))
            if width != layer.intermediate.dense.out_features:
                _keep_neurons(layer, torch.arange(width))


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


def _bert_layers(student: TinyTransformer) -> nn.ModuleList:
    return student.model.bert.encoder.layer


def _keep_heads(layer: nn.Module, heads: Tensor) -> None:
    """Keep attention heads ``heads`` of a BertLayer: their Q/K/V rows and O columns.
    (``prune_heads`` is gone from transformers 5; BertSelfAttention reshapes with -1 heads,
    so smaller Q/K/V Linears are all it needs.)"""
    attention = layer.attention.self
    size = attention.attention_head_size
    rows = (heads.unsqueeze(1) * size + torch.arange(size)).flatten()
    for name in ("query", "key", "value"):
        setattr(attention, name, linear_rows(getattr(attention, name), rows))
    layer.attention.output.dense = linear_columns(layer.attention.output.dense, rows)
    attention.num_attention_heads = heads.numel()
    attention.all_head_size = rows.numel()


def _keep_neurons(layer: nn.Module, neurons: Tensor) -> None:
    """Keep FFN intermediate neurons ``neurons`` of a BertLayer."""
    layer.intermediate.dense = linear_rows(layer.intermediate.dense, neurons)
    layer.output.dense = linear_columns(layer.output.dense, neurons)


def _head_scores(layer: nn.Module) -> Tensor:
    """L1 of each head's rows of Q, K, V and its columns of the output projection: (heads,)."""
    attention = layer.attention.self
    size = attention.attention_head_size
    heads = attention.num_attention_heads
    score = sum(getattr(attention, name).weight.detach().abs().view(heads, -1).sum(1)
                for name in ("query", "key", "value"))
    out = layer.attention.output.dense.weight.detach().abs()  # (hidden, heads * size)
    return score + out.view(out.shape[0], heads, size).sum(dim=(0, 2))
