"""The kdpipe DAG for Kubeflow Pipelines: compile it, or run it here in subprocesses.

ingest -> teacher -> soft-label shards (dsl.ParallelFor) -> merge -> fractionate -> distill
-> prune -> export -> quantize -> evaluate -> gate -> register (under dsl.If on the gate);
baseline (the teacher scored and timed) runs beside the soft labels, after the teacher, and
feeds evaluate.

Pipeline parameters: ``settings_<step>`` (that step's own settings as JSON, what
``kdpipe.pipeline.STEPS`` declares it reads, plus ``tracking``; defaults to the params the
pipeline was compiled with), ``cpu_image`` and ``gpu_image`` (``kfp.*``). So a change to
``distill.*`` changes the inputs of distill and prune (which reads it) only, and KFP's cache
reuses ingest, teacher, baseline and the soft labels, as ``dvc repro`` does. The teacher, the
soft-label shards and export (TensorRT) ask for one NVIDIA GPU and run the GPU image; every
task requests CPU and memory. Caching follows ``kfp.enable_caching`` (on by default), except
for register, whose outcome depends on the registry's state. The compiled file carries the
cluster wiring of ``kfp.*`` (``kdpipe.kfp.cluster``); the local runners leave it out.

(No ``from __future__ import annotations``: KFP reads the pipeline function's annotations as
types.)
"""

import contextlib
import os
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdpipe.config import Config, load_config
from kdpipe.kfp.adapter import settings_text
from kdpipe.pipeline import STEPS

PIPELINE_NAME = "kdpipe"
DEFAULT_OUTPUT = Path("pipelines") / "kdpipe.yaml"
GPU = "nvidia.com/gpu"


@dataclass(frozen=True)
class Resources:
    """Requests for one task (Kubernetes quantities); ``cpu_limit`` pins CPU where timings
    must not depend on neighbours."""

    cpu: str
    memory: str
    gpu: bool = False
    cpu_limit: str | None = None


# Sized for the default MiniLM teacher and a BiLSTM or TextCNN student; raise them for bigger
# models.
RESOURCES: dict[str, Resources] = {
    "ingest": Resources("1", "2Gi"),
    "teacher": Resources("4", "16Gi", gpu=True),
    "baseline": Resources("4", "8Gi", cpu_limit="4"),  # timed: a limit keeps it honest
    "plan_shards": Resources("100m", "512Mi"),
    "soft_label_shard": Resources("2", "8Gi", gpu=True),
    "merge_soft_labels": Resources("1", "4Gi"),
    "fractionate": Resources("1", "4Gi"),
    "distill": Resources("4", "8Gi"),
    "prune": Resources("2", "4Gi"),
    "export": Resources("2", "8Gi", gpu=True),
    "quantize": Resources("2", "4Gi"),
    "evaluate": Resources("4", "8Gi", cpu_limit="4"),
    "gate": Resources("1", "2Gi"),
    "register": Resources("1", "2Gi"),
}

# The task that makes each step's output ("soft_labels" is made by merging its shards).
STEP_TASKS: dict[str, str] = {step.name: step.name for step in STEPS} | {
    "soft_labels": "merge_soft_labels"}
# Where run_local finds each step's outputs: (task's display name, output) -> Layout folder,
# and the task whose ``metrics`` output is the step's metrics/<step>.json. Derived from
# STEPS: each component names its output artifact after the step's Layout folder.
LAYOUT_OUTPUTS: dict[tuple[str, str], str] = {
    (STEP_TASKS[step.name].replace("_", "-"), step.output): step.output for step in STEPS}
STEP_COMPONENTS: dict[str, str] = {
    name: task.replace("_", "-") for name, task in STEP_TASKS.items()}
# Tasks whose pods may be lost mid-way through hours of work: retried, with backoff.
RETRIED = ("teacher", "soft_label_shard", "distill")


def pipeline_arguments(cfg: Config) -> dict[str, str]:
    """The DAG's parameters for ``cfg``: each step's own settings (``settings_<step>``, so a
    task's cache key moves only with them; a step's helper tasks share its parameter) and
    the two images."""
    return {**{f"settings_{step.name}": settings_text(cfg, step.name) for step in STEPS},
            "cpu_image": cfg.kfp.cpu_image, "gpu_image": cfg.kfp.gpu_image}


def build_pipeline(cfg: Config, cluster: bool = False) -> Any:
    """The DAG as a KFP pipeline whose parameters default to ``cfg``'s values; tasks are
    cached as ``kfp.enable_caching`` says (register never is).

    ``cluster``: add the Kubernetes wiring of ``cfg.kfp`` (Secrets as env vars, the
    checkpoint volume, /dev/shm, retries, node selectors, tolerations, pull secrets,
    timeouts) through kfp-kubernetes. Off for the local runners, which have no cluster."""
    from kfp import dsl

    from kdpipe.kfp import components as c
    from kdpipe.kfp.cluster import Wiring

    defaults = pipeline_arguments(cfg)

    @dsl.pipeline(name=PIPELINE_NAME, description="Distil a text classifier into a small, "
                  "fast one; evaluate, register and promote it (kdpipe).")
    def kdpipe(settings_ingest: str = defaults["settings_ingest"],
               settings_teacher: str = defaults["settings_teacher"],
               settings_baseline: str = defaults["settings_baseline"],
               settings_soft_labels: str = defaults["settings_soft_labels"],
               settings_fractionate: str = defaults["settings_fractionate"],
               settings_distill: str = defaults["settings_distill"],
               settings_prune: str = defaults["settings_prune"],
               settings_export: str = defaults["settings_export"],
               settings_quantize: str = defaults["settings_quantize"],
               settings_evaluate: str = defaults["settings_evaluate"],
               settings_register: str = defaults["settings_register"],
               cpu_image: str = cfg.kfp.cpu_image, gpu_image: str = cfg.kfp.gpu_image) -> None:
        wiring = Wiring(cfg.kfp) if cluster else None
        checkpoints = wiring.checkpoint_volume() if wiring else None

        def place(task: Any, name: str) -> Any:
            need = RESOURCES[name]
            task.set_container_image(gpu_image if need.gpu else cpu_image)
            task.set_cpu_request(need.cpu).set_memory_request(need.memory)
            if need.cpu_limit:
                task.set_cpu_limit(need.cpu_limit)
            if need.gpu:
                task.set_accelerator_type(GPU).set_accelerator_limit(1)
            # Set on every task: kfp.Client's per-run switch misses tasks in sub-DAGs.
            task.set_caching_options(cfg.kfp.enable_caching)
            if wiring:
                wiring.place(task, name, gpu=need.gpu, retried=name in RETRIED)
            return task.set_display_name(name.replace("_", "-"))

        def resumable(task: Any, name: str) -> Any:
            if wiring and checkpoints is not None:
                wiring.mount_checkpoints(task, checkpoints)
            return place(task, name)

        root = wiring.checkpoint_root() if wiring else ""
        prepared = place(c.ingest(settings=settings_ingest), "ingest").outputs["prepared"]
        teacher = resumable(c.teacher(settings=settings_teacher, prepared=prepared,
                                      checkpoint_root=root), "teacher")
        yardstick = place(c.baseline(settings=settings_baseline, prepared=prepared,
                                     teacher=teacher.outputs["teacher"]),
                          "baseline").outputs["baseline"]
        plan = place(c.plan_shards(settings=settings_soft_labels), "plan_shards")
        with dsl.ParallelFor(plan.output) as shard:
            labelled = place(c.soft_label_shard(
                settings=settings_soft_labels, shard=shard, teacher=teacher.outputs["teacher"],
                prepared=prepared), "soft_label_shard")
        soft = place(c.merge_soft_labels(
            settings=settings_soft_labels,
            shards=dsl.Collected(labelled.outputs["soft_labels_shard"]), prepared=prepared),
            "merge_soft_labels").outputs["soft_labels"]
        fractions = place(c.fractionate(settings=settings_fractionate, soft_labels=soft,
                                        prepared=prepared), "fractionate").outputs["fractions"]
        distilled = resumable(c.distill(settings=settings_distill, prepared=prepared,
                                        soft_labels=soft, fractions=fractions,
                                        teacher=teacher.outputs["teacher"],
                                        checkpoint_root=root), "distill")
        if wiring and checkpoints is not None:
            wiring.release_checkpoints(checkpoints, after=distilled)
        student = distilled.outputs["student"]
        pruned = place(c.prune(settings=settings_prune, student=student, prepared=prepared,
                               soft_labels=soft), "prune").outputs["pruned"]
        exported = place(c.export(settings=settings_export, pruned=pruned, prepared=prepared),
                         "export").outputs["exported"]
        quantized = place(c.quantize(settings=settings_quantize, exported=exported,
                                     pruned=pruned, prepared=prepared),
                          "quantize").outputs["quantized"]
        evaluation = place(c.evaluate(settings=settings_evaluate, prepared=prepared,
                                      teacher=teacher.outputs["teacher"],
                                      baseline=yardstick, student=student,
                                      pruned=pruned, quantized=quantized),
                           "evaluate").outputs["evaluation"]
        blessing = place(c.gate(settings=settings_register, evaluation=evaluation,
                                exported=exported, quantized=quantized, prepared=prepared),
                         "gate")
        with dsl.If(blessing.outputs["Output"] == True, "gate-passed"):  # noqa: E712
            registered = place(c.register(settings=settings_register, exported=exported,
                                          quantized=quantized, evaluation=evaluation,
                                          prepared=prepared), "register")
            # The registry's state (the champion) is an input no cache key sees.
            registered.set_caching_options(False)

    return kdpipe


def compile_pipeline(out: Path = DEFAULT_OUTPUT, cfg: Config | None = None) -> Path:
    """Write the DAG's IR YAML, with its cluster wiring, to ``out`` (parameters default to
    ``cfg``, else to ./params.yaml, else to the built-in defaults); returns ``out``."""
    from kfp import compiler

    cfg = cfg if cfg is not None else load_config()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", suffix=".yaml", dir=out.parent)
    os.close(fd)
    try:
        with quiet_kfp():
            compiler.Compiler().compile(build_pipeline(cfg, cluster=True), package_path=name)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(name, 0o666 & ~umask)  # mkstemp made it owner-only; the file is shared
        os.replace(name, out)
    finally:
        Path(name).unlink(missing_ok=True)
    return out


@contextlib.contextmanager
def quiet_kfp() -> Iterator[None]:
    """Hide kfp's warnings that do not apply to kdpipe: the v2-backend notice of its client,
    and, locally, that images and GPU requests are ignored."""
    import logging

    # kfp.local logs with the root logger's functions (logging.info), which install a
    # handler on the root logger bound to the stream of the moment: kept, it writes to a
    # closed stream later in the same process. The root logger is restored afterwards.
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    with contextlib.ExitStack() as restore, warnings.catch_warnings():
        restore.callback(lambda: (root.handlers.__setitem__(slice(None), handlers),
                                  root.setLevel(level)))
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"kfp(\.|$)")
        warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"kfp\.local")
        warnings.filterwarnings("ignore", message=r".*(no effect in the current local runner"
                                r"|non-Python base image).*")
        yield
