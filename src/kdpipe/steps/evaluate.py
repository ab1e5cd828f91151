"""evaluate: every model of the run, side by side, on the same texts and threads.

Reads ``prepared_dir`` (``<evaluate.split>.parquet``, labels.json), the baseline step's
output (the teachers' records, ``kdpipe.steps.baseline``) and the model folders of
``evaluate.models`` that are not teachers: ``student`` (student_dir, distill output,
PyTorch), ``pruned`` (pruned_dir, PyTorch) and ``quantized`` (quantized_dir, an ONNX
folder). Students read the teacher's tokenizer, as in training; ONNX folders their own copy.
The teachers are scored in their own step so that a change to the student (a distill
parameter, say) re-runs neither the teacher's export and quantization nor its timing.

Each model is scored on the split's first ``evaluate.max_rows`` rows (all when null):
accuracy, macro-F1, per-class precision/recall/F1/support, the confusion matrix, the
expected calibration error (``evaluate.ece_bins`` bins, see ``kdpipe.evaluation.metrics``),
agreement with the teacher's predictions; then timed (``kdpipe.evaluation.latency``) at each of
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
  (``kdpipe.evaluation.report``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from kdpipe.atomic import atomic_dir, write_json
from kdpipe.config import Config
from kdpipe.evaluation import report
from kdpipe.evaluation.scoring import (
    TEACHERS,
    add_teacher_ratios,
    check_inputs,
    flat_metrics,
    model_names,
    new_document,
    read_rows,
    score_models,
)
from kdpipe.step_result import StepResult
from kdpipe.steps import baseline
from kdpipe.threads import torch_threads

METRICS_FILE = "metrics.json"
COMPARISON_FILE = "comparison.md"
PLOTS_DIR = "plots"

LogMetric = Callable[[str, float, int], None]


def run(cfg: Config, prepared_dir: Path, teacher_dir: Path, baseline_dir: Path,
        student_dir: Path, pruned_dir: Path, quantized_dir: Path, out_dir: Path,
        log_metric: LogMetric | None = None) -> StepResult:
    """Evaluate ``cfg.evaluate.models`` into ``out_dir`` (see the module docstring); the
    teachers' records, label ids and reliability bins come from ``baseline_dir``, made with
    the same evaluate settings.

    Metrics (flat, for MLflow and DVC): per model ``<model>.accuracy``, ``.macro_f1``,
    ``.ece``, ``.agreement_with_teacher``, ``.latency_b<B>_p50_ms``, ``.latency_b<B>_p95_ms``,
    ``.tokenize_b<B>_p50_ms``, ``.throughput_b<B>`` (texts/s), ``.size_bytes``, ``.params``,
    and with the teacher ``.accuracy_vs_teacher``, ``.speedup_b<B>_p50``,
    ``.size_vs_teacher``, ``.params_vs_teacher``. ``log_metric`` is accepted like the other
    steps' but not called: everything is known only at the end, and returned then.
    """
    prepared_dir, out_dir = Path(prepared_dir), Path(out_dir)
    names = model_names(cfg)
    students = [n for n in names if n not in TEACHERS]
    folders = {"teacher": Path(teacher_dir), "student": Path(student_dir),
               "pruned": Path(pruned_dir), "quantized": Path(quantized_dir)}
    check_inputs(cfg, students, folders, prepared_dir)
    texts, gold = read_rows(cfg, prepared_dir)
    doc = new_document(cfg, prepared_dir, len(texts))
    predictions: dict[str, np.ndarray] = {}
    reliability: dict[str, list[dict[str, Any]]] = {}
    teachers = [n for n in names if n in TEACHERS]
    if teachers:
        scored = baseline.read(Path(baseline_dir), doc, teachers)
        for name in teachers:
            doc["models"][name] = scored.records[name]
            predictions[name], reliability[name] = (scored.predictions[name],
                                                    scored.reliability[name])
    with torch_threads(cfg.evaluate.threads), atomic_dir(out_dir) as tmp:
        score_models(cfg, students, folders, prepared_dir, texts, gold, doc, predictions,
                     reliability, tmp, out_dir)
        add_teacher_ratios(doc)
        write_json(tmp / METRICS_FILE, doc)
        (tmp / COMPARISON_FILE).write_text(report.comparison_markdown(doc), encoding="utf-8")
        report.write_plot_data(doc, gold, predictions, reliability, tmp / PLOTS_DIR)
        charts = report.write_charts(doc, reliability, tmp / PLOTS_DIR)
    artifacts = [out_dir / METRICS_FILE, out_dir / COMPARISON_FILE,
                 *(out_dir / PLOTS_DIR / c.name for c in charts)]
    return StepResult("evaluate", out_dir, flat_metrics(doc), artifacts, summarize(doc))


def summarize(doc: dict[str, Any]) -> str:
    """One line: the most accurate model that is not a teacher (the faster of a tie), against
    the teacher."""
    found, head = doc["models"], report.headline_batch(doc)
    candidates = [n for n in found if n not in TEACHERS] or list(found)
    best = max(candidates, key=lambda n: (found[n]["accuracy"],
                                          -found[n]["latency_ms"][head]["p50"]))
    m = found[best]
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
