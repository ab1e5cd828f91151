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
from kdpipe.env_vars import environ, restore
from kdpipe.errors import KdpipeError
from kdpipe.step_result import StepResult

PARENT_ENV = "KDPIPE_PARENT_RUN_ID"
NOTE_TAG = "mlflow.note.content"  # a run's description in the MLflow UI
# MLflow's UI opens an experiment of this kind on its runs and model-training views, not on
# the GenAI overview (empty trace charts) it shows for an experiment of unknown kind.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
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
# Past the probe, MLflow's client retries a failed request 7 times with backoff factor 2
# (about 4 minutes, each try waiting up to 120 s). kdpipe bounds that, unless the user set
# these: 6 retries 2, 4, 8, 16 and 32 s apart ride out a server restart (one on PostgreSQL
# took 19-22 s on a 2-core machine), a minute in all; then the run stops with one line.
RETRY_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "6",
                  "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
# Once the store has failed past those retries, ending the runs (marking them FAILED) gets
# one quick try each: the error is already known, and the user waits for nothing more.
FAIL_FAST = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}


class TrackingError(KdpipeError):
    """The tracking store failed (after MLflow's bounded retries)."""


def check_reachable(uri: str, tries: int = PROBE_TRIES, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Raise ``KdpipeError`` (one line) when an http(s) tracking server does not answer its
    ``/health`` endpoint after ``tries`` attempts, or answers it but cannot read its backend
    store (its database down: ``/health`` does not touch it); other stores pass."""
    if uri in _reachable:
        return
    if uri.startswith(DATABASE_SCHEMES):
        _check_database(uri, timeout)
        _reachable.add(uri)
        return
    if not uri.startswith(("http://", "https://")):
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
            _check_backend(uri, timeout)
            _reachable.add(uri)
            return
        problem = f"HTTP {response.status_code}"
    raise KdpipeError(f"MLflow tracking server {redact(uri)} is unreachable ({problem} after "
                      f"{tries} tries); start it, fix MLFLOW_TRACKING_URI / tracking.uri, or "
                      "run with -S tracking.enabled=false")


# A database as the tracking URI: MLflow retries creating its engine for about 100 s (a
# wrong password included) before it reports anything; one connection says it at once.
DATABASE_SCHEMES = ("postgresql", "mysql")


def _check_database(uri: str, timeout: float) -> None:
    import sqlalchemy

    try:
        engine = sqlalchemy.create_engine(
            uri, connect_args={"connect_timeout": max(1, round(timeout))})
        with engine.connect():
            pass
        engine.dispose()
    except Exception as exc:  # the driver's errors (psycopg, pymysql) or a missing driver
        cause = getattr(exc, "orig", None) or exc
        raise KdpipeError(f"MLflow database {redact(uri)} cannot be reached: "
                          f"{redact(_first_line(str(cause)))}") from None


def _check_backend(uri: str, timeout: float) -> None:
    """One cheap read of the server's backend store, without MLflow's retries."""
    import requests

    url = uri.rstrip("/") + "/api/2.0/mlflow/experiments/search"
    try:
        response = requests.get(url, params={"max_results": 1}, timeout=timeout * 3)
    except requests.RequestException as exc:
        problem = type(exc).__name__
    else:
        if response.status_code < 500:
            return
        problem = f"HTTP {response.status_code}: {_server_message(response)}"
    raise KdpipeError(f"MLflow tracking server {redact(uri)} answers, but a query of its "
                      f"backend store failed within {timeout * 3:.0f} s ({problem}); check the "
                      "server's database")


def _server_message(response: Any) -> str:
    """The first line of an MLflow server's error answer (its JSON ``message``)."""
    try:
        text = str(response.json().get("message") or response.text)
    except ValueError:  # an HTML error page: the cause is only in the server's log
        return f"{response.reason or 'error'} (the server's log says why)"
    return redact(_first_line(text, 300)) or response.reason


def _first_line(text: str, limit: int = 400) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def check_artifacts(uri: str, location: str | None) -> None:
    """One listing of the experiment's artifact root (S3 behind the server, or the client's
    own bucket), quickly: a store that cannot be written is found before any step runs,
    not at the first upload an hour in. Local folders are not probed."""
    key = f"{uri} {location}"
    if not location or location.startswith(("file:", "/")) or key in _reachable:
        return
    try:
        if location.startswith("mlflow-artifacts:") and uri.startswith(("http://", "https://")):
            problem = _list_through_server(uri, location)
        else:
            import mlflow

            with environ(FAIL_FAST), _quiet_boto():
                mlflow.artifacts.list_artifacts(artifact_uri=location, tracking_uri=uri)
            problem = None
    except Exception as exc:  # MLflow, boto or requests errors, depending on the store
        problem = _answer_text(exc)
    if problem:
        raise KdpipeError(f"artifact store {redact(location)} of {redact(uri)} cannot be "
                          f"read: {problem}; check the S3 endpoint and credentials (the "
                          "server's, for mlflow-artifacts:/)")
    _reachable.add(key)


# The server answers once its own S3 client has given up (botocore retries a refused
# connection about 5 s); a server that holds on longer is reported as not answering.
ARTIFACT_PROBE_TIMEOUT_S = 20.0


def _list_through_server(uri: str, location: str) -> str | None:
    """The server's proxied listing of ``location``, once, so that its own error message
    (S3's answer) comes back rather than MLflow's "too many 500 error responses"."""
    from urllib.parse import urlparse

    import requests

    url = uri.rstrip("/") + "/api/2.0/mlflow-artifacts/artifacts"
    try:
        response = requests.get(url, params={"path": urlparse(location).path.lstrip("/")},
                                timeout=ARTIFACT_PROBE_TIMEOUT_S)
    except requests.Timeout:
        return f"the server did not answer within {ARTIFACT_PROBE_TIMEOUT_S:.0f} s"
    if response.status_code < 400:
        return None
    return f"HTTP {response.status_code}: {_server_message(response)}"


def _answer_text(exc: Exception) -> str:
    """What went wrong, short: the server's own message when MLflow quotes its answer
    ("... Response text: {json}"), else the first line of the error."""
    import json

    text = str(exc)
    quoted = text.partition("Response text: ")[2]
    if quoted:
        with contextlib.suppress(ValueError, AttributeError):
            return redact(_first_line(str(json.loads(quoted)["message"]), 300))
    if "Read timed out" in text:
        return "no answer in time"
    if "Max retries exceeded" in text:  # requests' text for a server that is not there
        why = "connection refused" if "refused" in text else "no connection"
        return f"{why}, after MLflow's retries"
    return redact(_first_line(text, 300))


@contextlib.contextmanager
def _quiet_boto() -> Iterator[None]:
    """botocore retries a refused connection with its own backoff; one try is the probe."""
    with environ({"AWS_MAX_ATTEMPTS": "1", "AWS_RETRY_MODE": "standard"}):
        yield


_guard_depth = 0


@contextlib.contextmanager
def store_guard(uri: str, where: str) -> Iterator[None]:
    """An MLflow store failure inside the block (after the bounded retries) becomes one
    ``TrackingError`` line saying what to do; the outermost guard restores the retry
    settings that ``fail_fast`` lowered for ending the runs."""
    from mlflow.exceptions import MlflowException

    global _guard_depth
    saved = {k: os.environ.get(k) for k in FAIL_FAST}
    _guard_depth += 1
    try:
        yield
    except MlflowException as exc:
        raise TrackingError(
            f"MLflow tracking store {redact(uri)} failed during {where}: {_answer_text(exc)}; "
            "once it answers again, rerun: finished steps' outputs are kept and training "
            "resumes from its checkpoints") from None
    finally:
        _guard_depth -= 1
        if _guard_depth == 0:
            restore(saved)


@contextlib.contextmanager
def ends_killed() -> Iterator[None]:
    """Inside a run: an interruption (Ctrl-C, SIGTERM, SIGHUP) ends it KILLED, as MLflow's
    UI tells an interrupted run from a failed one; MLflow's own ``start_run`` would mark it
    FAILED. One quick try: a process asked to stop has seconds, not minutes."""
    import mlflow

    try:
        yield
    except KeyboardInterrupt:
        with contextlib.suppress(Exception), environ(FAIL_FAST):
            mlflow.end_run("KILLED")
        raise


@contextlib.contextmanager
def fail_fast() -> Iterator[None]:
    """Inside a run: after a store failure, the run's end (and its parents') tries once."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException:
        os.environ.update(FAIL_FAST)
        raise


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
    for key, value in RETRY_DEFAULTS.items():
        os.environ.setdefault(key, value)
    check_reachable(uri)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    global _set_by_us
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if before != uri and os.environ.get("MLFLOW_TRACKING_URI") == uri:
        _set_by_us = uri
    with store_guard(uri, "opening the experiment"):
        experiment = mlflow.get_experiment_by_name(cfg.tracking.experiment)
        if experiment is None:
            location = None
            if uri.startswith("sqlite:"):
                # A SQLite store has no artifact root of its own; keep artifacts beside the
                # DB instead of in ./mlruns of whatever folder the command ran from.
                location = cfg.paths.mlflow_artifacts.resolve().as_uri()
            _create_experiment(cfg.tracking.experiment, location)
            experiment = mlflow.get_experiment_by_name(cfg.tracking.experiment)
        check_not_moved(cfg, uri, experiment.artifact_location)
        if experiment.tags.get(EXPERIMENT_KIND[0]) is None:
            _tag_experiment(experiment.experiment_id)
    check_artifacts(uri, experiment.artifact_location)
    return experiment.experiment_id


def _tag_experiment(experiment_id: str) -> None:
    """Set ``EXPERIMENT_KIND`` on the experiment. Two runs starting at once may both try:
    MLflow's SQL store inserts the tag, and the later insert fails on the primary key
    (``experiment_tag_pk``), though the tag is then set as wanted."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    try:
        client.set_experiment_tag(experiment_id, *EXPERIMENT_KIND)
    except MlflowException:
        if client.get_experiment(experiment_id).tags.get(EXPERIMENT_KIND[0]) is None:
            raise


def check_not_moved(cfg: Config, uri: str, location: str | None) -> None:
    """MLflow records artifact locations as absolute paths: a SQLite store whose work_dir
    was moved (or copied) still points at the old folder, and would write there. Refuse
    with one line rather than scatter artifacts or fail a download later."""
    if not uri.startswith("sqlite:///") or not location or not location.startswith("file:"):
        return
    from urllib.parse import unquote, urlparse

    recorded = Path(unquote(urlparse(location).path))
    expected = cfg.paths.mlflow_artifacts.resolve()
    # The folder itself appears with the first artifact, and a task of the Kubeflow DAG
    # writes into the run's store from a work_dir of its own: only a recorded work_dir that
    # is gone means it was moved.
    if recorded == expected or recorded.exists() or recorded.parent.exists():
        return
    raise KdpipeError(
        f"MLflow store {uri} keeps experiment {cfg.tracking.experiment!r}'s artifacts in "
        f"{recorded}, which does not exist (was work_dir moved from there?); move it back, "
        "or start a new store: a new -S tracking.experiment=NAME, or a new work_dir")


def _create_experiment(name: str, location: str | None) -> None:
    """Create experiment ``name``; another run that just created it is as good."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        mlflow.create_experiment(name, artifact_location=location)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


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
    with store_guard(tracking_uri(cfg), f"the {name} run"), \
            mlflow.start_run(experiment_id=experiment_id, run_name=name,
                             tags=_run_tags(cfg)) as run, fail_fast(), ends_killed():
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
    with store_guard(tracking_uri(cfg), f"step {step}"), \
            mlflow.start_run(experiment_id=experiment_id, run_name=step, parent_run_id=parent,
                             nested=active is not None, tags=tags), fail_fast(), ends_killed():
        if active is None:
            mlflow.log_params(flatten(cfg.model_dump(mode="json") if settings is None
                                      else settings))
        result = _timed(lambda: fn(_log_metric))
        mlflow.log_metrics(result.metrics)
        for path in result.artifacts:
            mlflow.log_artifact(str(path))
    return result


@contextlib.contextmanager
def child_run(cfg: Config, name: str, params: dict[str, Any],
              tags: dict[str, str]) -> Iterator[ChildRun | None]:
    """A run nested in the active one (``kdpipe tune``'s trials in its parent run), with
    ``params``; yields a ``ChildRun`` to log curves, metrics and tags into it (None when
    tracking is off)."""
    if not cfg.tracking.enabled:
        yield None
        return
    import mlflow

    active = mlflow.active_run()
    # In the parent's experiment: start_run's own default is the store's Default one.
    experiment_id = active.info.experiment_id if active else configure(cfg)
    with store_guard(tracking_uri(cfg), f"run {name}"), \
            mlflow.start_run(experiment_id=experiment_id, run_name=name, nested=True,
                             tags=tags), fail_fast(), ends_killed():
        mlflow.log_params({k: str(v) for k, v in params.items()})
        yield ChildRun()


class ChildRun:
    """Logs into the run ``child_run`` opened, while it is the active one."""

    def log_metric(self, name: str, value: float, step: int) -> None:
        _log_metric(name, value, step)

    def finish(self, metrics: dict[str, float], tags: dict[str, str]) -> None:
        import mlflow

        mlflow.log_metrics(metrics)
        mlflow.set_tags(tags)


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
                                "kdpipe.params_hash": cfg.params_hash()}) as run, ends_killed():
        yield run.info.run_id


def annotate(run_id: str, name: str, note: str, metrics: dict[str, float],
             tags: dict[str, str], artifacts: dict[str, list[Path]]) -> str:
    """Give the run a run belongs to (its parent, else itself) the outcome: ``name``, a
    description (MLflow's note, shown first on the run's page), headline ``metrics``,
    ``tags`` and ``artifacts`` (folder in the run -> files). Returns the id annotated."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, RunTag

    client = MlflowClient()
    target = client.get_run(run_id).data.tags.get("mlflow.parentRunId") or run_id
    stamp = int(time.time() * 1000)
    client.update_run(target, name=name)
    client.log_batch(target, metrics=[Metric(k, v, stamp, 0) for k, v in metrics.items()],
                     tags=[RunTag(k, v) for k, v in {**tags, NOTE_TAG: note}.items()])
    for folder, paths in artifacts.items():
        for path in paths:
            if Path(path).is_file():  # an evaluation may lack a table or plots
                client.log_artifact(target, str(path), folder or None)
    return target


def run_page(ui: str, run_id: str, store: str | None = None) -> str:
    """The run's page in the MLflow UI at ``ui`` (``store``: where to read the run, default
    ``ui`` itself). ``workflowType=machine_learning`` opens the UI's model-training view:
    MLflow 3.17 takes that view from the URL or the browser's last choice, and reads the
    experiment's ``mlflow.experimentKind`` tag only when its view selector is off."""
    from mlflow import MlflowClient

    experiment_id = MlflowClient(tracking_uri=store or ui).get_run(run_id).info.experiment_id
    return (f"{ui.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
            "?workflowType=machine_learning")


def log_text(text: str, name: str) -> None:
    """``text`` as the artifact ``name`` of the active run."""
    import mlflow

    mlflow.log_text(text, name)


def current_run_id() -> str | None:
    """The active MLflow run's id, if a run is active in this process."""
    import sys

    if "mlflow" not in sys.modules:  # tracking off: no run, and no reason to import MLflow
        return None
    import mlflow

    active = mlflow.active_run()
    return active.info.run_id if active else None
