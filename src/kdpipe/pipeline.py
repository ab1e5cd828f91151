"""The steps, each declared once: what it reads, what it writes, which settings it uses.

``STEPS`` is the one table of the pipeline. For each step it says

- ``inputs``: the folders it reads, as ``run()`` keyword -> ``Layout`` folder name;
- ``output``: the ``Layout`` folder it writes (its ``out_dir``);
- ``settings``: the params.yaml keys it reads (a section, or ``section.key``);
- ``resumable``: whether it keeps training state in a checkpoint folder between attempts.

The adapters follow it: ``kdpipe run`` and the CLI call ``Step.call`` (paths under
work_dir); the Kubeflow components call ``Step.run`` on artifact paths and each task
receives ``subset(cfg, step.settings)`` only, so KFP's cache re-runs what ``dvc repro`` would;
dvc.yaml's stages are tested against it (``deps`` = input files + the code the step imports,
``params`` = settings, ``outs`` = output). Every call goes through ``step_settings.view``, so
a step that reads a setting it did not declare fails at once instead of reading a default
inside a KFP task.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from kdpipe.config import Config
from kdpipe.step_result import StepResult
from kdpipe.step_settings import view

LogMetric = Callable[[str, float, int], None]

# What register tags the model with (Config.params_hash) covers every setting that shapes the
# model, so register reads them all; tracking, kfp and work_dir say where, not what.
MODEL_SETTINGS = ("seed", "data", "ingest", "teacher", "soft_labels", "fractionate", "student",
                  "distill", "prune", "export", "quantize", "evaluate", "registry")


@dataclass(frozen=True)
class Step:
    name: str
    help: str
    inputs: Mapping[str, str]
    output: str
    settings: tuple[str, ...]
    resumable: bool = False
    # The function in kdpipe.steps.<name> that takes these folders.
    entry: str = "run"
    # Of a folder it reads only some files of: which (dvc.yaml lists the same). A change to
    # the folder's other files does not make the step stale (new unlabeled texts do not
    # re-train the teacher).
    reads: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def command(self) -> str:
        """The CLI subcommand (and DVC stage cmd) name: soft_labels -> soft-labels."""
        return self.name.replace("_", "-")

    @property
    def folders(self) -> tuple[str, ...]:
        """The Layout folders it reads, once each, in declaration order."""
        return tuple(dict.fromkeys(self.inputs.values()))

    def function(self) -> Callable[..., StepResult]:
        return getattr(importlib.import_module(f"kdpipe.steps.{self.name}"), self.entry)

    def run(self, cfg: Config, folders: Mapping[str, Path], out_dir: Path, *,
            log_metric: LogMetric | None = None,
            checkpoint_dir: Path | None = None) -> StepResult:
        """Call the step on ``folders`` (Layout name -> path) with only its settings."""
        function = self.function()
        kwargs: dict[str, object] = {param: Path(folders[folder])
                                     for param, folder in self.inputs.items()}
        if self.resumable:
            kwargs["checkpoint_dir"] = checkpoint_dir
        # Only the training and measuring steps log curves; the others take no such argument.
        if "log_metric" in inspect.signature(function).parameters:
            kwargs["log_metric"] = log_metric
        return function(view(cfg, self.settings, self.name), out_dir=Path(out_dir), **kwargs)

    def call(self, cfg: Config, log_metric: LogMetric | None) -> StepResult:
        """``run`` on the folders under ``cfg.work_dir`` (``kdpipe run``, the CLI, DVC)."""
        paths = cfg.paths
        return self.run(cfg, {name: getattr(paths, name) for name in self.folders},
                        getattr(paths, self.output), log_metric=log_metric,
                        checkpoint_dir=paths.checkpoints / self.name if self.resumable else None)


# Which texts beyond train the transfer set holds (kdpipe.steps.soft_labels.transfer_parts).
TRANSFER_PARTS = ("fractionate.include_augmented", "fractionate.include_unlabeled")


def _prepared(*names: str) -> dict[str, tuple[str, ...]]:
    """The files of ``prepared`` a step reads: train, validation, test and unlabeled are the
    Parquet splits, labels and data_card the JSON files."""
    files = tuple(f"{n}.json" if n in ("labels", "data_card") else f"{n}.parquet" for n in names)
    return {"prepared": files}


STEPS: tuple[Step, ...] = (
    Step("ingest", "Read, check and split the data; write Parquet splits and a data card.",
         inputs={}, output="prepared",
         # teacher.checkpoint: the data card's token lengths use the teacher's tokenizer.
         settings=("seed", "data", "ingest", "teacher.checkpoint")),
    Step("teacher", "Fine-tune the teacher on the prepared data (resumes if interrupted).",
         inputs={"prepared_dir": "prepared"}, output="teacher",
         reads=_prepared("train", "validation", "labels"),
         settings=("seed", "ingest.max_length", "teacher"), resumable=True),
    Step("baseline", "Score and time the teacher and its int8 ONNX copy: the yardstick.",
         inputs={"prepared_dir": "prepared", "teacher_dir": "teacher"}, output="baseline",
         reads=_prepared("validation", "test", "labels"),
         settings=("ingest.max_length", "export", "quantize", "evaluate")),
    Step("soft_labels", "Cache the teacher's logits and [CLS] features for every split.",
         inputs={"teacher_dir": "teacher", "prepared_dir": "prepared"}, output="soft_labels",
         reads=_prepared("train", "validation", "test", "unlabeled"),
         settings=("seed", "ingest.max_length", "soft_labels")),
    Step("fractionate", "Select and weight the transfer set (uncertainty, balance, schedule).",
         inputs={"soft_labels_dir": "soft_labels", "prepared_dir": "prepared"},
         output="fractions", reads=_prepared("train", "labels"),
         settings=("seed", "fractionate")),
    Step("distill", "Train the student from the teacher's soft labels; keep the best.",
         inputs={"prepared_dir": "prepared", "soft_labels_dir": "soft_labels",
                 "fractions_dir": "fractions", "teacher_dir": "teacher"},
         output="student", reads=_prepared("train", "validation", "unlabeled"),
         settings=("seed", "ingest.max_length", *TRANSFER_PARTS, "student", "distill"),
         resumable=True),
    Step("prune", "Shrink the student: vocabulary, channels/heads, magnitude; report.",
         inputs={"student_dir": "student", "prepared_dir": "prepared",
                 "soft_labels_dir": "soft_labels"},
         # distill: the optional fine-tune after pruning reuses the distillation settings;
         # the transfer set's parts: its kept vocabulary is that of train and unlabeled texts.
         output="pruned", reads=_prepared("train", "validation", "unlabeled"),
         settings=("seed", "ingest.max_length", *TRANSFER_PARTS, "prune", "distill")),
    Step("export", "Export the pruned student to ONNX with its tokenizer; check parity.",
         inputs={"model_dir": "pruned", "prepared_dir": "prepared"}, output="exported",
         reads=_prepared("validation", "labels"),
         settings=("ingest.max_length", "export")),
    Step("quantize",
         "Quantize the student (ONNX Runtime int8 by default) behind an accuracy gate.",
         inputs={"export_dir": "exported", "prepared_dir": "prepared", "student_dir": "pruned"},
         output="quantized", reads=_prepared("train", "validation"),
         settings=("quantize",)),
    Step("evaluate", "Compare every model side by side: accuracy, calibration, latency, size.",
         inputs={"prepared_dir": "prepared", "teacher_dir": "teacher",
                 "baseline_dir": "baseline", "student_dir": "student", "pruned_dir": "pruned",
                 "quantized_dir": "quantized"},
         output="evaluation", reads=_prepared("validation", "test", "labels"),
         settings=("ingest.max_length", "evaluate")),
    Step("register", "Register the student in the MLflow registry; promote it through the gate.",
         inputs={"exported_dir": "exported", "quantized_dir": "quantized",
                 "evaluation_dir": "evaluation", "prepared_dir": "prepared"},
         # tracking and work_dir: where it registers (the default store is in work_dir).
         output="registration", reads=_prepared("data_card", "validation", "test"),
         settings=(*MODEL_SETTINGS, "tracking", "work_dir"),
         entry="run_candidate"),
)


def step_named(name: str) -> Step:
    return next(step for step in STEPS if step.name == name)
