"""MLflow tracking: one parent run per ``kdpipe run``, a nested child run per step.

A step run on its own (``kdpipe ingest``, a DVC stage) gets a run of its own, nested under
the run named by ``KDPIPE_PARENT_RUN_ID`` when that is set. Steps never import this module;
the adapters wrap each step call with ``step_run`` and log the ``StepResult`` it returns.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from kdpipe.config import Config
from kdpipe.errors import KdpipeError
from kdpipe.step_result import StepResult

PARENT_ENV = "KDPIPE_PARENT_RUN_ID"
LogMetric = Callable[[str, float, int], None]


# mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI (for its subprocesses); a value
# that kdpipe set itself is not the user's choice and must not outrank the next config.
_set_by_us: str | None = None


def tracking_uri(cfg: Config) -> str:
    """MLFLOW_TRACKING_URI if set, else params' tracking.uri, else SQLite in work_dir."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env and env != _set_by_us:
        return env
    if cfg.tracking.uri:
        return cfg.tracking.uri
    return "sqlite:///" + str(cfg.paths.mlflow_db.resolve())


# A remote store is probed before any work starts: MLflow's own client retries for minutes
# (MLFLOW_HTTP_REQUEST_MAX_RETRIES with exponential backoff) before it reports a dead server.
PROBE_TRIES = 3
PROBE_TIMEOUT_S = 3.0
_reachable: set[str] = set()


def check_reachable(uri: str, tries: int = PROBE_TRIES, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Raise ``KdpipeError`` (one line) when an http(s) tracking server does not answer its
    ``/health`` endpoint after ``tries`` attempts; other stores (SQLite, files) pass."""
    if not uri.startswith(("http://", "https://")) or uri in _reachable:
        return
    import requests

    url = uri.rstrip("/") + "/health"
    problem = ""
    for attempt in range(tries):
        if attempt:
            time.sleep(0.5 * 2 ** (attempt - 1))
        try:
            response = requests.get(url, timeout=timeout)
        except requests.RequestException as exc:
            problem = type(exc).__name__
            continue
        if response.status_code < 500:
            _reachable.add(uri)
            return
        problem = f"HTTP {response.status_code}"
    raise KdpipeError(f"MLflow tracking server {redact(uri)} is unreachable ({problem} after "
                      f"{tries} tries); start it, fix MLFLOW_TRACKING_URI / tracking.uri, or "
                      "run with -S tracking.enabled=false")


_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")


def redact(value: str) -> str:
    """``value`` with any URL credentials (``scheme://user:token@host``) replaced by ``***``,
    so a data source or store URI never carries a secret into params, tags or logs."""
    return _USERINFO.sub(r"\g<scheme>***@", value)


def configure(cfg: Config) -> str:
    """Point MLflow at the store and experiment of ``cfg``; returns the experiment id."""
    import logging

    import mlflow

    # MLflow and alembic announce schema creation at INFO on every new store; not news.
    for name in ("mlflow.store.db.utils", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    uri = tracking_uri(cfg)
    check_reachable(uri)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    global _set_by_us
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if before != uri and os.environ.get("MLFLOW_TRACKING_URI") == uri:
        _set_by_us = uri
    experiment = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if uri.startswith("sqlite:"):
        # A SQLite store has no artifact root of its own; keep artifacts beside the DB
        # instead of in ./mlruns of whatever folder the command ran from.
        location = cfg.paths.mlflow_artifacts.resolve().as_uri()
    return mlflow.create_experiment(cfg.tracking.experiment, artifact_location=location)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = redact(str(value))
    return out


def git_commit() -> str | None:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def _run_tags(cfg: Config) -> dict[str, str]:
    tags = {"kdpipe.params_hash": cfg.params_hash()}
    commit = git_commit()
    if commit:
        tags["kdpipe.git_commit"] = commit
    return tags


@contextlib.contextmanager
def pipeline_run(cfg: Config, name: str = "pipeline") -> Iterator[str | None]:
    """A parent run for a whole pipeline; yields its run id (None when tracking is off)."""
    if not cfg.tracking.enabled:
        yield None
        return
    import mlflow

    experiment_id = configure(cfg)
    with mlflow.start_run(experiment_id=experiment_id, run_name=name,
                          tags=_run_tags(cfg)) as run:
        mlflow.log_params(flatten(cfg.model_dump(mode="json")))
        yield run.info.run_id


def step_run(cfg: Config, step: str, fn: Callable[[LogMetric | None], StepResult],
             settings: dict[str, Any] | None = None) -> StepResult:
    """Call ``fn(log_metric)`` inside a run for ``step``; log its metrics, artifacts and
    duration. ``log_metric(name, value, step)`` logs curves into that run.

    ``settings``: the only settings this process has (a Kubeflow task's own), logged as the
    run's params instead of every setting of ``cfg``, most of which would be defaults."""
    if not cfg.tracking.enabled:
        return _timed(lambda: fn(None))
    import mlflow

    active = mlflow.active_run()
    experiment_id = configure(cfg)
    parent = active.info.run_id if active else os.environ.get(PARENT_ENV)
    # A task's partial settings would hash to a value no whole run has: tag only the whole.
    tags = {"kdpipe.step": step, **(_run_tags(cfg) if settings is None else {})}
    with mlflow.start_run(experiment_id=experiment_id, run_name=step,
                          parent_run_id=parent, nested=active is not None, tags=tags):
        if active is None:
            mlflow.log_params(flatten(cfg.model_dump(mode="json") if settings is None
                                      else settings))
        result = _timed(lambda: fn(_log_metric))
        mlflow.log_metrics(result.metrics)
        for path in result.artifacts:
            mlflow.log_artifact(str(path))
    return result


def _log_metric(name: str, value: float, step: int) -> None:
    import mlflow

    mlflow.log_metric(name, value, step=step)


def _timed(fn: Callable[[], StepResult]) -> StepResult:
    start = time.perf_counter()
    result = fn()
    result.metrics.setdefault("seconds", round(time.perf_counter() - start, 3))
    return result


@contextlib.contextmanager
def active_or_own_run(cfg: Config, step: str) -> Iterator[str]:
    """The active run's id (the CLI's step run), else that of a run of ``step``'s own."""
    import mlflow

    active = mlflow.active_run()
    if active is not None:
        yield active.info.run_id
        return
    experiment_id = configure(cfg)
    with mlflow.start_run(experiment_id=experiment_id, run_name=step,
                          tags={"kdpipe.step": step,
                                "kdpipe.params_hash": cfg.params_hash()}) as run:
        yield run.info.run_id


def log_text(text: str, name: str) -> None:
    """``text`` as the artifact ``name`` of the active run."""
    import mlflow

    mlflow.log_text(text, name)
