"""The package reads as layers (docs/architecture.md): each part imports only the parts
below it, the steps reach MLflow, KFP and DVC only through their adapters, and what a
registered model ships (kdpipe.serving) imports neither PyTorch nor training code."""

import os
import subprocess
import sys
from collections import defaultdict

import pytest
from import_graph import PACKAGE, imported, modules, third_party

# Modules every part may import: they import nothing of kdpipe but each other.
FOUNDATION = {"kdpipe", "errors", "telemetry", "atomic", "progress", "threads", "config",
              "env_vars", "owner", "interrupts", "work_lock",
              "step_result", "step_settings"}
# What each part may import besides the foundation. Read from the bottom up: serving and
# data need nothing else; models pad with serving; compression shrinks models; training
# trains them; evaluation scores every kind; tracking and registry talk to MLflow; the steps
# compose all of these; pipeline declares the steps; tuning re-runs some of them in trials;
# kfp and the CLI run them.
ALLOWED = {
    "serving": set(),
    "data": set(),
    "models": {"serving"},
    "compression": {"models", "serving", "data"},
    "training": {"models", "compression", "serving"},
    "evaluation": {"models", "compression", "serving", "data"},
    "tracking": set(),
    "registry": {"serving", "tracking", "evaluation"},
    "steps": {"serving", "data", "models", "compression", "training", "evaluation",
              "tracking", "registry"},
    "pipeline": {"steps"},
    "provenance": {"pipeline"},
    "kfp": {"pipeline", "steps", "tracking", "registry", "data"},
    "tuning": {"pipeline", "provenance", "tracking"},
    "cli": {"pipeline", "provenance", "steps", "tracking", "registry", "kfp", "serving",
            "data", "tuning"},
    "__main__": {"cli"},
}
# The one import against the layers, on demand: a model folder holding a PyTorch int8
# student (quantize.method torch_dynamic) is run by kdpipe.compression.torch_int8, which
# needs the student's architecture; ONNX folders never reach it.
ON_DEMAND = {("kdpipe.serving.predictor", "kdpipe.compression.torch_int8")}
# Third-party packages a part must not import itself.
FORBIDDEN = {
    "steps": {"kfp", "mlflow", "dvc"},
    # safetensors is allowed: bag_numpy reads the fast student's tables with its numpy API
    # (never safetensors.torch), lazily, when a folder has them; it arrives with
    # transformers, a serving requirement. Importing serving still loads none of it (below).
    "serving": {"torch", "kfp", "dvc"},
    "training": {"kfp", "mlflow", "dvc"},
    "compression": {"kfp", "mlflow", "dvc"},
    "models": {"kfp", "mlflow", "dvc"},
    "evaluation": {"kfp", "mlflow", "dvc"},
    "data": {"kfp", "mlflow"},
    "tuning": {"kfp", "mlflow", "dvc"},  # MLflow through kdpipe.tracking
}


def part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "kdpipe"


def test_every_part_of_the_package_is_placed_in_a_layer():
    unplaced = {part(m) for m in modules()} - FOUNDATION - set(ALLOWED)
    assert not unplaced, f"place {sorted(unplaced)} in tests/unit/test_layers.py and the docs"


@pytest.mark.parametrize("module", modules())
def test_a_module_imports_only_its_own_part_the_foundation_and_the_parts_below(module):
    mine = part(module)
    allowed = FOUNDATION | {mine} | ALLOWED.get(mine, set())
    if mine in FOUNDATION:
        allowed = FOUNDATION
    wrong = sorted(m for m in imported(module)
                   if part(m) not in allowed and (module, m) not in ON_DEMAND)
    assert not wrong, f"{module} imports {wrong}, above its layer"
    banned = sorted(third_party(module) & FORBIDDEN.get(mine, set()))
    assert not banned, f"{module} imports {banned} (its part {mine!r} must not)"


def test_the_import_graph_has_no_cycles():
    graph = defaultdict(set)
    for module in modules():
        graph[module] = {m for m in imported(module) if (module, m) not in ON_DEMAND}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in modules():
        if module not in state:
            visit(module, [module])


def test_serving_loads_without_pytorch_or_training_code():
    serving = [m for m in modules() if part(m) == "serving" and not m.endswith("model_code")]
    code = ("import sys; sys.modules['torch'] = None\n"  # any import of torch now fails
            f"import {', '.join(serving)}\n"
            "bad = sorted(m for m in sys.modules if m.startswith(('kdpipe.training', "
            "'kdpipe.steps', 'kdpipe.compression', 'kdpipe.models', 'safetensors')))\n"
            "print(bad)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(PACKAGE.parent)}, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
