"""Classification scores shared by the steps that evaluate models."""

from __future__ import annotations

import numpy as np


def accuracy_and_f1(labels: np.ndarray, predicted: np.ndarray) -> tuple[float, float]:
    """Accuracy and macro-F1 (classes absent from both count as 0, not as an error)."""
    from sklearn.metrics import accuracy_score, f1_score

    return (float(accuracy_score(labels, predicted)),
            float(f1_score(labels, predicted, average="macro", zero_division=0)))
