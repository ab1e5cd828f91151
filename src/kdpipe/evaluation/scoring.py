"""Scoring, timing and sizing models by name: the machinery the baseline step (the
teachers) and the evaluate step (the students) share, so that both measure the same way.

Model names are those of ``evaluate.models``: ``teacher`` (the fine-tuned folder, PyTorch),
``teacher_int8`` (the teacher exported to ONNX and quantized when first asked for),
``student`` (distill output), ``pruned`` (prune output), both PyTorch and fed the teacher's
token ids, and ``quantized`` (an exported ONNX folder). A record is one entry of a metrics
document's ``models`` (see ``kdpipe.steps.evaluate``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from kdpipe.config import Config
from kdpipe.data.prepare import read_labels, read_split
from kdpipe.errors import KdpipeError
from kdpipe.evaluation import latency, models, report, teacher_onnx
from kdpipe.evaluation import metrics as scores
from kdpipe.progress import progress_bar

RECORD_FORMAT = 1
PREDICT_BATCH = 64  # texts per call when scoring the split (timing uses its own sizes)
TEACHERS = ("teacher", "teacher_int8")
TEACHER_ONNX_DIR = "teacher_onnx"
TEACHER_INT8_DIR = "teacher_int8"
# The step whose output each model is (what to run when its folder is missing).
MADE_BY = {"teacher": "teacher", "teacher_int8": "teacher", "student": "distill",
           "pruned": "prune", "quantized": "quantize"}


def model_names(cfg: Config) -> list[str]:
    """``evaluate.models`` without repeats, the teacher first, then its int8 copy (the
    reference's predictions are needed for every other model's agreement)."""
    order = {"teacher": 0, "teacher_int8": 1}
    return sorted(dict.fromkeys(cfg.evaluate.models), key=lambda n: order.get(n, 2))


def new_document(cfg: Config, prepared_dir: Path, rows: int) -> dict[str, Any]:
    """The metrics document's header (all but the models) for ``cfg``'s evaluate settings,
    ``rows`` texts."""
    e = cfg.evaluate
    return {
        "format": RECORD_FORMAT, "split": e.split, "rows": rows, "threads": e.threads,
        "labels": read_labels(prepared_dir),
        "reference": "teacher" if "teacher" in e.models else None,
        "ece_bins": e.ece_bins, "latency": {"batch_sizes": list(e.latency_batch_sizes),
                                            "warmup": e.latency_warmup,
                                            "repeats": e.latency_repeats},
        "models": {}}


def score_models(cfg: Config, names: list[str], folders: dict[str, Path], prepared_dir: Path,
                 texts: list[str], gold: np.ndarray, doc: dict[str, Any],
                 predictions: dict[str, np.ndarray],
                 reliability: dict[str, list[dict[str, Any]]], tmp: Path,
                 out_dir: Path) -> None:
    """Score, time and size each of ``names`` in turn, on the caller's threads, adding its
    record to ``doc["models"]``, its label ids to ``predictions`` and its bins to
    ``reliability``. ``tmp``: the step's temporary output (the teacher's ONNX folders are
    made there), ``out_dir``: where it will end up."""
    e = cfg.evaluate
    batch = max(PREDICT_BATCH, *e.latency_batch_sizes)  # a timed call is one forward pass
    with progress_bar() as bar:
        opened = _Opener(cfg, folders, prepared_dir, tmp, out_dir, texts, batch)
        for name in names:
            model = opened.open(name)
            check_labels(model, doc["labels"])
            task = bar.add_task(f"evaluate {name}", total=-(-len(texts) // PREDICT_BATCH)
                                + latency.calls_per_model(e.latency_batch_sizes,
                                                          e.latency_warmup, e.latency_repeats))
            advance = functools.partial(bar.advance, task)
            record, predicted, bins = score(model, texts, gold, doc["labels"], e.ece_bins,
                                            predictions.get("teacher"), advance)
            record.update(latency.measure(model, texts, e.latency_batch_sizes,
                                          e.latency_warmup, e.latency_repeats, advance))
            record["size_bytes"] = models.folder_bytes(opened.folder_on_disk(name))
            record["params"] = int(model.params)
            record["path"] = str(opened.final_path(name))
            doc["models"][name] = record
            predictions[name], reliability[name] = predicted, bins
            opened.close(name)


class _Opener:
    """Opens each model by name; makes the teacher's ONNX folders (inside the step's
    temporary output) the first time ``teacher_int8`` is asked for, and keeps the PyTorch
    teacher loaded only while another model still needs it (its export)."""

    def __init__(self, cfg: Config, folders: dict[str, Path], prepared_dir: Path,
                 tmp: Path, out_dir: Path, texts: list[str], batch: int) -> None:
        self.cfg, self.folders, self.prepared_dir = cfg, folders, prepared_dir
        self.tmp, self.out_dir, self.texts, self.batch = tmp, out_dir, texts, batch
        self.tokenizer: Any = None
        self.teacher: models.ModelUnderTest | None = None

    def teacher_tokenizer(self) -> Any:
        from kdpipe.serving.predictor import load_tokenizer

        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.folders["teacher"])
        return self.tokenizer

    def pytorch_teacher(self) -> models.ModelUnderTest:
        if self.teacher is None:
            self.teacher = models.pytorch_teacher(
                "teacher", self.folders["teacher"], self.teacher_tokenizer(),
                self.cfg.ingest.max_length, self.batch)
        return self.teacher

    def open(self, name: str) -> models.ModelUnderTest:
        e, max_length = self.cfg.evaluate, self.cfg.ingest.max_length
        if name == "teacher":
            return self.pytorch_teacher()
        if name in ("student", "pruned"):
            return models.pytorch_student(name, self.folders[name], self.teacher_tokenizer(),
                                          max_length, self.batch)
        if name == "quantized":
            return models.onnx_folder(name, self.folders[name], e.threads, self.batch)
        onnx_dir, int8_dir = self.tmp / TEACHER_ONNX_DIR, self.tmp / TEACHER_INT8_DIR
        teacher = self.pytorch_teacher()
        teacher_onnx.export_teacher(self.cfg, self.folders["teacher"], teacher.module,
                                    self.teacher_tokenizer(), self.texts,
                                    self.prepared_dir / "labels.json", onnx_dir, e.threads)
        teacher_onnx.quantize_teacher(self.cfg, onnx_dir, self.prepared_dir, int8_dir,
                                      source=self.out_dir / TEACHER_ONNX_DIR)
        return models.onnx_folder(name, int8_dir, e.threads, self.batch)

    def folder_on_disk(self, name: str) -> Path:
        return self.tmp / TEACHER_INT8_DIR if name == "teacher_int8" else self.folders[name]

    def final_path(self, name: str) -> Path:
        return self.out_dir / TEACHER_INT8_DIR if name == "teacher_int8" else self.folders[name]

    def close(self, name: str) -> None:
        if name == "teacher_int8" or (name == "teacher"
                                      and "teacher_int8" not in self.cfg.evaluate.models):
            self.teacher = None  # ~90 MB for MiniLM, not needed any more


def check_inputs(cfg: Config, names: list[str], folders: dict[str, Path],
                 prepared_dir: Path) -> None:
    """One-line errors for a missing split, labels file, or folder of a model in ``names``."""
    split = prepared_dir / f"{cfg.evaluate.split}.parquet"
    for path in (prepared_dir / "labels.json", split):
        if not path.is_file():
            raise KdpipeError(f"{path}: not found; run `kdpipe ingest` first")
    for name in names:
        if not folders[name].is_dir():
            raise KdpipeError(f"{folders[name]}: not found; evaluate.models lists {name!r}: "
                              f"run `kdpipe {MADE_BY[name]}` first, or leave {name!r} out "
                              "of evaluate.models")
    if {"student", "pruned"} & set(names) and not folders["teacher"].is_dir():
        raise KdpipeError(f"{folders['teacher']}: not found; students are evaluated with the "
                          "teacher's tokenizer: run `kdpipe teacher` first")


def read_rows(cfg: Config, prepared_dir: Path) -> tuple[list[str], np.ndarray]:
    """The texts and gold label ids evaluated: the first ``evaluate.max_rows`` rows of the
    ``evaluate.split`` split (all when null)."""
    path = prepared_dir / f"{cfg.evaluate.split}.parquet"
    split = read_split(path)
    rows = cfg.evaluate.max_rows or len(split.texts)
    texts, gold = list(split.texts[:rows]), np.asarray(split.labels[:rows], dtype=np.int64)
    if not texts:
        raise KdpipeError(f"{path}: no rows to evaluate on")
    return texts, gold


def check_labels(model: models.ModelUnderTest, names: list[str]) -> None:
    if model.num_labels != len(names):
        raise KdpipeError(f"{model.path}: the {model.name} model predicts {model.num_labels} "
                          f"labels but the prepared data has {len(names)} ({names})")
    predictor = model.module if model.kind in models.EXPORTED_KINDS else None
    if predictor is not None and predictor.labels != names:
        raise KdpipeError(f"{model.path / 'labels.json'}: labels {predictor.labels} differ "
                          f"from the prepared data's {names}")


def score(model: models.ModelUnderTest, texts: list[str], gold: np.ndarray,
          names: list[str], ece_bins: int, teacher_predicted: np.ndarray | None,
          advance: Callable[[], None] | None = None
          ) -> tuple[dict[str, Any], np.ndarray, list[dict[str, Any]]]:
    """Quality of ``model`` on ``texts``: (its metrics.json fields so far, its predicted
    label ids, its reliability bins). ``teacher_predicted``: the teacher's label ids, for
    the agreement (None: not known; the teacher agrees with itself)."""
    probabilities = scores.softmax(models.predict_logits(model, texts, PREDICT_BATCH, advance))
    predicted = probabilities.argmax(axis=1)
    if model.name == "teacher":
        teacher_predicted = predicted
    accuracy, macro_f1 = scores.accuracy_and_f1(gold, predicted)
    bins = scores.reliability_bins(probabilities, gold, ece_bins)
    record = {
        "kind": model.kind, "path": str(model.path), "accuracy": accuracy,
        "macro_f1": macro_f1,
        "per_class": scores.per_class_report(gold, predicted, names),
        "confusion": scores.confusion_matrix(gold, predicted, len(names)).tolist(),
        "ece": scores.expected_calibration_error(probabilities, gold, ece_bins),
        "agreement_with_teacher": (None if teacher_predicted is None
                                   else scores.agreement(predicted, teacher_predicted)),
    }
    return record, predicted, bins


def _ratio(numerator: float, denominator: float) -> float | None:
    return None if denominator == 0 else float(numerator / denominator)


def add_teacher_ratios(doc: dict[str, Any]) -> None:
    """Set each model's ``vs_teacher``: accuracy, size and params as model / teacher, and
    the speed-up at the smallest batch (p50) as teacher / model; None without a teacher."""
    teacher = doc["models"].get("teacher")
    head = report.headline_batch(doc)
    for m in doc["models"].values():
        m["vs_teacher"] = None if teacher is None else {
            "accuracy": _ratio(m["accuracy"], teacher["accuracy"]),
            f"speedup_{head}_p50": _ratio(teacher["latency_ms"][head]["p50"],
                                          m["latency_ms"][head]["p50"]),
            "size": _ratio(m["size_bytes"], teacher["size_bytes"]),
            "params": _ratio(m["params"], teacher["params"])}


def flat_metrics(doc: dict[str, Any]) -> dict[str, float]:
    """``"<model>.<metric>"`` floats (see ``run``); null values are left out."""
    out: dict[str, Any] = {}
    head = report.headline_batch(doc)
    for name, m in doc["models"].items():
        for key in ("accuracy", "macro_f1", "ece", "agreement_with_teacher", "size_bytes",
                    "params"):
            out[f"{name}.{key}"] = m[key]
        for b, timing in m["latency_ms"].items():
            out[f"{name}.latency_{b}_p50_ms"] = timing["p50"]
            out[f"{name}.latency_{b}_p95_ms"] = timing["p95"]
            out[f"{name}.tokenize_{b}_p50_ms"] = m["tokenize_ms"][b]["p50"]
            out[f"{name}.throughput_{b}"] = m["throughput"][b]
        vs = m["vs_teacher"] or {}
        for key, flat in (("accuracy", "accuracy_vs_teacher"),
                          (f"speedup_{head}_p50", f"speedup_{head}_p50"),
                          ("size", "size_vs_teacher"), ("params", "params_vs_teacher")):
            out[f"{name}.{flat}"] = vs.get(key)
    return {key: float(value) for key, value in out.items() if value is not None}
