"""The one declaration per step (kdpipe.pipeline.STEPS) against its adapters: dvc.yaml's
stages, the KFP components, and the code and settings each step really uses."""

import inspect
from pathlib import Path

import pytest
import yaml
from import_graph import closure, docstring_only

from kdpipe.config import Config, load_config, validate
from kdpipe.pipeline import STEPS, step_named
from kdpipe.step_settings import UndeclaredSetting, check_keys, subset, view

REPO = Path(__file__).resolve().parents[2]
# Modules every step imports whose changes do not change what a step computes, so a change
# to them need not re-run the pipeline: the settings schema (the values are in params.yaml,
# which DVC tracks as params), errors' wording, how files are written, telemetry switches,
# progress bars, thread counts, StepResult (package __init__ files holding only a docstring
# are left out as well).
FOUNDATION = {"__init__.py", "config.py", "errors.py", "atomic.py", "telemetry.py",
              "progress.py", "threads.py", "step_result.py", "step_settings.py",
              "interrupts.py", "owner.py"}


def stages() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def code_deps(stage: dict) -> set[str]:
    return {d.removeprefix("src/kdpipe/") for d in stage["deps"] if d.startswith("src/kdpipe/")}


def covered(file: str, deps: set[str]) -> bool:
    return any(file == dep or file.startswith(dep.rstrip("/") + "/") for dep in deps)


def test_dvc_stages_are_the_declared_steps_in_order():
    assert list(stages()) == [step.name for step in STEPS]
    for step in STEPS:
        assert stages()[step.name]["cmd"] == f"kdpipe {step.command}"


@pytest.mark.parametrize("step", STEPS, ids=lambda s: s.name)
def test_a_stage_depends_on_every_module_its_step_imports_and_no_other(step):
    needed = {f for f in closure(f"kdpipe.steps.{step.name}") - FOUNDATION
              if not docstring_only(f)}
    deps = code_deps(stages()[step.name])
    missing = sorted(f for f in needed if not covered(f, deps))
    assert not missing, f"dvc.yaml stage {step.name}: deps lack src/kdpipe/{missing}"
    stale = sorted(d for d in deps if not any(covered(f, {d}) for f in needed))
    assert not stale, f"dvc.yaml stage {step.name}: deps on code it does not import: {stale}"


@pytest.mark.parametrize("step", STEPS, ids=lambda s: s.name)
def test_a_stage_reads_the_declared_folders_writes_the_output_and_lists_the_settings(step):
    stage, layout = stages()[step.name], load_config(REPO / "params.yaml").paths
    work = str(layout.root)
    folder = {name: getattr(layout, name).relative_to(layout.root).as_posix()
              for name in (*step.folders, step.output)}
    data = [d.replace("${work_dir}", work) for d in stage["deps"] if "${work_dir}" in d]
    # Of a folder it reads in part, DVC lists exactly the files the step declares it reads.
    for name, files in step.reads.items():
        listed = sorted(Path(d).name for d in data if Path(d).parent == layout.root /
                        folder[name])
        assert listed == sorted(files), (step.name, name, listed)
    assert not [d for d in data if Path(d).parent == layout.root / folder.get(
        "prepared", "-")] or "prepared" in step.reads, step.name
    for name in step.folders:
        assert any(Path(d) == layout.root / folder[name] or
                   Path(d).parent == layout.root / folder[name] for d in data), (step.name, name)
    assert all(any(Path(d) == layout.root / folder[n] or Path(d).parent == layout.root / folder[n]
                   for n in step.folders) for d in data), (step.name, data)
    outs = [Path(o.replace("${work_dir}", work)) for o in stage["outs"]]
    assert all(o == layout.root / folder[step.output] or
               o.parent == layout.root / folder[step.output] for o in outs)
    assert sorted(stage["params"]) == sorted(step.settings), step.name
    metrics = [next(iter(m)) if isinstance(m, dict) else m for m in stage["metrics"]]
    assert f"${{work_dir}}/metrics/{step.name}.json" in metrics


def test_declared_settings_are_settings():
    for step in STEPS:
        check_keys(step.settings)
    with pytest.raises(ValueError, match="distill.temprature: not a setting"):
        check_keys(["distill.temprature"])


def test_each_component_takes_the_declared_folders_and_writes_the_output():
    from kdpipe.kfp import components

    for step in STEPS:
        name = "merge_soft_labels" if step.name == "soft_labels" else step.name
        signature = inspect.signature(getattr(components, name).python_func)
        kinds = {p: str(v.annotation) for p, v in signature.parameters.items()}
        artifacts = {p for p, kind in kinds.items() if "Annotation" in kind}
        inputs = {p for p in artifacts if "InputAnnotation" in kinds[p]}
        if step.name == "soft_labels":
            inputs = (inputs - {"shards"}) | {"teacher"}  # the shards are the teacher's labels
        assert inputs == set(step.folders), step.name
        assert step.output in artifacts - inputs, step.name
        resumable = "checkpoint_root" in signature.parameters
        assert resumable == step.resumable, step.name


def test_each_step_function_takes_the_declared_keywords():
    for step in STEPS:
        parameters = inspect.signature(step.function()).parameters
        assert set(step.inputs) | {"out_dir"} <= set(parameters), step.name
        assert ("checkpoint_dir" in parameters) == step.resumable, step.name


def test_a_step_reading_an_undeclared_setting_fails_at_once():
    cfg = validate({"seed": 3, "distill": {"lr": 0.01}})
    seen = view(cfg, step_named("distill").settings, "distill")
    assert seen.distill.lr == 0.01 and seen.seed == 3
    assert seen.ingest.max_length == cfg.ingest.max_length  # declared: one key of ingest
    with pytest.raises(UndeclaredSetting, match="'distill' read teacher, which its decl"):
        seen.teacher
    with pytest.raises(UndeclaredSetting, match="read ingest.normalize"):
        seen.ingest.normalize
    with pytest.raises(UndeclaredSetting, match="read work_dir"):
        seen.paths  # a property reads through the view
    with pytest.raises(AttributeError):
        seen.seed = 4


def test_a_task_gets_its_declared_settings_only():
    cfg = load_config(None, ["distill.lr=0.01", "teacher.lr=0.5"])
    picked = subset(cfg, step_named("distill").settings)
    assert list(picked) == ["seed", "ingest", "fractionate", "student", "distill"]
    assert picked["ingest"] == {"max_length": cfg.ingest.max_length}
    assert picked["fractionate"] == {"include_augmented": True, "include_unlabeled": True}
    assert "teacher" not in picked and picked["distill"]["lr"] == 0.01


def test_the_model_hash_ignores_where_a_run_happens():
    base = Config().params_hash()
    assert load_config(None, ["work_dir=/x", "kfp.cpu_image=a@sha256:b",
                              "tracking.experiment=e"]).params_hash() == base
    assert load_config(None, ["distill.lr=0.5"]).params_hash() != base
