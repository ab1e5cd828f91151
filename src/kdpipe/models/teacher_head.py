"""The fine-tuned teacher's classifier as a frozen module that reads the teacher's cached
[CLS] features (the last layer's state at position 0, what the soft-labels step stores):
softmax-regression distillation passes the student's projected feature through it.

transformers has no common "head" accessor across model families, so each family's forward
after the encoder is mirrored here (in eval mode, where dropout is the identity).
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from kdpipe.errors import KdpipeError


class _FirstToken(nn.Module):
    """Runs ``module`` on a one-token sequence: BERT's pooler and RoBERTa's classification
    head both read position 0 of a (B, L, D) sequence."""

    def __init__(self, module: nn.Module, then: nn.Module | None = None) -> None:
        super().__init__()
        self.module, self.then = module, then

    def forward(self, features: Tensor) -> Tensor:
        out = self.module(features[:, None, :])
        return self.then(out) if self.then is not None else out


def head_of(model: nn.Module) -> nn.Module:
    """``model``'s head as (B, hidden) [CLS] features -> (B, num_labels) logits.

    BERT-style (a pooler, then a linear classifier), DistilBERT-style (``pre_classifier``,
    ReLU, ``classifier``), RoBERTa-style (a classification head reading position 0)."""
    base = getattr(model, model.base_model_prefix, None)
    classifier = getattr(model, "classifier", None)
    pooler = getattr(base, "pooler", None)
    if pooler is not None and isinstance(classifier, nn.Linear):
        return _FirstToken(pooler, classifier)
    if isinstance(getattr(model, "pre_classifier", None), nn.Linear):
        return nn.Sequential(model.pre_classifier, nn.ReLU(), classifier)
    if classifier is not None and not isinstance(classifier, nn.Linear):
        return _FirstToken(classifier)
    raise KdpipeError(f"distill.srrd: no known classifier head on {type(model).__name__} "
                      "(BERT, DistilBERT and RoBERTa-style teachers have one); set "
                      "distill.srrd.weight=0")


def classifier_head(teacher_dir: Path) -> nn.Module:
    """The fine-tuned teacher's head (``head_of``), in eval mode, its parameters frozen."""
    from transformers import AutoModelForSequenceClassification

    from kdpipe.models.teacher import quiet_transformers

    with quiet_transformers():
        model = AutoModelForSequenceClassification.from_pretrained(teacher_dir)
    head = head_of(model).eval()
    head.requires_grad_(False)
    return head
