"""Classification scores shared by the steps that evaluate models.

Pure functions of numpy arrays: ``labels`` and ``predicted`` are int label ids (n,),
``probabilities`` are (n, C) rows that sum to 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def accuracy_and_f1(labels: np.ndarray, predicted: np.ndarray) -> tuple[float, float]:
    """Accuracy and macro-F1 (classes absent from both count as 0, not as an error)."""
    from sklearn.metrics import accuracy_score, f1_score

    return (float(accuracy_score(labels, predicted)),
            float(f1_score(labels, predicted, average="macro", zero_division=0)))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (n, C) logits, in float64 (so confidences near 1 keep their
    digits)."""
    z = np.asarray(logits, dtype=np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def per_class_report(labels: np.ndarray, predicted: np.ndarray,
                     names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``{name: {"precision", "recall", "f1", "support"}}`` for every class id 0..C-1 in
    ``names`` order; a class never predicted (or never present) scores 0, not NaN."""
    from sklearn.metrics import precision_recall_fscore_support

    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predicted, labels=list(range(len(names))), zero_division=0)
    return {name: {"precision": float(precision[i]), "recall": float(recall[i]),
                   "f1": float(f1[i]), "support": int(support[i])}
            for i, name in enumerate(names)}


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray,
                     num_classes: int) -> np.ndarray:
    """(C, C) int64 counts: row = true label id, column = predicted label id."""
    from sklearn.metrics import confusion_matrix as sk_confusion

    return sk_confusion(labels, predicted, labels=list(range(num_classes))).astype(np.int64)


def reliability_bins(probabilities: np.ndarray, labels: np.ndarray,
                     bins: int) -> list[dict[str, Any]]:
    """The reliability diagram: ``bins`` equal-width bins of confidence (the max
    probability) over [0, 1], each ``[lower, upper)`` except the last, which holds 1.0.

    One dict per bin, in order: ``bin`` (index), ``lower``, ``upper``, ``count``,
    ``confidence`` (mean max probability) and ``accuracy`` (share whose argmax is the
    label); the last two are None for an empty bin.
    """
    if bins < 1:
        raise ValueError(f"bins: expected >= 1, got {bins}")
    probabilities = np.asarray(probabilities, dtype=np.float64)
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == np.asarray(labels)
    index = np.minimum((confidence * bins).astype(np.int64), bins - 1)
    out = []
    for b in range(bins):
        members = index == b
        count = int(members.sum())
        out.append({"bin": b, "lower": b / bins, "upper": (b + 1) / bins, "count": count,
                    "confidence": float(confidence[members].mean()) if count else None,
                    "accuracy": float(correct[members].mean()) if count else None})
    return out


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray,
                               bins: int) -> float:
    """ECE = sum over bins of |B|/n * |accuracy(B) - confidence(B)|, with the bins of
    ``reliability_bins``; 0.0 for no rows."""
    table = reliability_bins(probabilities, labels, bins)
    n = sum(b["count"] for b in table)
    if n == 0:
        return 0.0
    return float(sum(b["count"] / n * abs(b["accuracy"] - b["confidence"])
                     for b in table if b["count"]))


def agreement(predicted: np.ndarray, reference: np.ndarray) -> float:
    """Share of rows whose predicted label id equals ``reference``'s (both (n,))."""
    predicted, reference = np.asarray(predicted), np.asarray(reference)
    if predicted.shape != reference.shape:
        raise ValueError(f"agreement: shapes differ ({predicted.shape} vs {reference.shape})")
    return float((predicted == reference).mean()) if len(predicted) else 0.0
