"""The distillation loss as terms: each term is one class that owns its settings (read from
``distill`` in params.yaml), its projection heads (learned with the student) and its
computation (from ``kdpipe.training.losses``), registered by name in ``TERMS``.

Adding a term is one ``LossTerm`` subclass decorated with ``@term`` plus its settings in
``kdpipe.config.DistillConfig``: ``LossTerms.for_epoch`` turns it on when its ``weight`` is
above 0, the distill step builds it, sums it into the loss, logs it as ``loss/<name>``, and
checkpoints its heads with the student's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from kdpipe.config import DistillConfig
from kdpipe.errors import KdpipeError
from kdpipe.models.base import Student, StudentOutput
from kdpipe.training import losses


@dataclass
class Batch:
    """One training batch: token ids, gold labels (-1: none), the teacher's cached outputs
    and the fractionation weights, row by row."""

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor
    teacher_logits: Tensor
    teacher_features: Tensor | None
    weights: Tensor


class ScaledMLP(nn.Module):
    """Adaptive projection: ``scale * W2 relu(W1 x + b1) + b2``, hidden width = output width,
    ``scale`` a learned scalar starting at 1 (it lets the term settle the projection's
    magnitude apart from its direction)."""

    def __init__(self, width_in: int, width_out: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(width_in, width_out), nn.ReLU(),
                                 nn.Linear(width_out, width_out))
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * self.net(x)


def projection(kind: str, width_in: int, width_out: int) -> nn.Module:
    """The student-to-teacher feature map of ``distill.feature.projection`` (or srrd's)."""
    if kind == "linear":
        return nn.Linear(width_in, width_out)
    if kind == "mlp":
        return ScaledMLP(width_in, width_out)
    raise ValueError(f"projection: expected 'linear' or 'mlp', got {kind!r}")


class TeacherAlongside:
    """The fine-tuned teacher's encoder, frozen, run on each training batch for the terms
    that match its layers (hidden states, attention maps). Built once per training run and
    shared by those terms: its outputs for the last batch are kept, so two terms on the same
    batch run it once."""

    def __init__(self, teacher_dir: Path, attentions: bool) -> None:
        from transformers import AutoModel

        from kdpipe.models.teacher import quiet_transformers

        # Attention maps need the eager implementation: the fused (SDPA) kernels never
        # materialise them.
        extra = {"attn_implementation": "eager"} if attentions else {}
        with quiet_transformers():
            model = AutoModel.from_pretrained(teacher_dir, **extra).eval()
        model.requires_grad_(False)
        self.model, self.attentions = model, attentions  # frozen: not trained nor saved
        self._last: tuple[Batch, Any] | None = None

    def outputs(self, b: Batch) -> Any:
        """The encoder's outputs for ``b``, with hidden states (and attention maps)."""
        if self._last is None or self._last[0] is not b:
            with torch.inference_mode():
                out = self.model(input_ids=b.input_ids, attention_mask=b.attention_mask,
                                 output_hidden_states=True, output_attentions=self.attentions)
            # inference tensors cannot enter autograd: plain copies
            out.hidden_states = tuple(h.clone() for h in out.hidden_states)
            if self.attentions:
                out.attentions = tuple(a.clone() for a in out.attentions)
            self._last = (b, out)
        return self._last[1]


@dataclass(frozen=True)
class LossTerms:
    """Which terms are on for an epoch, their weights, and the epoch's temperature and
    ``alpha``. A term whose weight is 0 in params.yaml is off (absent from ``weights``); the
    first ``hard_label_epochs`` epochs are the hard-label stage (``hard_ce`` alone)."""

    weights: Mapping[str, float]
    temperature: float
    alpha: float

    @classmethod
    def for_epoch(cls, d: DistillConfig, epoch: float) -> LossTerms:
        temperature = losses.temperature_at(epoch, d.epochs, d.temperature, d.temperature_end)
        if epoch < d.hard_label_epochs:
            return cls({HardCE.name: 1.0}, temperature, d.alpha)
        weights = {name: kind.weight(d) for name, kind in TERMS.items()}
        return cls({name: w for name, w in weights.items() if w > 0}, temperature, d.alpha)

    def __contains__(self, name: object) -> bool:
        return name in self.weights

    def combine(self, values: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        """``sum_k weight_k * value_k`` over the active terms, and every term's (unweighted)
        value plus ``total`` as floats for logging. ``values`` must hold exactly the active
        terms: a missing or extra one is a bug in the caller, so it is an error."""
        if set(values) != set(self.weights):
            raise ValueError(f"loss terms: expected {sorted(self.weights)}, got {sorted(values)}")
        total = sum(self.weights[name] * value for name, value in values.items())
        logged = {name: float(value.detach()) for name, value in values.items()}
        logged["total"] = float(total.detach())
        return total, logged


class LossTerm:
    """One term of the loss. ``name``: its key in ``TERMS``, logs and ``LossTerms``.

    Built once per training run, for a student whose features are ``student.feature_dim``
    wide and a teacher whose cached features are ``teacher_width`` wide (0: none cached).
    ``heads``: its learned projections, trained and checkpointed with the student (names
    unique across terms). ``__call__``: the term's value on a batch (unweighted).
    ``after_step``: called after every optimizer step, whether or not the term is on that
    epoch, with the learning rate of that step. ``needs_teacher_alongside``: the term reads
    ``self.alongside``, the teacher run on the batch (shared between such terms).
    ``models``: models the term trains beside the student (an EMA copy, a peer), evaluated
    with it each epoch (the best of all is kept) and checkpointed with ``state`` /
    ``load_state`` (their optimizer's state, say).
    """

    name: ClassVar[str]
    needs_teacher_features: ClassVar[bool] = False
    needs_teacher_alongside: ClassVar[bool] = False
    alongside: TeacherAlongside  # set by build_terms when needs_teacher_alongside

    @classmethod
    def weight(cls, d: DistillConfig) -> float:
        """Its weight in the sum after the hard-label stage (0: off)."""
        return 0.0

    def __init__(self, d: DistillConfig, student: Student, teacher_width: int,
                 teacher_dir: Path | None) -> None:
        self.d = d
        self.heads: dict[str, nn.Module] = {}

    def __call__(self, b: Batch, out: StudentOutput, terms: LossTerms) -> Tensor:
        raise NotImplementedError

    def after_step(self, student: nn.Module, lr: float) -> None:
        """Nothing by default."""

    def models(self) -> dict[str, nn.Module]:
        """None by default."""
        return {}

    def state(self) -> dict[str, Any]:
        """Tensors and numbers (torch.load(weights_only=True) must read them back)."""
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        """What ``state`` returned."""


TERMS: dict[str, type[LossTerm]] = {}


def term(kind: type[LossTerm]) -> type[LossTerm]:
    """Register ``kind`` under its ``name`` (registration order is the summation order)."""
    if kind.name in TERMS:
        raise ValueError(f"loss term {kind.name!r} registered twice")
    TERMS[kind.name] = kind
    return kind


def build_terms(names: Iterable[str], d: DistillConfig, student: Student,
                teacher_width: int, teacher_dir: Path | None) -> dict[str, LossTerm]:
    """The terms ``names``, built in registration order (their heads draw from torch's
    global RNG in that order)."""
    wanted = set(names)
    unknown = wanted - set(TERMS)
    if unknown:
        raise ValueError(f"unknown loss terms {sorted(unknown)}; known: {sorted(TERMS)}")
    needing = sorted(n for n in wanted if TERMS[n].needs_teacher_features)
    if needing and not teacher_width:
        raise KdpipeError(f"distill: {'/'.join(needing)} loss needs the teacher's features; "
                          "set soft_labels.features=true")
    terms = {name: kind(d, student, teacher_width, teacher_dir)
             for name, kind in TERMS.items() if name in wanted}
    alongside = [t for t in terms.values() if t.needs_teacher_alongside]
    if alongside:
        if teacher_dir is None:
            raise ValueError(f"loss terms {[t.name for t in alongside]} need teacher_dir")
        shared = TeacherAlongside(teacher_dir, attentions=Attention.name in terms)
        for t in alongside:
            t.alongside = shared
    return terms


@term
class KD(LossTerm):
    """``alpha`` * KL to the teacher at the epoch's temperature + (1 - ``alpha``) * CE with
    the gold label (``losses.kd_loss``); on always, after the hard-label stage."""

    name = "kd"

    @classmethod
    def weight(cls, d: DistillConfig) -> float:
        return 1.0

    def __call__(self, b: Batch, out: StudentOutput, terms: LossTerms) -> Tensor:
        return losses.kd_loss(out.logits, b.teacher_logits, b.labels, terms.temperature,
                              terms.alpha, b.weights)


@term
class HardCE(LossTerm):
    """Cross-entropy with the gold labels alone: the first ``hard_label_epochs`` epochs."""

    name = "hard_ce"

    def __call__(self, b: Batch, out: StudentOutput, terms: LossTerms) -> Tensor:
        return losses.hard_ce(out.logits, b.labels, b.weights)


@term
class LogitMSE(LossTerm):
    """MSE between raw logits (``distill.logit_mse``: its weight)."""

    name = "logit_mse"

    @classmethod
    def weight(cls, d: DistillConfig) -> float:
        return d.logit_mse

    def __call__(self, b: Batch, out: StudentOutput, terms: LossTerms) -> Tensor:
        return losses.logit_mse(out.logits, b.teacher_logits, b.weights)


@term
class Feature(LossTerm):
    """The student's features, projected to the teacher's width, against the teacher's
    cached [CLS] features (``distill.feature``: weight and kind)."""

    name = "feature"
    needs_teacher_features = True

    @classmethod
    def weight(cls, d: DistillConfig) -> float:
        return d.feature.weight

    def __init__(self, d: DistillConfig, student: Student, teacher_width: int,
                 teacher_dir: Path | None) -> None:
        super().__init__(d, student, teacher_width, teacher_dir)
        self.heads = {"feature": projection(d.feature.projection, student.feature_dim,
                                            teacher_width)}

    def __call__(self, b: Batch, out: StudentOutput, terms: LossTerms) -> Tensor:
        return losses.feature_alignment(self.heads["feature"](out.features),
                                        b.teacher_features, self.d.feature.kind, b.weights)


@term
class CRD(LossTerm):
    """Contrastive representation distillation (``distill.crd``): both sides projected to
    ``projection_dim``, InfoNCE against the batch's other rows or a memory bank."""

    name = "crd"
    needs_teacher_features = True

    @classmethod
    def weight(cls, d: DistillConfig) -> float:
        return d.crd.weight

    def __init__(self, d: DistillConfig, student: Student, teacher_width: int,
                 teacher_dir: Path | None) -> None:
        super().__init__(d, student, teacher_width, teacher_dir)
        self.heads = {"crd_student": nn.Linear(student.feature_dim, d.crd.projection_dim),
                      "crd_teacher": nn.Linear(teacher_width, d.crd.projection_dim)}
        self.bank = (losses.MemoryBank(d.crd.bank_size) if d.crd.negatives == "memory_bank"
                     else None)

    def __call__(self, b: Batch, out: StudentOutput, terms: LossTerms) -> Tensor:
        teacher = self.heads["crd_teacher"](b.teacher_features)
        negatives = self.bank.get() if self.bank is not None else None
        value = losses.crd_infonce(self.heads["crd_student"](out.features), teacher,
                                   self.d.crd.temperature, negatives, b.weights)
        if self.bank is not None:
            self.bank.push(teacher)
        return value


def layer_pairs(student: Student, setting: str,
                given: list[tuple[int, int]] | None) -> list[tuple[int, int]]:
    """(student, teacher) layer pairs, numbered from 1: ``given``, or each layer of the
    transformer student with the teacher layer it was copied from. An error naming
    ``setting`` for any other student (they have no layers to match)."""
    record = getattr(student, "student_record", {})
    if "teacher_layers" not in record:
        raise KdpipeError(f"{setting} > 0 needs student.arch=transformer (only it has layers "
                          "to match)")
    pairs = given or [(i + 1, layer + 1) for i, layer in enumerate(record["teacher_layers"])]
    return [tuple(p) for p in pairs]


@term
class Hidden(LossTerm):
    """Layer-to-layer MSE with the teacher run alongside (``distill.hidden``; the
    transformer student only: the others have no layers to match)."""

    name = "hidden"
    needs_teacher_alongside = True

    @classmethod
    def weight(cls, d: DistillConfig) -> float:
        return d.hidden.weight

    def __init__(self, d: DistillConfig, student: Student, teacher_width: int,
                 teacher_dir: Path | None) -> None:
        super().__init__(d, student, teacher_width, teacher_dir)
        self.layer_pairs = layer_pairs(student, "distill.hidden.weight", d.hidden.layer_pairs)

    def __call__(self, b: Batch, out: StudentOutput, terms: LossTerms) -> Tensor:
        return losses.hidden_mse(out.hidden_states, self.alongside.outputs(b).hidden_states,
                                 self.layer_pairs, mask=b.attention_mask, weights=b.weights)


@term
class Attention(LossTerm):
    """Attention transfer (``distill.attention``; TinyBERT): the transformer student's
    attention maps against the teacher's, run alongside, layer pair by layer pair."""

    name = "attention"
    needs_teacher_alongside = True

    @classmethod
    def weight(cls, d: DistillConfig) -> float:
        return d.attention.weight

    def __init__(self, d: DistillConfig, student: Student, teacher_width: int,
                 teacher_dir: Path | None) -> None:
        super().__init__(d, student, teacher_width, teacher_dir)
        self.layer_pairs = layer_pairs(student, "distill.attention.weight",
                                       d.attention.layer_pairs)
        student.return_attentions(True)

    def __call__(self, b: Batch, out: StudentOutput, terms: LossTerms) -> Tensor:
        return losses.attention_mse(out.attentions, self.alongside.outputs(b).attentions,
                                    self.layer_pairs, mask=b.attention_mask, weights=b.weights)


@term
class SRRD(LossTerm):
    """Softmax-regression representation distillation (``distill.srrd``): the student's
    feature, projected to the teacher's width, through the teacher's frozen classifier head
    against the teacher's logits, plus the feature MSE (``losses.srrd``)."""

    name = "srrd"
    needs_teacher_features = True

    @classmethod
    def weight(cls, d: DistillConfig) -> float:
        return d.srrd.weight

    def __init__(self, d: DistillConfig, student: Student, teacher_width: int,
                 teacher_dir: Path | None) -> None:
        from kdpipe.models.teacher_head import classifier_head

        super().__init__(d, student, teacher_width, teacher_dir)
        if teacher_dir is None:
            raise ValueError("srrd needs teacher_dir (the teacher's classifier head)")
        self.heads = {"srrd": projection(d.srrd.projection, student.feature_dim,
                                         teacher_width)}
        self.teacher_head = classifier_head(teacher_dir)  # frozen: not trained nor saved

    def __call__(self, b: Batch, out: StudentOutput, terms: LossTerms) -> Tensor:
        return losses.srrd(self.heads["srrd"](out.features), b.teacher_features,
                           b.teacher_logits, self.teacher_head, self.d.srrd.temperature,
                           self.d.srrd.feature_weight, b.weights)


@term
class EMA(LossTerm):
    """Self-distillation from an exponential moving average of the student (``distill.ema``):
    KL to the average's logits at the epoch's temperature. The average is updated after
    every step and evaluated beside the student; the better one is kept."""

    name = "ema"

    @classmethod
    def weight(cls, d: DistillConfig) -> float:
        return d.ema.weight

    def __init__(self, d: DistillConfig, student: Student, teacher_width: int,
                 teacher_dir: Path | None) -> None:
        super().__init__(d, student, teacher_width, teacher_dir)
        self.model = losses.make_ema(student)

    def __call__(self, b: Batch, out: StudentOutput, terms: LossTerms) -> Tensor:
        with torch.no_grad():
            targets = self.model(b.input_ids, b.attention_mask).logits
        return losses.kd_kl(out.logits, targets, terms.temperature, b.weights)

    def after_step(self, student: nn.Module, lr: float) -> None:
        losses.ema_update(self.model, student, self.d.ema.momentum)

    def models(self) -> dict[str, nn.Module]:
        return {"ema": self.model}


@term
class Mutual(LossTerm):
    """Deep mutual learning (Zhang et al. 2018; ``distill.mutual``): a peer student, built
    like the student but initialised apart, trained beside it. Each learns from the teacher
    (the peer by the KD loss alone) and from the other's softened output, ``weight`` times KL
    at the epoch's temperature; the peer takes an optimizer step after each of the
    student's, at the same learning rate. Both are evaluated each epoch; the better is kept."""

    name = "mutual"

    @classmethod
    def weight(cls, d: DistillConfig) -> float:
        return d.mutual.weight

    def __init__(self, d: DistillConfig, student: Student, teacher_width: int,
                 teacher_dir: Path | None) -> None:
        from kdpipe.training.optim import adamw

        super().__init__(d, student, teacher_width, teacher_dir)
        self.peer = losses.make_peer(student, d.mutual.seed)
        self.optimizer = adamw(list(self.peer.parameters()), d.lr, d.weight_decay)
        self._loss: Tensor | None = None

    def __call__(self, b: Batch, out: StudentOutput, terms: LossTerms) -> Tensor:
        self.peer.train()
        peer = self.peer(b.input_ids, b.attention_mask).logits
        self._loss = (losses.kd_loss(peer, b.teacher_logits, b.labels, terms.temperature,
                                     terms.alpha, b.weights)
                      + terms.weights[self.name] * losses.kd_kl(
                          peer, out.logits.detach(), terms.temperature, b.weights))
        return losses.kd_kl(out.logits, peer.detach(), terms.temperature, b.weights)

    def after_step(self, student: nn.Module, lr: float) -> None:
        if self._loss is None:  # the term was off this step (hard-label epochs)
            return
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        self._loss.backward()
        self._loss = None
        if self.d.max_grad_norm:
            nn.utils.clip_grad_norm_(self.peer.parameters(), self.d.max_grad_norm)
        self.optimizer.step()

    def models(self) -> dict[str, nn.Module]:
        return {"peer": self.peer}

    def state(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
