"""The steps in order, wired to their paths under work_dir, for ``kdpipe run`` and the CLI.

dvc.yaml declares the same stages and paths (a test checks they agree); the KFP DAG maps
them onto artifacts. Each step gets a ``log_metric(name, value, step)`` callable from the
adapter (MLflow when tracking is on) for curves such as the training loss.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kdpipe.config import Config
from kdpipe.steps import StepResult

LogMetric = Callable[[str, float, int], None]


@dataclass(frozen=True)
class Step:
    name: str
    help: str
    call: Callable[[Config, LogMetric | None], StepResult]

    @property
    def command(self) -> str:
        """The CLI subcommand (and DVC stage cmd) name: soft_labels -> soft-labels."""
        return self.name.replace("_", "-")


def _ingest(cfg: Config, log_metric: LogMetric | None) -> StepResult:
    from kdpipe.steps import ingest

    return ingest.run(cfg, cfg.paths.prepared)


def _teacher(cfg: Config, log_metric: LogMetric | None) -> StepResult:
    from kdpipe.steps import teacher

    paths = cfg.paths
    return teacher.run(cfg, paths.prepared, paths.teacher, paths.teacher_checkpoints,
                       log_metric=log_metric)


def _soft_labels(cfg: Config, log_metric: LogMetric | None) -> StepResult:
    from kdpipe.steps import soft_labels

    paths = cfg.paths
    return soft_labels.run(cfg, paths.teacher, paths.prepared, paths.soft_labels)


def _fractionate(cfg: Config, log_metric: LogMetric | None) -> StepResult:
    from kdpipe.steps import fractionate

    paths = cfg.paths
    return fractionate.run(cfg, paths.soft_labels, paths.prepared, paths.fractions)


def _distill(cfg: Config, log_metric: LogMetric | None) -> StepResult:
    from kdpipe.steps import distill

    paths = cfg.paths
    return distill.run(cfg, paths.prepared, paths.soft_labels, paths.fractions, paths.teacher,
                       paths.student, log_metric=log_metric,
                       checkpoint_dir=paths.distill_checkpoints)


def _prune(cfg: Config, log_metric: LogMetric | None) -> StepResult:
    from kdpipe.steps import prune

    paths = cfg.paths
    return prune.run(cfg, paths.student, paths.prepared, paths.soft_labels, paths.pruned)


def _export(cfg: Config, log_metric: LogMetric | None) -> StepResult:
    from kdpipe.steps import export

    paths = cfg.paths
    return export.run(cfg, paths.pruned, paths.prepared, paths.exported)


def _quantize(cfg: Config, log_metric: LogMetric | None) -> StepResult:
    from kdpipe.steps import quantize

    paths = cfg.paths
    return quantize.run(cfg, paths.exported, paths.prepared, paths.quantized, paths.pruned)


def _baseline(cfg: Config, log_metric: LogMetric | None) -> StepResult:
    from kdpipe.steps import baseline

    paths = cfg.paths
    return baseline.run(cfg, paths.prepared, paths.teacher, paths.baseline,
                        log_metric=log_metric)


def _evaluate(cfg: Config, log_metric: LogMetric | None) -> StepResult:
    from kdpipe.steps import evaluate

    paths = cfg.paths
    return evaluate.run(cfg, paths.prepared, paths.teacher, paths.baseline, paths.student,
                        paths.pruned, paths.quantized, paths.evaluation,
                        log_metric=log_metric)


def _register(cfg: Config, log_metric: LogMetric | None) -> StepResult:
    from kdpipe.steps import register

    paths = cfg.paths
    return register.run(cfg, register.candidate_folder(cfg), paths.evaluation, paths.prepared,
                        paths.registration)


STEPS: tuple[Step, ...] = (
    Step("ingest", "Read, check and split the data; write Parquet splits and a data card.",
         _ingest),
    Step("teacher", "Fine-tune the teacher on the prepared data (resumes if interrupted).",
         _teacher),
    Step("baseline", "Score and time the teacher and its int8 ONNX copy: the yardstick.",
         _baseline),
    Step("soft_labels", "Cache the teacher's logits and [CLS] features for every split.",
         _soft_labels),
    Step("fractionate", "Select and weight the transfer set (uncertainty, balance, schedule).",
         _fractionate),
    Step("distill", "Train the student from the teacher's soft labels; keep the best.",
         _distill),
    Step("prune", "Shrink the student: vocabulary, channels/heads, magnitude; report.",
         _prune),
    Step("export", "Export the pruned student to ONNX with its tokenizer; check parity.",
         _export),
    Step("quantize",
         "Quantize the student (ONNX Runtime int8 by default) behind an accuracy gate.",
         _quantize),
    Step("evaluate", "Compare every model side by side: accuracy, calibration, latency, size.",
         _evaluate),
    Step("register", "Register the student in the MLflow registry; promote it through the gate.",
         _register),
)


def step_named(name: str) -> Step:
    return next(step for step in STEPS if step.name == name)
