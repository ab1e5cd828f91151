"""What every component does around its step, so the components stay one call each.

A component receives its step's settings only (``task_settings``: the keys the step declares
in ``kdpipe.pipeline.STEPS`` plus ``tracking``) as one JSON string, runs the step through
``kdpipe.tracking`` exactly as the CLI does, and reports the step's metrics to KFP (the
run's UI shows them). A ``KdpipeError`` ends the task with one line, as on the command line;
``run_local`` finds that line through ``ERRORS_ENV``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from kdpipe.config import Config
from kdpipe.errors import ConfigError, KdpipeError
from kdpipe.pipeline import step_named
from kdpipe.step_result import StepResult
from kdpipe.step_settings import from_subset, subset

LogMetric = Callable[[str, float, int], None]
# A file the failing task appends "<step>: <message>" to (set by run_local).
ERRORS_ENV = "KDPIPE_KFP_ERRORS"
# Read around every step (the MLflow run), so every task gets them.
SHARED_SETTINGS = ("tracking",)
# Tasks that are not steps of their own, and the step whose settings they get.
TASK_STEPS = {"plan_shards": "soft_labels", "soft_label_shard": "soft_labels",
              "merge_soft_labels": "soft_labels", "gate": "register"}


def task_settings(task: str) -> tuple[str, ...]:
    """The settings keys the KFP task ``task`` (a step or a TASK_STEPS task) receives."""
    return (*step_named(TASK_STEPS.get(task, task)).settings, *SHARED_SETTINGS)


def settings_text(cfg: Config, task: str) -> str:
    """``cfg``'s settings for ``task`` as the task's input: JSON on one line, keys in
    params.yaml's order. (Multi-line text would break the compiled file: kfp copies each
    parameter's default into a one-line comment at its top.)"""
    return json.dumps(subset(cfg, task_settings(task)), ensure_ascii=False)


def load_settings(text: str, task: str) -> Config:
    """The Config of a task's ``settings`` input (JSON, or YAML text): its own settings,
    defaults elsewhere (which the step's settings view never lets it read)."""
    label = f"settings of task {task!r}"
    try:
        raw = yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError:
        raise ConfigError(f"{label}: not valid YAML") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{label}: expected a mapping of sections")
    return from_subset(raw, label)


def run_declared(step: str, settings: str, inputs: Mapping[str, Any], output: Any,
                 metrics: Any = None, checkpoint_root: str = "") -> StepResult:
    """Run ``step`` as ``kdpipe.pipeline.STEPS`` declares it: ``inputs`` are its input
    artifacts by Layout folder name, ``output`` the artifact it writes into.

    A resumable step keeps its state under ``checkpoint_root`` (a volume that outlives the
    pod) when given, else in a scratch folder that goes with the task."""
    declared = step_named(step)
    folders = {name: Path(inputs[name].path) for name in declared.folders}

    def call(cfg: Config, log: LogMetric | None) -> StepResult:
        with _checkpoints(declared.resumable, checkpoint_root, step, settings,
                          [inputs[name].uri for name in declared.folders]) as state:
            return declared.run(cfg, folders, Path(output.path), log_metric=log,
                                checkpoint_dir=state)

    return run_tracked(step, settings, call, metrics)


def run_tracked(step: str, settings: str, call: Callable[[Config, LogMetric | None], StepResult],
                metrics: Any = None, task: str | None = None) -> StepResult:
    """``call(cfg, log_metric)`` inside an MLflow run for ``step`` (``tracking.step_run``,
    as the CLI does, logging the task's own settings as params); its metrics go to the
    ``metrics`` artifact (``Output[Metrics]``) and its summary line to the task's log."""
    def tracked(cfg: Config) -> StepResult:
        from kdpipe import tracking

        return tracking.step_run(cfg, step, lambda log: call(cfg, log),
                                 settings=yaml.safe_load(settings) if settings.strip() else {})

    return run_untracked(step, settings, tracked, metrics, task)


def run_untracked(step: str, settings: str, call: Callable[[Config], StepResult],
                  metrics: Any = None, task: str | None = None) -> StepResult:
    """``call(cfg)`` with the task's settings, its KdpipeError as the task's one line: for
    tasks that are part of a step (a shard), and under ``run_tracked``."""
    try:
        result = call(load_settings(settings, task or step))
    except KdpipeError as exc:
        fail(step, exc)
    if metrics is not None:
        record_metrics(metrics, result.metrics)
    print(f"{step}: {result.summary}", flush=True)
    return result


@contextmanager
def _checkpoints(resumable: bool, root: str, step: str, settings: str,
                 uris: list[str]) -> Iterator[Path | None]:
    """The folder a resumable step keeps its state in. On a volume it is keyed by the task's
    settings and input artifacts' URIs: a retry of the same task (same run, same inputs)
    finds it, while other runs sharing the claim get folders of their own."""
    if not resumable:
        yield None
        return
    if root:
        key = hashlib.sha256(json.dumps([settings, uris]).encode()).hexdigest()[:16]
        folder = Path(root) / f"{step}-{key}"
        print(f"{step}: resumable state in {folder}", flush=True)
        yield folder
        return
    # No volume: the state lives as long as the task, and a retried pod starts over.
    with tempfile.TemporaryDirectory(prefix=f"{step}-") as scratch:
        yield Path(scratch) / "checkpoints"


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


def shard_indices(settings: str) -> list[int]:
    """0..soft_labels.shards-1: the items of the DAG's ParallelFor over soft-label shards."""
    return list(range(load_settings(settings, "plan_shards").soft_labels.shards))


def record_evaluation(evaluation_dir: Path, confusion: Any, comparison: Any) -> None:
    """Show the evaluation in the KFP UI: the last model's confusion matrix (``confusion``, a
    ``ClassificationMetrics``) and the table of every model (``comparison``, ``Markdown``)."""
    doc = _read_evaluation(evaluation_dir)
    models = doc["models"]
    # The most compressed model evaluated (the last in the table) is the one a run ships;
    # which one register takes is register's setting, not evaluate's.
    name = next((n for n in reversed(list(models)) if "confusion" in models[n]), None)
    if name is not None:
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
    from kdpipe.step_settings import view
    from kdpipe.steps.register import key_metrics

    cfg = view(cfg, task_settings("gate"), "gate")
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
