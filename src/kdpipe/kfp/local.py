"""``run_local``: the Kubeflow DAG on this machine, one subprocess per task, offline.

kfp's ``SubprocessRunner`` runs every task with this Python (``use_venv=False``: nothing is
installed, nothing downloaded). Task outputs land in a scratch folder inside ``work_dir``;
afterwards each step's output folder is moved to where ``kdpipe run`` writes it
(``cfg.paths``) and its metrics to ``metrics/<step>.json``, so DVC, ``kdpipe predict`` and
the rest find the same files either way. Tracking matches ``kdpipe run``: one MLflow parent
run, each step's run nested under it. ``run_dag`` and the helpers beside it are shared with
``kdpipe.kfp.docker`` (the same DAG, each task in a container).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from kdpipe.config import Config
from kdpipe.env_vars import environ
from kdpipe.errors import KdpipeError
from kdpipe.kfp.adapter import ERRORS_ENV
from kdpipe.kfp.pipeline import LAYOUT_OUTPUTS, STEP_COMPONENTS, build_pipeline, quiet_kfp


@dataclass
class LocalRun:
    """What a local run produced: each step's folder in work_dir, and the MLflow run."""

    outputs: dict[str, Path] = field(default_factory=dict)
    registered: bool = False
    mlflow_run_id: str | None = None


def run_local(cfg: Config, log: TextIO | None = None) -> LocalRun:
    """Run the whole DAG with ``kfp.local`` and put its outputs where ``kdpipe run`` does.

    ``log`` receives kfp's account of the run and every task's output (long: each task
    prints its inputs); None leaves it on stdout, as kfp prints it. A step that fails ends
    the run with a ``KdpipeError`` naming the step (its own one-line message when it raised
    one; the log has the rest). Register runs only when the gate passes; otherwise a stale
    ``register`` folder (and its metrics) from an earlier run is removed.
    """
    from kfp import local

    with scratch_folder(cfg, "kfp-local") as scratch, \
            parent_run(cfg, "kfp-local") as (run_id, tracking_env), environ({
                # Each task's `mktemp -d` (and tempfile) goes here, not to /tmp, and goes
                # with it.
                "TMPDIR": str(scratch / "tmp"), ERRORS_ENV: str(errors_file(scratch)),
                **tracking_env}), quiet_kfp(), redirected(log):
        outputs = run_dag(cfg, local.SubprocessRunner(use_venv=False), scratch, "kfp-local")
    return LocalRun(outputs, "registration" in outputs, run_id)


@contextlib.contextmanager
def scratch_folder(cfg: Config, label: str) -> Iterator[Path]:
    """A scratch folder for one run inside ``work_dir`` (outputs are then moved into place
    by rename, never copied), with ``tmp/`` for the tasks; removed afterwards."""
    work = Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{label}-", dir=work)).resolve()
    (scratch / "tmp").mkdir()
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def errors_file(scratch: Path) -> Path:
    """Where failing tasks append their one line (``ERRORS_ENV``)."""
    return scratch / "errors.txt"


def run_dag(cfg: Config, runner: Any, scratch: Path, label: str) -> dict[str, Path]:
    """Run the DAG with the ``kfp.local`` runner ``runner``, its outputs under ``scratch``,
    then move them to ``cfg.paths`` (``_collect``). A failed task ends the run with its one
    line from ``errors_file(scratch)``, prefixed by ``label``; so does a task that recorded
    an error while kfp still counted it a success."""
    from kfp import local

    local.init(runner=runner, pipeline_root=str(scratch / "outputs"),
               workspace_root=str(scratch / "workspace"), raise_on_error=True)
    errors = errors_file(scratch)
    try:
        build_pipeline(cfg)()
    except RuntimeError as exc:
        line = _first_error(errors) or f"{_first_line(exc)} (the log has why)"
        raise KdpipeError(f"{label}: {line}") from None
    recorded = _first_error(errors)
    if recorded:
        raise KdpipeError(f"{label}: {recorded}")
    return _collect(cfg, _run_folder(scratch / "outputs"))


def _first_error(errors: Path) -> str | None:
    lines = errors.read_text(encoding="utf-8").splitlines() if errors.is_file() else []
    return lines[0] if lines else None


def _run_folder(root: Path) -> Path:
    runs = [path for path in root.iterdir() if path.is_dir()] if root.is_dir() else []
    if len(runs) != 1:
        raise KdpipeError(f"{root}: expected the outputs of one kfp.local run, found {len(runs)}")
    return runs[0]


def _collect(cfg: Config, run: Path) -> dict[str, Path]:
    """Move each step's output folder and metrics file from the run folder to ``cfg.paths``."""
    found = {(path.parent.name, path.name): path for path in run.rglob("*")
             if (path.parent.name, path.name) in LAYOUT_OUTPUTS
             or (path.name == "metrics" and path.is_file())}
    outputs: dict[str, Path] = {}
    for key, attribute in LAYOUT_OUTPUTS.items():
        target = getattr(cfg.paths, attribute)
        if key in found:
            _replace(found[key], target)
            outputs[attribute] = target
        elif target.exists():
            shutil.rmtree(target)  # a step this run skipped: its old output is not this run's
    for step, component in STEP_COMPONENTS.items():
        metrics, target = found.get((component, "metrics")), cfg.paths.metrics / f"{step}.json"
        if metrics is not None:
            _replace(metrics, target)
        else:
            target.unlink(missing_ok=True)
    return outputs


def _replace(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    aside = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        os.replace(target, aside)
    os.replace(source, target)
    if aside.is_dir():
        shutil.rmtree(aside, ignore_errors=True)
    else:
        aside.unlink(missing_ok=True)


@contextlib.contextmanager
def parent_run(cfg: Config, name: str) -> Iterator[tuple[str | None, dict[str, str]]]:
    """A parent MLflow run (as ``kdpipe run`` opens) and the environment that nests each
    task's step run under it in the same store."""
    from kdpipe import tracking

    with tracking.pipeline_run(cfg, name=name) as run_id:
        if run_id is None:
            yield None, {}
            return
        yield run_id, {tracking.PARENT_ENV: run_id,
                       "MLFLOW_TRACKING_URI": tracking.tracking_uri(cfg)}


@contextlib.contextmanager
def redirected(log: TextIO | None) -> Iterator[None]:
    """kfp prints task output, and logs its progress, to the sys.stdout of the moment."""
    if log is None:
        yield
        return
    with contextlib.redirect_stdout(log):
        yield


def _first_line(exc: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()  # kfp colours its messages
    return text.splitlines()[0] if text else type(exc).__name__
