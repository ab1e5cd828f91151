"""One Kubeflow Pipelines v2 component per step: artifacts in, the step's function, artifacts
out.

Each component is a lightweight Python component whose body KFP copies into the task's
container and runs there: it hands its artifacts to ``kdpipe.kfp.adapter.run_declared``,
which calls the step as ``kdpipe.pipeline.STEPS`` declares it. Artifact names are the
Layout folder names of that table (a test checks they match). A folder output is written
straight to the artifact's ``.path`` (the step's ``out_dir``). ``settings`` carries the
step's own settings only (JSON), so a task's cache key changes only with them. No packages
are installed at task start: the image (set per task by the pipeline) holds kdpipe and kfp.

The docstrings' ``Args:`` become the descriptions in the compiled component YAML
(``components/<step>/component.yaml``) and its README.

(No ``from __future__ import annotations`` here: KFP reads the annotations as types.)
"""


from kfp import dsl
from kfp.dsl import (
    Artifact,
    ClassificationMetrics,
    Dataset,
    Input,
    Markdown,
    Metrics,
    Model,
    Output,
)

# Fixed when the module is imported, so only a placeholder: the pipeline sets every task's
# image from its cpu_image / gpu_image parameters.
PLACEHOLDER_IMAGE = "kdpipe:placeholder"


def component(func):
    """``dsl.component`` as every kdpipe component needs it: nothing pip-installed at task
    start (the image has it all; offline runs stay offline)."""
    return dsl.component(func, base_image=PLACEHOLDER_IMAGE, install_kfp_package=False)


@component
def ingest(settings: str, prepared: Output[Dataset], metrics: Output[Metrics]):
    """Read, check and split the data source; write Parquet splits and a data card.

    Args:
        settings: The step's settings as JSON (seed, data, ingest, teacher.checkpoint,
            tracking). data.source may be a file or folder on s3://, gs:// or https://.
        prepared: train/validation/test.parquet, labels.json and data_card.json.
        metrics: Rows per split, classes, repeated rows.
    """
    from kdpipe.kfp.adapter import run_declared

    run_declared("ingest", settings, {}, prepared, metrics)


@component
def teacher(settings: str, prepared: Input[Dataset], teacher: Output[Model],
            metrics: Output[Metrics], checkpoint_root: str = ""):
    """Fine-tune the teacher on the prepared data; resumes from its last checkpoint.

    Args:
        settings: The step's settings as JSON (seed, ingest.max_length, teacher, tracking).
        prepared: The ingest step's output.
        teacher: The fine-tuned checkpoint (safetensors) and its tokenizer.
        metrics: Validation accuracy, steps, seconds.
        checkpoint_root: A folder that outlives the pod (a mounted volume) for the resumable
            training state; empty: a scratch folder, so a retried pod starts over.
    """
    from kdpipe.kfp.adapter import run_declared

    run_declared("teacher", settings, {"prepared": prepared}, teacher, metrics,
                 checkpoint_root)


@component
def baseline(settings: str, prepared: Input[Dataset], teacher: Input[Model],
             baseline: Output[Artifact], metrics: Output[Metrics]):
    """Score and time the teacher and its int8 ONNX copy: the yardstick of the students.

    Args:
        settings: The step's settings as JSON (ingest.max_length, export, quantize, evaluate,
            tracking).
        prepared: The ingest step's output.
        teacher: The teacher step's output.
        baseline: The teachers' evaluation records and their ONNX folders (fp32, int8).
        metrics: The teachers' accuracy and latency.
    """
    from kdpipe.kfp.adapter import run_declared

    run_declared("baseline", settings, {"prepared": prepared, "teacher": teacher}, baseline,
                 metrics)


@component
def plan_shards(settings: str) -> list[int]:
    """The shard numbers the soft labels are computed in (soft_labels.shards of them).

    Args:
        settings: The soft_labels step's settings as JSON.

    Returns:
        0, 1, ..., soft_labels.shards - 1: the items of the ParallelFor over shards.
    """
    from kdpipe.kfp.adapter import shard_indices

    return shard_indices(settings)


@component
def soft_label_shard(settings: str, shard: int, teacher: Input[Model], prepared: Input[Dataset],
                     soft_labels_shard: Output[Dataset]):
    """The teacher's logits (and [CLS] features) for one shard of every split.

    Args:
        settings: The soft_labels step's settings as JSON.
        shard: Which shard, 0 to soft_labels.shards - 1.
        teacher: The teacher step's output.
        prepared: The ingest step's output.
        soft_labels_shard: This shard's arrays, merged by merge-soft-labels.
    """
    from pathlib import Path

    from kdpipe.kfp.adapter import run_untracked, task_settings
    from kdpipe.step_settings import view
    from kdpipe.steps import soft_label_shards as step

    run_untracked("soft_labels", settings, lambda cfg: step.run_shard(
        view(cfg, task_settings("soft_label_shard"), "soft_labels"), Path(teacher.path),
        Path(prepared.path), Path(soft_labels_shard.path), shard, cfg.soft_labels.shards),
        task="soft_label_shard")


@component
def merge_soft_labels(settings: str, shards: Input[list[Dataset]], prepared: Input[Dataset],
                      soft_labels: Output[Dataset], metrics: Output[Metrics]):
    """Merge the shards into the folder the soft_labels step makes in one process.

    Args:
        settings: The soft_labels step's settings as JSON.
        shards: Every soft-label-shard task's output.
        prepared: The ingest step's output.
        soft_labels: The soft labels of every split, byte for byte those of one process.
        metrics: Texts labelled, seconds, throughput.
    """
    from pathlib import Path

    from kdpipe.kfp.adapter import run_tracked
    from kdpipe.steps import soft_label_shards as step

    run_tracked("soft_labels", settings, lambda cfg, log: step.merge(
        [Path(s.path) for s in shards], Path(soft_labels.path), Path(prepared.path)),
        metrics, task="merge_soft_labels")


@component
def fractionate(settings: str, soft_labels: Input[Dataset], prepared: Input[Dataset],
                fractions: Output[Dataset], metrics: Output[Metrics]):
    """Select and weight the transfer set (uncertainty, class balance, schedule).

    Args:
        settings: The step's settings as JSON (seed, fractionate, tracking).
        soft_labels: The merged soft labels.
        prepared: The ingest step's output.
        fractions: Selected indices and weights per epoch, and a report.
        metrics: Rows kept per epoch.
    """
    from kdpipe.kfp.adapter import run_declared

    run_declared("fractionate", settings, {"soft_labels": soft_labels, "prepared": prepared},
                 fractions, metrics)


@component
def distill(settings: str, prepared: Input[Dataset], soft_labels: Input[Dataset],
            fractions: Input[Dataset], teacher: Input[Model], student: Output[Model],
            metrics: Output[Metrics], checkpoint_root: str = ""):
    """Train the student from the teacher's soft labels; resumes after its last epoch.

    Args:
        settings: The step's settings as JSON (seed, ingest.max_length,
            fractionate.include_augmented, student, distill, tracking).
        prepared: The ingest step's output.
        soft_labels: The merged soft labels.
        fractions: The fractionate step's output.
        teacher: The teacher (its embeddings initialise the student's).
        student: The best student (safetensors + config).
        metrics: Validation accuracy, epochs, seconds.
        checkpoint_root: A folder that outlives the pod (a mounted volume) for the state
            after each epoch; empty: a scratch folder, so a retried pod starts over.
    """
    from kdpipe.kfp.adapter import run_declared

    run_declared("distill", settings, {"prepared": prepared, "soft_labels": soft_labels,
                                       "fractions": fractions, "teacher": teacher},
                 student, metrics, checkpoint_root)


@component
def prune(settings: str, student: Input[Model], prepared: Input[Dataset],
          soft_labels: Input[Dataset], pruned: Output[Model], metrics: Output[Metrics]):
    """Shrink the student: vocabulary, channels/heads, magnitude; report what was removed.

    Args:
        settings: The step's settings as JSON (seed, ingest.max_length, prune, distill,
            tracking).
        student: The distill step's output.
        prepared: The ingest step's output.
        soft_labels: The soft labels (for the optional fine-tune).
        pruned: The pruned student.
        metrics: Parameters before and after, accuracy.
    """
    from kdpipe.kfp.adapter import run_declared

    run_declared("prune", settings, {"student": student, "prepared": prepared,
                                     "soft_labels": soft_labels}, pruned, metrics)


@component
def export(settings: str, pruned: Input[Model], prepared: Input[Dataset],
           exported: Output[Model], metrics: Output[Metrics]):
    """Export the pruned student to ONNX with its tokenizer; check parity (and build a
    TensorRT engine where TensorRT exists).

    Args:
        settings: The step's settings as JSON (ingest.max_length, export, tracking).
        pruned: The prune step's output.
        prepared: The ingest step's output (parity texts).
        exported: model.onnx, tokenizer, labels and the parity record.
        metrics: ONNX size, parity.
    """
    from kdpipe.kfp.adapter import run_declared

    run_declared("export", settings, {"pruned": pruned, "prepared": prepared}, exported,
                 metrics)


@component
def quantize(settings: str, exported: Input[Model], pruned: Input[Model],
             prepared: Input[Dataset], quantized: Output[Model], metrics: Output[Metrics]):
    """Quantize the student (ONNX Runtime int8 by default) behind an accuracy gate.

    Args:
        settings: The step's settings as JSON (quantize, tracking).
        exported: The export step's output.
        pruned: The pruned PyTorch student (read by torch_dynamic only).
        prepared: The ingest step's output (calibration and the accuracy check).
        quantized: The quantized model folder, ready to serve.
        metrics: Size and accuracy before and after.
    """
    from kdpipe.kfp.adapter import run_declared

    run_declared("quantize", settings, {"exported": exported, "pruned": pruned,
                                        "prepared": prepared}, quantized, metrics)


@component
def evaluate(settings: str, prepared: Input[Dataset], teacher: Input[Model],
             baseline: Input[Artifact], student: Input[Model], pruned: Input[Model],
             quantized: Input[Model], evaluation: Output[Artifact], metrics: Output[Metrics],
             confusion: Output[ClassificationMetrics], comparison: Output[Markdown]):
    """Compare every model side by side: accuracy, calibration, latency, size.

    Args:
        settings: The step's settings as JSON (ingest.max_length, evaluate, tracking).
        prepared: The ingest step's output.
        teacher: The teacher step's output.
        baseline: The baseline step's output.
        student: The distill step's output.
        pruned: The prune step's output.
        quantized: The quantize step's output.
        evaluation: metrics.json, comparison.md and plots.
        metrics: Each model's headline numbers.
        confusion: The last model's confusion matrix.
        comparison: The comparison table (Markdown).
    """
    from pathlib import Path

    from kdpipe.kfp.adapter import record_evaluation, run_declared

    run_declared("evaluate", settings, {
        "prepared": prepared, "teacher": teacher, "baseline": baseline, "student": student,
        "pruned": pruned, "quantized": quantized}, evaluation, metrics)
    record_evaluation(Path(evaluation.path), confusion, comparison)


@component
def gate(settings: str, evaluation: Input[Artifact], exported: Input[Model],
         quantized: Input[Model], prepared: Input[Dataset], checks: Output[Markdown]) -> bool:
    """Whether the candidate passes registry.gate's thresholds: register runs only then.

    Args:
        settings: The register step's settings as JSON.
        evaluation: The evaluate step's output.
        exported: The export step's output.
        quantized: The quantize step's output.
        prepared: The ingest step's output.
        checks: Each check, passed or not, and why (Markdown).

    Returns:
        True when every check passed.
    """
    # A plain bool (KFP names it "Output"): kfp.local resolves dsl.If only on such outputs.
    from pathlib import Path

    from kdpipe.errors import KdpipeError
    from kdpipe.kfp.adapter import check_gate, fail, load_settings
    from kdpipe.steps.register import candidate_folder

    try:
        cfg = load_settings(settings, "gate")
        return check_gate(cfg, Path(evaluation.path), candidate_folder(
            cfg, Path(exported.path), Path(quantized.path)), Path(prepared.path), checks)
    except KdpipeError as exc:
        fail("gate", exc)


@component
def register(settings: str, exported: Input[Model], quantized: Input[Model],
             evaluation: Input[Artifact], prepared: Input[Dataset],
             registration: Output[Artifact], metrics: Output[Metrics]):
    """Register the candidate in the MLflow model registry; promote it through the gate.

    Args:
        settings: The step's settings as JSON (every setting that shapes the model, which
            its params hash tags, and tracking).
        exported: The export step's output.
        quantized: The quantize step's output.
        evaluation: The evaluate step's output.
        prepared: The ingest step's output (the data card, the rows re-measured).
        registration: register.json: the version, aliases and the gate's decision.
        metrics: Version, promoted, gate passed, key metrics.
    """
    from kdpipe.kfp.adapter import run_declared

    run_declared("register", settings, {"exported": exported, "quantized": quantized,
                                        "evaluation": evaluation, "prepared": prepared},
                 registration, metrics)
