"""The classic cheap baseline bench/run.py compares with: TF-IDF (word 1-2 grams) +
logistic regression (scikit-learn), C picked on validation. Wrapped as a kdpipe
``ModelUnderTest`` so that it is scored and timed by the same code as every other system."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from kdpipe.evaluation.metrics import accuracy_and_f1
from kdpipe.evaluation.models import ModelUnderTest

# Regularisation strengths tried for the TF-IDF baseline; the best on validation is kept.
TFIDF_C = (0.5, 2.0, 8.0)


def best_logistic_regression(train_x, train_labels: np.ndarray, val_x, val_labels: np.ndarray,
                             num_labels: int, strengths: tuple[float, ...]) -> tuple[Any, float]:
    """Logistic regression fitted at each C in ``strengths``; the best on validation
    accuracy, and that accuracy. Raises ValueError when train lacks a class."""
    from sklearn.linear_model import LogisticRegression

    best, best_acc = None, -1.0
    for c in strengths:
        fitted = LogisticRegression(C=c, max_iter=2000).fit(train_x, train_labels)
        acc, _ = accuracy_and_f1(val_labels, fitted.predict(val_x))
        if acc > best_acc:
            best, best_acc = fitted, acc
    assert best is not None
    if len(best.classes_) != num_labels:
        raise ValueError(f"train has {len(best.classes_)} classes, expected {num_labels}")
    return best, best_acc


def tfidf_lr(train_texts: list[str], train_labels: np.ndarray, val_texts: list[str],
             val_labels: np.ndarray, num_labels: int, folder: Path) -> tuple[ModelUnderTest, dict]:
    """Fit TF-IDF + logistic regression; save what serving it needs (vocabulary as JSON,
    idf and weights as safetensors, so its size is measured like the other folders) and
    return it with ``{"C", "fit_seconds"}``."""
    from safetensors.numpy import save_file
    from sklearn.feature_extraction.text import TfidfVectorizer
    start = time.perf_counter()
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    train_x = vectorizer.fit_transform(train_texts)
    val_x = vectorizer.transform(val_texts)
    best, _ = best_logistic_regression(train_x, train_labels, val_x, val_labels, num_labels,
                                       TFIDF_C)
    seconds = time.perf_counter() - start
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {term: int(i) for term, i in vectorizer.vocabulary_.items()}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    save_file({"idf": vectorizer.idf_.astype(np.float32), "coef": best.coef_.astype(np.float32),
               "intercept": best.intercept_.astype(np.float32)},
              str(folder / "weights.safetensors"))

    def logits(texts: list[str]) -> np.ndarray:
        return best.predict_log_proba(vectorizer.transform(texts)).astype(np.float32)

    params = int(best.coef_.size + best.intercept_.size + vectorizer.idf_.size)
    model = ModelUnderTest("tfidf_lr", "sklearn", folder, num_labels, params,
                           vectorizer.transform, logits, best)
    return model, {"C": float(best.C), "fit_seconds": round(seconds, 2)}
