"""One Kubeflow Pipelines v2 component per step: artifacts in, the step's function, artifacts
out.

Each component is a lightweight Python component whose body KFP copies into the task's
container and runs there, so a body imports what it needs and calls the step through
``kdpipe.kfp.adapter``. A folder output is written straight to the artifact's ``.path``
(the step's ``out_dir``). Settings arrive as one string holding every setting of
params.yaml, so the DAG cannot drift from it. No packages are installed at task start: the
image (a pipeline parameter, set per task with ``set_container_image``) already holds
kdpipe and kfp.

(No ``from __future__ import annotations`` here: KFP reads the annotations as types.)
"""

from typing import List

from kfp import dsl
from kfp.dsl import (Artifact, ClassificationMetrics, Dataset, Input, Markdown, Metrics, Model,
                     Output)

# Fixed when the module is imported, so only a placeholder: the pipeline sets every task's
# image from its cpu_image / gpu_image parameters.
PLACEHOLDER_IMAGE = "kdpipe:placeholder"


def component(func):
    """``dsl.component`` as every kdpipe component needs it: nothing pip-installed at task
    start (the image has it all; offline runs stay offline)."""
    return dsl.component(func, base_image=PLACEHOLDER_IMAGE, install_kfp_package=False)


@component
def ingest(params: str, prepared: Output[Dataset], metrics: Output[Metrics]):
    from pathlib import Path

    from kdpipe.kfp.adapter import run_step
    from kdpipe.steps import ingest as step

    run_step("ingest", params, lambda cfg, log: step.run(cfg, Path(prepared.path)), metrics)


@component
def teacher(params: str, prepared: Input[Dataset], teacher: Output[Model],
            metrics: Output[Metrics]):
    import tempfile
    from pathlib import Path

    from kdpipe.kfp.adapter import run_step
    from kdpipe.steps import teacher as step

    # Resumable state lives only as long as the task: a retried pod starts over.
    with tempfile.TemporaryDirectory(prefix="teacher-") as scratch:
        run_step("teacher", params, lambda cfg, log: step.run(
            cfg, Path(prepared.path), Path(teacher.path), Path(scratch) / "checkpoints",
            log_metric=log), metrics)


@component
def baseline(params: str, prepared: Input[Dataset], teacher: Input[Model],
             baseline: Output[Artifact], metrics: Output[Metrics]):
    from pathlib import Path

    from kdpipe.kfp.adapter import run_step
    from kdpipe.steps import baseline as step

    run_step("baseline", params, lambda cfg, log: step.run(
        cfg, Path(prepared.path), Path(teacher.path), Path(baseline.path)), metrics)


@component
def plan_shards(params: str) -> List[int]:
    from kdpipe.kfp.adapter import shard_indices

    return shard_indices(params)


@component
def soft_label_shard(params: str, shard: int, teacher: Input[Model], prepared: Input[Dataset],
                     soft_labels_shard: Output[Dataset]):
    from pathlib import Path

    from kdpipe.kfp.adapter import run_untracked
    from kdpipe.steps import soft_label_shards as step

    run_untracked("soft_labels", params, lambda cfg: step.run_shard(
        cfg, Path(teacher.path), Path(prepared.path), Path(soft_labels_shard.path), shard,
        cfg.soft_labels.shards))


@component
def merge_soft_labels(params: str, shards: Input[List[Dataset]], prepared: Input[Dataset],
                      soft_labels: Output[Dataset], metrics: Output[Metrics]):
    from pathlib import Path

    from kdpipe.kfp.adapter import run_step
    from kdpipe.steps import soft_label_shards as step

    run_step("soft_labels", params, lambda cfg, log: step.merge(
        [Path(s.path) for s in shards], Path(soft_labels.path), Path(prepared.path)), metrics)


@component
def fractionate(params: str, soft_labels: Input[Dataset], prepared: Input[Dataset],
                fractions: Output[Dataset], metrics: Output[Metrics]):
    from pathlib import Path

    from kdpipe.kfp.adapter import run_step
    from kdpipe.steps import fractionate as step

    run_step("fractionate", params, lambda cfg, log: step.run(
        cfg, Path(soft_labels.path), Path(prepared.path), Path(fractions.path)), metrics)


@component
def distill(params: str, prepared: Input[Dataset], soft_labels: Input[Dataset],
            fractions: Input[Dataset], teacher: Input[Model], student: Output[Model],
            metrics: Output[Metrics]):
    from pathlib import Path

    from kdpipe.kfp.adapter import run_step
    from kdpipe.steps import distill as step

    run_step("distill", params, lambda cfg, log: step.run(
        cfg, Path(prepared.path), Path(soft_labels.path), Path(fractions.path),
        Path(teacher.path), Path(student.path), log_metric=log), metrics)


@component
def prune(params: str, student: Input[Model], prepared: Input[Dataset],
          soft_labels: Input[Dataset], pruned: Output[Model], metrics: Output[Metrics]):
    from pathlib import Path

    from kdpipe.kfp.adapter import run_step
    from kdpipe.steps import prune as step

    run_step("prune", params, lambda cfg, log: step.run(
        cfg, Path(student.path), Path(prepared.path), Path(soft_labels.path),
        Path(pruned.path)), metrics)


@component
def export(params: str, pruned: Input[Model], prepared: Input[Dataset], exported: Output[Model],
           metrics: Output[Metrics]):
    from pathlib import Path

    from kdpipe.kfp.adapter import run_step
    from kdpipe.steps import export as step

    run_step("export", params, lambda cfg, log: step.run(
        cfg, Path(pruned.path), Path(prepared.path), Path(exported.path)), metrics)


@component
def quantize(params: str, exported: Input[Model], pruned: Input[Model],
             prepared: Input[Dataset], quantized: Output[Model], metrics: Output[Metrics]):
    from pathlib import Path

    from kdpipe.kfp.adapter import run_step
    from kdpipe.steps import quantize as step

    run_step("quantize", params, lambda cfg, log: step.run(
        cfg, Path(exported.path), Path(prepared.path), Path(quantized.path),
        Path(pruned.path)), metrics)


@component
def evaluate(params: str, prepared: Input[Dataset], teacher: Input[Model],
             baseline: Input[Artifact], student: Input[Model], pruned: Input[Model], quantized: Input[Model],
             evaluation: Output[Artifact], metrics: Output[Metrics],
             confusion: Output[ClassificationMetrics], comparison: Output[Markdown]):
    from pathlib import Path

    from kdpipe.kfp.adapter import record_evaluation, run_step
    from kdpipe.steps import evaluate as step

    def call(cfg, log):
        result = step.run(cfg, Path(prepared.path), Path(teacher.path), Path(baseline.path),
                          Path(student.path), Path(pruned.path), Path(quantized.path),
                          Path(evaluation.path), log_metric=log)
        record_evaluation(cfg, Path(evaluation.path), confusion, comparison)
        return result

    run_step("evaluate", params, call, metrics)


@component
def gate(params: str, evaluation: Input[Artifact], exported: Input[Model],
         quantized: Input[Model], prepared: Input[Dataset], checks: Output[Markdown]) -> bool:
    # A plain bool (KFP names it "Output"): kfp.local resolves dsl.If only on such outputs.
    from pathlib import Path

    from kdpipe.errors import KdpipeError
    from kdpipe.kfp.adapter import candidate_dir, check_gate, fail, load_params

    try:
        cfg = load_params(params)
        return check_gate(cfg, Path(evaluation.path), candidate_dir(
            cfg, exported.path, quantized.path), Path(prepared.path), checks)
    except KdpipeError as exc:
        fail("gate", exc)


@component
def register(params: str, exported: Input[Model], quantized: Input[Model],
             evaluation: Input[Artifact], prepared: Input[Dataset],
             registration: Output[Artifact], metrics: Output[Metrics]):
    from pathlib import Path

    from kdpipe.kfp.adapter import candidate_dir, run_step
    from kdpipe.steps import register as step

    run_step("register", params, lambda cfg, log: step.run(
        cfg, candidate_dir(cfg, exported.path, quantized.path), Path(evaluation.path),
        Path(prepared.path), Path(registration.path)), metrics)
