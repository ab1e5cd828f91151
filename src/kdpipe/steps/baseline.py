"""baseline: the teacher, scored and timed once, as the yardstick every student is held to.

Reads ``prepared_dir`` (``<evaluate.split>.parquet``, labels.json) and ``teacher_dir``, and
evaluates the teachers that ``evaluate.models`` lists, exactly as the evaluate step
evaluates the students (``kdpipe.evaluation.scoring``: same rows, threads, batch sizes,
repeats): ``teacher`` (PyTorch) and ``teacher_int8`` (the teacher exported to ONNX and
int8-quantized here: what a user gets by only quantizing the teacher). It is its own step
so that DVC and KFP re-run it only when the teacher, the data or the evaluate, export or
quantize settings change, not after every change to the student.

Writes ``out_dir`` atomically:

- ``metrics.json``: the evaluate step's document (see ``kdpipe.steps.evaluate``) with the
  teachers' records only, plus ``"reliability": {model: bins}``;
- ``predicted_<model>.npy``: each teacher's predicted label ids (int64, one per row), for
  the students' agreement and the confusion plots;
- ``teacher_onnx/`` and ``teacher_int8/`` (when ``teacher_int8`` is listed): exported
  folders ``kdpipe.serving.predictor.Predictor`` reads (``kdpipe.evaluation.teacher_onnx``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kdpipe.atomic import atomic_dir, write_json
from kdpipe.config import Config
from kdpipe.errors import KdpipeError
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
from kdpipe.threads import torch_threads

METRICS_FILE = "metrics.json"
PREDICTED_FILE = "predicted_{model}.npy"
# Header fields that must match between this step's document and the evaluate step's.
SHARED_SETTINGS = ("format", "split", "rows", "threads", "labels", "ece_bins", "latency")

LogMetric = Callable[[str, float, int], None]


@dataclass(frozen=True)
class Scored:
    """The teachers as the baseline step left them, for the evaluate step."""

    records: dict[str, dict[str, Any]]
    predictions: dict[str, np.ndarray]
    reliability: dict[str, list[dict[str, Any]]]


def run(cfg: Config, prepared_dir: Path, teacher_dir: Path, out_dir: Path,
        log_metric: LogMetric | None = None) -> StepResult:
    """Score, time and size the teachers of ``evaluate.models`` into ``out_dir`` (see the
    module docstring). Metrics: the evaluate step's, for the teachers only."""
    prepared_dir, teacher_dir, out_dir = Path(prepared_dir), Path(teacher_dir), Path(out_dir)
    teachers = [n for n in model_names(cfg) if n in TEACHERS]
    folders = {"teacher": teacher_dir, "teacher_int8": teacher_dir}
    check_inputs(cfg, teachers, folders, prepared_dir)
    texts, gold = read_rows(cfg, prepared_dir)
    doc = new_document(cfg, prepared_dir, len(texts))
    predictions: dict[str, np.ndarray] = {}
    reliability: dict[str, list[dict[str, Any]]] = {}
    with torch_threads(cfg.evaluate.threads), atomic_dir(out_dir) as tmp:
        score_models(cfg, teachers, folders, prepared_dir, texts, gold, doc, predictions,
                     reliability, tmp, out_dir)
        add_teacher_ratios(doc)
        for name, predicted in predictions.items():
            np.save(tmp / PREDICTED_FILE.format(model=name), predicted.astype(np.int64))
        write_json(tmp / METRICS_FILE, {**doc, "reliability": reliability})
    return StepResult("baseline", out_dir, flat_metrics(doc), [out_dir / METRICS_FILE],
                      _summary(doc))


def _summary(doc: dict[str, Any]) -> str:
    if not doc["models"]:
        return "evaluate.models lists no teacher: nothing to measure"
    head = report.headline_batch(doc)
    parts = [f"{name} accuracy {m['accuracy']:.2%}, {head} p50 "
             f"{m['latency_ms'][head]['p50']:.2f} ms" for name, m in doc["models"].items()]
    return f"on {doc['rows']:,} {doc['split']} rows: " + "; ".join(parts)


def read(baseline_dir: Path, expected: dict[str, Any], names: list[str]) -> Scored:
    """The records of ``names`` from a baseline output, checked against ``expected`` (the
    evaluate step's document header): a teacher timed on other rows, threads or batch
    sizes cannot stand beside the students. Any mismatch is a one-line ``KdpipeError``."""
    path = Path(baseline_dir) / METRICS_FILE
    rerun = "run `kdpipe baseline` with the same settings"
    if not path.parent.is_dir():
        raise KdpipeError(f"{path.parent}: not found; evaluate.models lists {names[0]!r}: "
                          "run `kdpipe baseline` first")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KdpipeError(f"{path}: not found; evaluate.models lists {names[0]!r}: "
                          "run `kdpipe baseline` first") from None
    except (OSError, ValueError) as exc:
        raise KdpipeError(f"{path}: unreadable ({exc}); {rerun}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("models"), dict):
        raise KdpipeError(f"{path}: not a baseline metrics.json; {rerun}")
    for key in SHARED_SETTINGS:
        if doc.get(key) != expected[key]:
            raise KdpipeError(f"{path}: made with {key}={doc.get(key)!r}, this evaluation "
                              f"uses {expected[key]!r}; {rerun}")
    records, predictions, reliability = {}, {}, {}
    for name in names:
        if name not in doc["models"]:
            raise KdpipeError(f"{path}: has no {name!r} (evaluate.models changed?); {rerun}")
        predicted_path = path.parent / PREDICTED_FILE.format(model=name)
        try:
            predicted = np.load(predicted_path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise KdpipeError(f"{predicted_path}: unreadable ({exc}); {rerun}") from None
        if predicted.shape != (expected["rows"],) or predicted.dtype.kind not in "iu":
            raise KdpipeError(f"{predicted_path}: {predicted.shape} {predicted.dtype}, "
                              f"expected {expected['rows']} label ids; {rerun}")
        records[name] = doc["models"][name]
        predictions[name] = predicted.astype(np.int64)
        reliability[name] = doc.get("reliability", {}).get(name, [])
    return Scored(records, predictions, reliability)
