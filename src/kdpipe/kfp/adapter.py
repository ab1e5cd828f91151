"""What every component does around its step, so the components stay one call each.

A component receives the whole configuration as one string (the ``params`` pipeline
parameter: JSON, or params.yaml's YAML text), runs its step through ``kdpipe.tracking``
exactly as the CLI does, and reports the step's metrics to KFP (the run's UI shows them). A
``KdpipeError`` ends the task with one line, as on the command line; ``run_local`` finds
that line through ``ERRORS_ENV``.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from kdpipe.config import Config, validate
from kdpipe.errors import ConfigError, KdpipeError
from kdpipe.steps import StepResult

LogMetric = Callable[[str, float, int], None]
# A file the failing task appends "<step>: <message>" to (set by run_local).
ERRORS_ENV = "KDPIPE_KFP_ERRORS"
PARAMS_LABEL = "pipeline parameter 'params'"


def load_params(text: str) -> Config:
    """The Config in the ``params`` pipeline parameter (JSON, or params.yaml's YAML text)."""
    try:
        raw = yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError:
        raise ConfigError(f"{PARAMS_LABEL}: not valid YAML") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{PARAMS_LABEL}: expected a mapping of sections")
    return validate(raw, PARAMS_LABEL)


def run_step(step: str, params: str, call: Callable[[Config, LogMetric | None], StepResult],
             metrics: Any = None) -> StepResult:
    """``call(cfg, log_metric)`` inside an MLflow run for ``step`` (``tracking.step_run``,
    as the CLI does); its metrics go to the ``metrics`` artifact (``Output[Metrics]``) and
    its summary line to the task's log."""
    def tracked(cfg: Config) -> StepResult:
        from kdpipe import tracking

        return tracking.step_run(cfg, step, lambda log: call(cfg, log))

    return run_untracked(step, params, tracked, metrics)


def run_untracked(step: str, params: str, call: Callable[[Config], StepResult],
                  metrics: Any = None) -> StepResult:
    """``run_step`` without an MLflow run: for tasks that are part of a step (a shard)."""
    try:
        result = call(load_params(params))
    except KdpipeError as exc:
        fail(step, exc)
    if metrics is not None:
        record_metrics(metrics, result.metrics)
    print(f"{step}: {result.summary}", flush=True)
    return result


def fail(step: str, exc: KdpipeError) -> None:
    """End the task with the error's one line (exit code 1), recorded for run_local."""
    line = f"{step}: {exc}"
    errors = os.environ.get(ERRORS_ENV)
    if errors:
        with open(errors, "a", encoding="utf-8") as handle:
            handle.write(line.replace("\n", " ") + "\n")
    print(f"error: {line}", file=sys.stderr, flush=True)
    raise SystemExit(1)


def record_metrics(artifact: Any, values: dict[str, float]) -> None:
    """Log ``values`` on a KFP ``Metrics`` artifact (the UI's scalar metrics) and write
    them as JSON to its path (what ``kdpipe run`` writes to ``metrics/<step>.json``)."""
    for name, value in values.items():
        artifact.log_metric(name, float(value))
    path = Path(artifact.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(values, indent=2) + "\n", encoding="utf-8")


def shard_indices(params: str) -> list[int]:
    """0..soft_labels.shards-1: the items of the DAG's ParallelFor over soft-label shards."""
    return list(range(load_params(params).soft_labels.shards))


def candidate_dir(cfg: Config, exported: str, quantized: str) -> Path:
    """The model folder ``registry.candidate`` names: the quantized or the exported one."""
    return Path(quantized if cfg.registry.candidate == "quantized" else exported)


def record_evaluation(cfg: Config, evaluation_dir: Path, confusion: Any, comparison: Any) -> None:
    """Show the evaluation in the KFP UI: the candidate's confusion matrix (``confusion``, a
    ``ClassificationMetrics``) and the table of every model (``comparison``, ``Markdown``)."""
    doc = _read_evaluation(evaluation_dir)
    models = doc["models"]
    name = next((n for n in (cfg.registry.candidate, "quantized") if n in models),
                next(iter(models), None))
    if name is not None and "confusion" in models[name]:
        confusion.log_confusion_matrix(list(doc["labels"]), models[name]["confusion"])
        confusion.metadata["model"] = name
    table = evaluation_dir / "comparison.md"
    _write(comparison.path, table.read_text(encoding="utf-8") if table.is_file()
           else "(no comparison table)\n")


def check_gate(cfg: Config, evaluation_dir: Path, candidate: Path, prepared_dir: Path,
               report: Any) -> bool:
    """Whether the candidate passes the gate's thresholds (``registry.gate``) on its
    evaluated metrics: the DAG registers it only then, as TFX's pusher needs a blessing.
    The comparison with the current champion is register's, which measures both on the same
    rows. Every check goes to ``report`` (``Markdown``) so the UI says why."""
    from kdpipe.registry.gate import decide
    from kdpipe.steps.register import key_metrics

    doc = _read_evaluation(evaluation_dir)
    _, metrics, notes = key_metrics(cfg, doc, evaluation_dir / "metrics.json", candidate,
                                    prepared_dir)
    # Without a champion (None) the regression check passes vacuously: leave it to register.
    checks = [c for c in decide(metrics, cfg.registry.gate, None).checks
              if c.name != "max_regression"]
    passed = all(c.passed for c in checks)
    lines = [f"**{'passed' if passed else 'failed'}**: the {cfg.registry.candidate} model "
             f"{'will' if passed else 'will not'} be registered", "",
             "| check | passed | why |", "| --- | --- | --- |",
             *(f"| {c.name} | {'yes' if c.passed else 'no'} | {c.message} |" for c in checks),
             "", "The regression check against the current champion runs in register.",
             *(f"\n{note}" for note in notes)]
    _write(report.path, "\n".join(lines) + "\n")
    why = "; ".join(c.message for c in checks if not c.passed)
    print(f"gate: {'passed' if passed else 'failed: ' + why}", flush=True)
    return passed


def _read_evaluation(evaluation_dir: Path) -> dict[str, Any]:
    path = evaluation_dir / "metrics.json"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(doc["models"], dict) and isinstance(doc["labels"], list):
            return doc
    except (OSError, ValueError, KeyError, TypeError):
        pass
    raise KdpipeError(f"{path}: not an evaluate metrics.json (models, labels); "
                      "rerun `kdpipe evaluate`")


def _write(path: str, text: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text, encoding="utf-8")
