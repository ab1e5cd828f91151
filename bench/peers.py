"""The fast text classifiers users weigh against a distilled student, for bench/run.py: a
fastText supervised classifier and a Model2Vec static-embedding model with a linear head.
Each is trained here on the prepared train split, tuned on validation, saved to a folder
(what shipping it costs) and opened from that folder as a kdpipe ``ModelUnderTest``, so it
is scored and timed by the same code as every other system (bench/baseline.py does the same
for TF-IDF + logistic regression).

- ``fasttext_peer``: fastText's ``train_supervised`` over the small ``FASTTEXT_GRID``, the
  best on validation quantized with fastText's own ``quantize`` (product quantization,
  ``-qnorm -retrain -cutoff``) and saved as ``model.ftz``: the quantized model is what is
  saved, measured, scored and timed.
- ``model2vec_peer``: static token embeddings distilled from the fine-tuned teacher folder
  (``model2vec.distill.distill``) and a logistic-regression head on their mean, C picked on
  validation.

The fastText bindings are PyPI's ``fasttext-wheel`` 0.9.2 (``import fasttext``), prebuilt,
not ``fasttext`` 0.9.3 nor ``fasttext-numpy2-wheel`` (a prebuilt 0.9.3). fastText's random
initialisation writes only a tenth of the input matrix per training thread; the other rows
keep what the storage held. In 0.9.2 that storage is zero-filled (those rows start at zero,
the same every time); from 0.9.3 on it is an uninitialised aligned buffer, so at one thread
most rows start as whatever memory malloc hands back: here, with 0.9.3's code, 3 of 12
identical trainings stopped with "Encountered NaN" and identical trainings in one process
predicted differently; with 0.9.2 every training succeeded and repeated exactly. (0.9.3 is
also a source release only: a C++ build on every fresh machine.) 0.9.2's bindings predate
NumPy 2 (kdpipe needs numpy>=2) and the calls of theirs that return NumPy arrays are wrong
under it (multi-line ``predict`` gives garbled probabilities, one-line ``predict`` raises on
``copy=False``), so this module never calls them: predictions come from the binding's
one-line ``f.predict``, which returns plain ``(probability, label)`` pairs.
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from baseline import best_logistic_regression

from kdpipe.evaluation.metrics import accuracy_and_f1
from kdpipe.evaluation.models import ModelUnderTest

# fastText: the hyper-parameters tried (every combination, 8 models), the best on validation
# accuracy is kept. dim 100 and the rest are fastText's supervised defaults.
FASTTEXT_GRID = {"wordNgrams": (1, 2), "epoch": (5, 10), "lr": (0.25, 0.5)}
FASTTEXT_DIM = 100
# Hash buckets for word n-grams: fastText's default, or 10 per train word token for a train
# split of under 200k tokens (a tiny set would otherwise train and quantize 2M rows it never
# touches); SST-2 and AG News have more, so they get the default.
FASTTEXT_BUCKET = 2_000_000
# fastText's quantize: keep the 100k input rows (words and n-gram buckets) of largest norm,
# retrain on them, then product-quantize (as in fastText's own quantization example).
FASTTEXT_CUTOFF = 100_000
# Product quantization needs at least this many input rows (256 centroids per subspace):
# a model with fewer (a vocabulary this small: only the tests' tiny sets) stays float, saved
# as model.bin, and its info says ``quantized: False``.
FASTTEXT_PQ_MIN_ROWS = 256
# fastText splits on whitespace only and does not lowercase: its own text-classification
# tutorial lowercases and puts spaces around these characters first; so do we (train and
# predict alike).
_PUNCTUATION = re.compile(r"([.!?,'/()])")
_LABEL_PREFIX = "__label__"

# Model2Vec: PCA dimensions of the distilled embeddings (capped by the teacher's hidden
# size) and the logistic-regression strengths tried for the head.
M2V_PCA_DIMS = 256
M2V_C = (1.0, 10.0, 100.0)


# -- fastText ------------------------------------------------------------------------------

def fasttext_line(text: str) -> str:
    """``text`` as fastText reads it: one line, lowercased, punctuation split off, no label
    marker inside it."""
    text = _PUNCTUATION.sub(r" \1 ", text.lower().replace(_LABEL_PREFIX, " "))
    return " ".join(text.split())  # newlines, tabs and runs of spaces: one space


def fasttext_peer(train_texts: list[str], train_labels: np.ndarray, val_texts: list[str],
                  val_labels: np.ndarray, num_labels: int, folder: Path,
                  threads: int = 1, grid: dict[str, tuple] | None = None,
                  bucket: int | None = None) -> tuple[ModelUnderTest, dict[str, Any]]:
    """Train fastText on every combination of ``grid`` (default ``FASTTEXT_GRID``) with
    ``threads`` threads, keep the best on validation accuracy, quantize it and save it in
    ``folder`` (``model.ftz``; ``model.bin`` where it is too small to quantize). Returns
    the saved model opened by ``open_fasttext`` and ``{"hyperparameters", "val_accuracy"
    (of the saved model), "val_accuracy_float", "quantized", "bucket", "cutoff",
    "train_seconds"}``."""
    import fasttext

    grid = FASTTEXT_GRID if grid is None else grid
    train_labels, val_labels = np.asarray(train_labels), np.asarray(val_labels)
    if bucket is None:
        tokens = sum(len(t.split()) for t in train_texts)
        bucket = min(FASTTEXT_BUCKET, 10 * tokens)
    val_lines = [fasttext_line(t) for t in val_texts]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kdpipe-fasttext-") as scratch:
        train_file = Path(scratch) / "train.txt"
        with open(train_file, "w", encoding="utf-8") as handle:
            for text, label in zip(train_texts, train_labels, strict=True):
                handle.write(f"{_LABEL_PREFIX}{int(label)} {fasttext_line(text)}\n")
        best, best_acc, best_params = None, -1.0, {}
        for values in itertools.product(*grid.values()):
            params = dict(zip(grid, values, strict=True))
            model = fasttext.train_supervised(
                str(train_file), dim=FASTTEXT_DIM, bucket=bucket, thread=threads, seed=0,
                verbose=0, **params)
            acc = _fasttext_accuracy(model, val_lines, val_labels, num_labels)
            if acc > best_acc:
                best, best_acc, best_params = model, acc, params
            else:
                del model
        assert best is not None
        if len(best.get_labels()) != num_labels:
            raise ValueError(f"train has {len(best.get_labels())} classes, expected {num_labels}")
        rows = memoryview(best.f.getInputMatrix()).shape[0]  # no copy
        bucket_used = int(best.f.getArgs().bucket)  # 0: fastText drops them for unigrams
        quantized = rows >= FASTTEXT_PQ_MIN_ROWS
        if quantized:
            best.quantize(input=str(train_file), qnorm=True, retrain=True,
                          cutoff=FASTTEXT_CUTOFF, thread=threads, verbose=0)
    seconds = time.perf_counter() - start
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    name = "model.ftz" if quantized else "model.bin"
    best.save_model(str(folder / name))
    kept_rows = min(rows, FASTTEXT_CUTOFF) if quantized else rows
    params_count = (kept_rows + num_labels) * FASTTEXT_DIM  # input rows kept + output rows
    (folder / "fasttext.json").write_text(json.dumps(
        {"file": name, "num_labels": num_labels, "params": params_count,
         "hyperparameters": best_params}), encoding="utf-8")
    del best
    model = open_fasttext(folder)
    return model, {"hyperparameters": {**best_params, "dim": FASTTEXT_DIM},
                   "val_accuracy": _fasttext_accuracy(model.module, val_lines, val_labels,
                                                      num_labels),
                   "val_accuracy_float": round(best_acc, 4), "quantized": quantized,
                   "bucket": bucket_used, "cutoff": FASTTEXT_CUTOFF if quantized else None,
                   "train_seconds": round(seconds, 2)}


def open_fasttext(folder: Path, name: str = "fasttext") -> ModelUnderTest:
    """The fastText model saved by ``fasttext_peer`` in ``folder``. fastText predicts on one
    thread whatever it was trained with. logits: log-probabilities, one column per label
    index (``__label__k`` is column k; a row fastText returns no label for would be
    uniform, though it always has at least the end-of-line token)."""
    import fasttext

    meta = json.loads((Path(folder) / "fasttext.json").read_text(encoding="utf-8"))
    num_labels = int(meta["num_labels"])
    ft = fasttext.load_model(str(Path(folder) / meta["file"]))

    def tokenize(texts: list[str]) -> list[str]:
        return [fasttext_line(t) for t in texts]

    def logits(texts: list[str]) -> np.ndarray:
        return _fasttext_log_probs(ft, tokenize(texts), num_labels)

    return ModelUnderTest(name, "fasttext", Path(folder), num_labels, int(meta["params"]),
                          tokenize, logits, ft)


def _fasttext_log_probs(ft: Any, lines: list[str], num_labels: int) -> np.ndarray:
    # ft.f.predict: the binding's one-line call (plain Python pairs); see the module's
    # docstring for why not ft.predict
    out = np.full((len(lines), num_labels), -np.log(num_labels), np.float32)
    for row, line in enumerate(lines):
        pairs = ft.f.predict(line + "\n", -1, 0.0, "replace")
        if pairs:
            out[row, [int(label[len(_LABEL_PREFIX):]) for _, label in pairs]] = np.log(
                np.maximum([p for p, _ in pairs], 1e-12))
    return out


def _fasttext_accuracy(ft: Any, lines: list[str], labels: np.ndarray, num_labels: int) -> float:
    predicted = _fasttext_log_probs(ft, lines, num_labels).argmax(axis=1)
    return round(accuracy_and_f1(labels, predicted)[0], 4)


# -- Model2Vec -----------------------------------------------------------------------------

def model2vec_peer(teacher_folder: Path, train_texts: list[str], train_labels: np.ndarray,
                   val_texts: list[str], val_labels: np.ndarray, num_labels: int,
                   folder: Path) -> tuple[ModelUnderTest, dict[str, Any]]:
    """Distil static embeddings from the fine-tuned teacher (Model2Vec: each vocabulary
    token through the teacher once, PCA to ``min(M2V_PCA_DIMS, hidden size)`` dimensions,
    SIF weighting, float16), embed train and validation (the normalized mean of a text's
    token vectors) and fit the head on them.

    The head is scikit-learn's LogisticRegression, C picked on validation from ``M2V_C``:
    the linear probe MTEB's classification tasks fit on frozen embeddings (the scores
    Model2Vec reports for its models), the same family as the TF-IDF baseline, convex (no
    seed or schedule to tune) and fitted in seconds; larger C than TF-IDF's because the
    features are unit-norm averages. Model2Vec's own ``StaticModelForClassification``
    (``model2vec.train``) instead fine-tunes the embedding table with an MLP head in
    PyTorch: another system, with epochs, learning rate and early stopping to tune, that
    measures fine-tuning more than what distilling the teacher gives.

    Saved in ``folder``: Model2Vec's ``save_pretrained`` output (embeddings as safetensors,
    tokenizer.json, config) and ``head.safetensors`` (weights (C, dim) and bias (C,)).
    Returns the saved model opened by ``open_model2vec`` and ``{"pca_dims", "C",
    "val_accuracy", "distill_seconds", "train_seconds"}``."""
    from model2vec.distill import distill
    from safetensors.numpy import save_file
    from transformers import AutoConfig

    from kdpipe.models.teacher import quiet_transformers

    hidden = int(AutoConfig.from_pretrained(str(teacher_folder)).hidden_size)
    pca_dims = min(M2V_PCA_DIMS, hidden)
    train_labels, val_labels = np.asarray(train_labels), np.asarray(val_labels)
    start = time.perf_counter()
    with quiet_transformers():
        static = distill(model_name=str(teacher_folder), pca_dims=pca_dims, device="cpu")
    distill_seconds = time.perf_counter() - start
    train_x, val_x = _embed(static, train_texts), _embed(static, val_texts)
    best, best_acc = best_logistic_regression(train_x, train_labels, val_x, val_labels,
                                              num_labels, M2V_C)
    seconds = time.perf_counter() - start
    # C order: scikit-learn's multiclass coef_ is Fortran-ordered, and safetensors' numpy
    # writer stores such an array's bytes as they lie, so it would read back transposed.
    weight = np.ascontiguousarray(best.coef_, dtype=np.float32)
    bias = np.ascontiguousarray(best.intercept_, dtype=np.float32)
    if num_labels == 2:  # binary LR: p(1) = sigmoid(w.x + b) = softmax([0, w.x + b])[1]
        weight = np.vstack([np.zeros_like(weight), weight])
        bias = np.concatenate([np.zeros_like(bias), bias])
    if folder.exists():
        shutil.rmtree(folder)
    static.save_pretrained(folder)
    save_file({"weight": weight, "bias": bias}, str(folder / "head.safetensors"))
    model = open_model2vec(folder)
    return model, {"pca_dims": int(static.dim), "C": float(best.C),
                   "val_accuracy": round(best_acc, 4),
                   "distill_seconds": round(distill_seconds, 2),
                   "train_seconds": round(seconds, 2)}


def open_model2vec(folder: Path, name: str = "model2vec") -> ModelUnderTest:
    """The Model2Vec model and head saved by ``model2vec_peer`` in ``folder``. logits:
    log-softmax of the head over the texts' embeddings (for a binary head, the same
    probabilities as scikit-learn's ``predict_log_proba``)."""
    from model2vec import StaticModel
    from safetensors.numpy import load_file

    static = StaticModel.from_pretrained(str(folder))
    head = load_file(str(Path(folder) / "head.safetensors"))
    weight, bias = head["weight"], head["bias"]

    def logits(texts: list[str]) -> np.ndarray:
        z = _embed(static, texts) @ weight.T + bias
        z -= z.max(axis=1, keepdims=True)
        return (z - np.log(np.exp(z).sum(axis=1, keepdims=True))).astype(np.float32)

    params = int(static.embedding.size + weight.size + bias.size)
    return ModelUnderTest(name, "model2vec", Path(folder), int(weight.shape[0]), params,
                          static.tokenize, logits, static)


def _embed(static: Any, texts: list[str]) -> np.ndarray:
    """Float32 embeddings (n, dim), in this process (Model2Vec's multiprocessing is off, so
    that the bench's thread count holds)."""
    if not texts:
        return np.zeros((0, static.dim), np.float32)
    return np.asarray(static.encode(list(texts), use_multiprocessing=False), np.float32)
