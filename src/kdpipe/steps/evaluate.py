"""evaluate: every model of the run, side by side, on the same texts and threads.

Reads ``prepared_dir`` (``<evaluate.split>.parquet``, labels.json) and the model folders of
``evaluate.models``: ``teacher`` (teacher_dir, PyTorch), ``teacher_int8`` (the teacher
exported to ONNX and quantized here), ``student`` (student_dir, distill output, PyTorch),
``pruned`` (pruned_dir, PyTorch) and ``quantized`` (quantized_dir, an ONNX folder). Students
read the teacher's tokenizer, as in training; ONNX folders their own copy of it.

Each model is scored on the split's first ``evaluate.max_rows`` rows (all when null):
accuracy, macro-F1, per-class precision/recall/F1/support, the confusion matrix, the
expected calibration error (``evaluate.ece_bins`` bins, see ``kdpipe.metrics``), agreement
with the teacher's predictions; then timed (``kdpipe.evaluation.latency``) at each of
``evaluate.latency_batch_sizes`` on ``evaluate.threads`` threads for PyTorch and ONNX
Runtime alike; then sized (bytes of its folder's files; parameters, for ONNX the elements of
its initializers). Ratios to the teacher follow when the teacher is evaluated.

Writes ``out_dir`` atomically:

- ``metrics.json``: ``{"format": 1, "split", "rows", "threads", "labels", "reference",
  "ece_bins", "latency": {"batch_sizes", "warmup", "repeats"}, "models": {name: {"kind",
  "path", "accuracy", "macro_f1", "per_class", "confusion", "ece",
  "agreement_with_teacher", "latency_ms": {"b1": {"p50", "p95"}, ...}, "tokenize_ms",
  "throughput", "size_bytes", "params", "vs_teacher": {"accuracy", "speedup_b1_p50",
  "size", "params"}}}}``; ``agreement_with_teacher``, ``vs_teacher`` and ``reference`` are
  null when the teacher is not evaluated (a ratio is null when its divisor is 0);
- ``comparison.md``; ``plots/``: the CSV files for DVC plots and the PNG charts
  (``kdpipe.evaluation.report``);
- ``teacher_onnx/`` and ``teacher_int8/`` (only when ``teacher_int8`` is evaluated):
  exported folders ``kdpipe.serve.Predictor`` reads (``kdpipe.evaluation.teacher_onnx``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from kdpipe import metrics as scores
from kdpipe.atomic import atomic_dir, write_json
from kdpipe.config import Config
from kdpipe.errors import KdpipeError
from kdpipe.evaluation import latency, models, report, teacher_onnx
from kdpipe.progress import progress_bar
from kdpipe.steps import StepResult
from kdpipe.steps.ingest import read_labels, read_split
from kdpipe.threads import torch_threads

METRICS_FILE = "metrics.json"
COMPARISON_FILE = "comparison.md"
PLOTS_DIR = "plots"
TEACHER_ONNX_DIR = "teacher_onnx"
TEACHER_INT8_DIR = "teacher_int8"
RECORD_FORMAT = 1
PREDICT_BATCH = 64  # texts per call when scoring the split (timing uses its own sizes)
TEACHERS = ("teacher", "teacher_int8")
# The step whose output each model is (what to run when its folder is missing).
MADE_BY = {"teacher": "teacher", "teacher_int8": "teacher", "student": "distill",
           "pruned": "prune", "quantized": "quantize"}

LogMetric = Callable[[str, float, int], None]


def run(cfg: Config, prepared_dir: Path, teacher_dir: Path, student_dir: Path,
        pruned_dir: Path, quantized_dir: Path, out_dir: Path,
        log_metric: LogMetric | None = None) -> StepResult:
    """Evaluate ``cfg.evaluate.models`` into ``out_dir`` (see the module docstring).

    Metrics (flat, for MLflow and DVC): per model ``<model>.accuracy``, ``.macro_f1``,
    ``.ece``, ``.agreement_with_teacher``, ``.latency_b<B>_p50_ms``, ``.latency_b<B>_p95_ms``,
    ``.tokenize_b<B>_p50_ms``, ``.throughput_b<B>`` (texts/s), ``.size_bytes``, ``.params``,
    and with the teacher ``.accuracy_vs_teacher``, ``.speedup_b<B>_p50``,
    ``.size_vs_teacher``, ``.params_vs_teacher``. ``log_metric`` is accepted like the other
    steps' but not called: everything is known only at the end, and returned then.
    """
    e = cfg.evaluate
    prepared_dir, teacher_dir, out_dir = Path(prepared_dir), Path(teacher_dir), Path(out_dir)
    # The reference first, then its int8 copy, so the PyTorch teacher can go early.
    names = sorted(dict.fromkeys(e.models), key=lambda n: {"teacher": 0, "teacher_int8": 1}
                   .get(n, 2))
    folders = {"teacher": teacher_dir, "teacher_int8": teacher_dir, "student": Path(student_dir),
               "pruned": Path(pruned_dir), "quantized": Path(quantized_dir)}
    _check_inputs(cfg, names, folders, prepared_dir)
    label_names = read_labels(prepared_dir)
    texts, gold = _read_rows(cfg, prepared_dir)
    batch = max(PREDICT_BATCH, *e.latency_batch_sizes)  # a timed call is one forward pass
    doc: dict[str, Any] = {
        "format": RECORD_FORMAT, "split": e.split, "rows": len(texts), "threads": e.threads,
        "labels": label_names, "reference": "teacher" if "teacher" in names else None,
        "ece_bins": e.ece_bins, "latency": {"batch_sizes": list(e.latency_batch_sizes),
                                            "warmup": e.latency_warmup,
                                            "repeats": e.latency_repeats},
        "models": {}}
    predictions: dict[str, np.ndarray] = {}
    reliability: dict[str, list[dict[str, Any]]] = {}
    with torch_threads(e.threads), atomic_dir(out_dir) as tmp, progress_bar() as bar:
        opened = _Opener(cfg, folders, prepared_dir, tmp, out_dir, texts, batch)
        for name in names:
            model = opened.open(name)
            _check_labels(model, label_names)
            task = bar.add_task(f"evaluate {name}", total=-(-len(texts) // PREDICT_BATCH)
                                + latency.calls_per_model(e.latency_batch_sizes,
                                                          e.latency_warmup, e.latency_repeats))
            advance = functools.partial(bar.advance, task)
            record, predicted, bins = score(model, texts, gold, label_names, e.ece_bins,
                                            predictions.get("teacher"), advance)
            record.update(latency.measure(model, texts, e.latency_batch_sizes,
                                          e.latency_warmup, e.latency_repeats, advance))
            record["size_bytes"] = models.folder_bytes(opened.folder_on_disk(name))
            record["params"] = int(model.params)
            record["path"] = str(opened.final_path(name))
            doc["models"][name] = record
            predictions[name], reliability[name] = predicted, bins
            opened.close(name)
        add_teacher_ratios(doc)
        write_json(tmp / METRICS_FILE, doc)
        (tmp / COMPARISON_FILE).write_text(report.comparison_markdown(doc), encoding="utf-8")
        report.write_plot_data(doc, gold, predictions, reliability, tmp / PLOTS_DIR)
        charts = report.write_charts(doc, reliability, tmp / PLOTS_DIR)
    artifacts = [out_dir / METRICS_FILE, out_dir / COMPARISON_FILE,
                 *(out_dir / PLOTS_DIR / c.name for c in charts)]
    return StepResult("evaluate", out_dir, flat_metrics(doc), artifacts, summarize(doc))


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
        from kdpipe.serve import load_tokenizer

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


def _check_inputs(cfg: Config, names: list[str], folders: dict[str, Path],
                  prepared_dir: Path) -> None:
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


def _read_rows(cfg: Config, prepared_dir: Path) -> tuple[list[str], np.ndarray]:
    path = prepared_dir / f"{cfg.evaluate.split}.parquet"
    split = read_split(path)
    rows = cfg.evaluate.max_rows or len(split.texts)
    texts, gold = list(split.texts[:rows]), np.asarray(split.labels[:rows], dtype=np.int64)
    if not texts:
        raise KdpipeError(f"{path}: no rows to evaluate on")
    return texts, gold


def _check_labels(model: models.ModelUnderTest, names: list[str]) -> None:
    if model.num_labels != len(names):
        raise KdpipeError(f"{model.path}: the {model.name} model predicts {model.num_labels} "
                          f"labels but the prepared data has {len(names)} ({names})")
    predictor = model.module if model.kind == "onnx" else None
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


def summarize(doc: dict[str, Any]) -> str:
    """One line: the most accurate model that is not a teacher, against the teacher."""
    found = doc["models"]
    candidates = [n for n in found if n not in TEACHERS] or list(found)
    best = max(candidates, key=lambda n: found[n]["accuracy"])
    m, head = found[best], report.headline_batch(doc)
    line = (f"{len(found)} models on {doc['rows']:,} {doc['split']} rows; best: {best} "
            f"accuracy {m['accuracy']:.2%}, {head} p50 {m['latency_ms'][head]['p50']:.2f} ms, "
            f"{m['size_bytes'] / 1e6:.2f} MB")
    vs = m["vs_teacher"]
    if vs and best != "teacher":
        line += (f" (teacher: {found['teacher']['accuracy']:.2%}; speed-up "
                 f"{ratio_text(vs[f'speedup_{head}_p50'])}, size {ratio_text(vs['size'])} the "
                 "teacher's)")
    return line


def ratio_text(value: float | None, missing: str = "n/a") -> str:
    """``value`` as "1.52x" (three significant digits), or ``missing``."""
    return missing if not value else f"{value:.3g}x"
