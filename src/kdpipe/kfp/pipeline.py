"""The kdpipe DAG for Kubeflow Pipelines: compile it, or run it here in subprocesses.

ingest -> teacher -> soft-label shards (dsl.ParallelFor) -> merge -> fractionate -> distill
-> prune -> export -> quantize -> evaluate -> gate -> register (under dsl.If on the gate);
baseline (the teacher scored and timed) runs beside the soft labels, after the teacher, and
feeds evaluate.

Pipeline parameters: ``params`` (every setting of params.yaml, as JSON; defaults to the
params the pipeline was compiled with), ``cpu_image`` and ``gpu_image`` (``kfp.*``). The
teacher, the soft-label shards and export (TensorRT) ask for one NVIDIA GPU and run the GPU
image; every task requests CPU and memory. Caching follows ``kfp.enable_caching`` (on by
default), except for register, whose outcome depends on the registry's state.

(No ``from __future__ import annotations``: KFP reads the pipeline function's annotations as
types.)
"""

import contextlib
import json
import os
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdpipe.config import Config, load_config

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

# Where run_local finds each step's outputs: (component, output) -> Layout attribute, and
# the component whose ``metrics`` output is the step's metrics/<step>.json.
LAYOUT_OUTPUTS: dict[tuple[str, str], str] = {
    ("ingest", "prepared"): "prepared",
    ("teacher", "teacher"): "teacher",
    ("baseline", "baseline"): "baseline",
    ("merge-soft-labels", "soft_labels"): "soft_labels",
    ("fractionate", "fractions"): "fractions",
    ("distill", "student"): "student",
    ("prune", "pruned"): "pruned",
    ("export", "exported"): "exported",
    ("quantize", "quantized"): "quantized",
    ("evaluate", "evaluation"): "evaluation",
    ("register", "registration"): "registration",
}
STEP_COMPONENTS: dict[str, str] = {
    "ingest": "ingest", "teacher": "teacher", "baseline": "baseline",
    "soft_labels": "merge-soft-labels", "fractionate": "fractionate", "distill": "distill", "prune": "prune", "export": "export",
    "quantize": "quantize", "evaluate": "evaluate", "register": "register",
}


def build_pipeline(cfg: Config) -> Any:
    """The DAG as a KFP pipeline whose parameters default to ``cfg``'s values; tasks are
    cached as ``kfp.enable_caching`` says (register never is)."""
    from kfp import dsl

    from kdpipe.kfp import components as c

    default_params = params_text(cfg)

    @dsl.pipeline(name=PIPELINE_NAME, description="Distil a text classifier into a small, "
                  "fast one; evaluate, register and promote it (kdpipe).")
    def kdpipe(params: str = default_params, cpu_image: str = cfg.kfp.cpu_image,
               gpu_image: str = cfg.kfp.gpu_image) -> None:
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
            return task.set_display_name(name.replace("_", "-"))

        prepared = place(c.ingest(params=params), "ingest").outputs["prepared"]
        teacher = place(c.teacher(params=params, prepared=prepared), "teacher")
        yardstick = place(c.baseline(params=params, prepared=prepared,
                                     teacher=teacher.outputs["teacher"]),
                          "baseline").outputs["baseline"]
        plan = place(c.plan_shards(params=params), "plan_shards")
        with dsl.ParallelFor(plan.output) as shard:
            labelled = place(c.soft_label_shard(
                params=params, shard=shard, teacher=teacher.outputs["teacher"],
                prepared=prepared), "soft_label_shard")
        soft = place(c.merge_soft_labels(
            params=params, shards=dsl.Collected(labelled.outputs["soft_labels_shard"]),
            prepared=prepared), "merge_soft_labels").outputs["soft_labels"]
        fractions = place(c.fractionate(params=params, soft_labels=soft, prepared=prepared),
                          "fractionate").outputs["fractions"]
        student = place(c.distill(params=params, prepared=prepared, soft_labels=soft,
                                  fractions=fractions, teacher=teacher.outputs["teacher"]),
                        "distill").outputs["student"]
        pruned = place(c.prune(params=params, student=student, prepared=prepared,
                               soft_labels=soft), "prune").outputs["pruned"]
        exported = place(c.export(params=params, pruned=pruned, prepared=prepared),
                         "export").outputs["exported"]
        quantized = place(c.quantize(params=params, exported=exported, pruned=pruned,
                                     prepared=prepared), "quantize").outputs["quantized"]
        evaluation = place(c.evaluate(params=params, prepared=prepared,
                                      teacher=teacher.outputs["teacher"],
                                      baseline=yardstick, student=student,
                                      pruned=pruned, quantized=quantized),
                           "evaluate").outputs["evaluation"]
        blessing = place(c.gate(params=params, evaluation=evaluation, exported=exported,
                                quantized=quantized, prepared=prepared), "gate")
        with dsl.If(blessing.outputs["Output"] == True, "gate-passed"):  # noqa: E712
            registered = place(c.register(params=params, exported=exported,
                                          quantized=quantized, evaluation=evaluation,
                                          prepared=prepared), "register")
            # The registry's state (the champion) is an input no cache key sees.
            registered.set_caching_options(False)

    return kdpipe


def params_text(cfg: Config) -> str:
    """``cfg`` as the ``params`` pipeline parameter: JSON on one line, keys in params.yaml's
    order. (Multi-line text would break the compiled file: kfp copies each parameter's
    default into a one-line comment at its top.)"""
    return json.dumps(cfg.model_dump(mode="json"), ensure_ascii=False)


def compile_pipeline(out: Path = DEFAULT_OUTPUT, cfg: Config | None = None) -> Path:
    """Write the DAG's IR YAML to ``out`` (parameters default to ``cfg``, else to
    ./params.yaml, else to the built-in defaults); returns ``out``."""
    from kfp import compiler

    cfg = cfg if cfg is not None else load_config()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", suffix=".yaml", dir=out.parent)
    os.close(fd)
    try:
        with quiet_kfp():
            compiler.Compiler().compile(build_pipeline(cfg), package_path=name)
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
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"kfp(\.|$)")
        warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"kfp\.local")
        warnings.filterwarnings("ignore", message=r".*(no effect in the current local runner"
                                r"|non-Python base image).*")
        yield
