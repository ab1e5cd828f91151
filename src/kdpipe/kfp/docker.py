"""``run_in_docker``: the Kubeflow DAG on this machine, each task in a container of the kdpipe
image (``kfp.local.DockerRunner``), for ``kdpipe run --runner kfp-docker``.

The same DAG and the same outputs as ``run_local`` (``kdpipe.kfp.local.run_dag``), with
what a container needs to see of this machine:

- Image: every task runs ``kfp.cpu_image`` (``docker/build.sh --local-base --no-push``
  makes ``kdpipe:<version>``); there is no GPU here, and that image holds every step.
- Network: the host's (``network_mode="host"``), so a task reaches an MLflow server on
  127.0.0.1. A local store (the SQLite default) is served for the run by ``mlflow server``
  on a free loopback port: containers cannot share a SQLite file safely, a server they can.
- Files: the run's scratch folder (kfp's pipeline root and the errors file), a local
  ``data.source`` / ``data.repo`` / ``teacher.checkpoint`` (read-only), the soft-label cache
  and a ``file:`` artifact location of the experiment are mounted at the same absolute
  paths, and the container starts in this folder, so relative settings mean what they mean
  here. Tasks run as this user (uid:gid), so what they write is this user's to move and
  delete, not the image's uid 10001's.
- Environment: the tracking URI and parent run, the errors file, telemetry off, and the
  Hugging Face offline switches and MLflow / object-storage credentials that are set here.
"""

from __future__ import annotations

import codecs
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import unquote, urlparse

from kdpipe.config import Config
from kdpipe.env_vars import environ
from kdpipe.errors import KdpipeError
from kdpipe.kfp.adapter import ERRORS_ENV
from kdpipe.kfp.cluster import MLFLOW_KEYS, STORAGE_KEYS
from kdpipe.kfp.local import (
    LocalRun,
    errors_file,
    parent_run,
    redirected,
    run_dag,
    scratch_folder,
)
from kdpipe.kfp.pipeline import quiet_kfp

LABEL = "kfp-docker"
RUN_LABEL = "kdpipe.run"  # on each task's container: the run's scratch folder
BUILD_HINT = "build it with docker/build.sh --local-base --no-push"
# Passed to the tasks when set here: telemetry switches (kdpipe sets them on import), the
# Hugging Face offline switches, torch's thread count, and the credentials of MLflow and of
# object storage (the keys a cluster's Secrets provide).
PASSED_ENV = ("MLFLOW_DISABLE_TELEMETRY", "DVC_NO_ANALYTICS", "HF_HUB_DISABLE_TELEMETRY",
              "DO_NOT_TRACK", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE",
              "OMP_NUM_THREADS",
              *(key for key in MLFLOW_KEYS if key != "MLFLOW_TRACKING_URI"), *STORAGE_KEYS)
# MLflow prints a link to each run it ends on a server: to one stopped after the run.
QUIET_MLFLOW = {"MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
SERVER_START_S = 60.0
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no proxy
SERVER_STOP_S = 15.0


def run_in_docker(cfg: Config, log: TextIO | None = None) -> LocalRun:
    """Run the whole DAG with ``kfp.local.DockerRunner`` and put its outputs where ``kdpipe
    run`` does; as ``run_local`` otherwise (``log``, errors, the gate)."""
    import docker
    from kfp import local

    image = cfg.kfp.cpu_image
    check_image(image)
    inputs = input_mounts(cfg)
    with scratch_folder(cfg, LABEL) as scratch, redirected(log), \
            tracking_server(cfg, scratch / "mlflow-server.log") as server, \
            environ({**QUIET_MLFLOW, **_loopback_unproxied(),
                     **({"MLFLOW_TRACKING_URI": server} if server else {})}), \
            parent_run(cfg, LABEL) as (run_id, tracking_env), tasks_in(image), quiet_kfp():
        mounts = [*inputs, (scratch, False), *artifact_mounts(cfg, run_id)]
        runner = local.DockerRunner(
            network_mode="host", user=f"{os.getuid()}:{os.getgid()}",
            working_dir=os.getcwd(), mounts=docker_mounts(mounts),
            environment=task_environment(errors_file(scratch), tracking_env),
            labels={RUN_LABEL: str(scratch)})
        try:
            outputs = run_dag(cfg, runner, scratch, LABEL)
        except docker.errors.DockerException as exc:  # a container that could not start
            raise KdpipeError(f"{LABEL}: docker: {_first_line(exc)}") from None
    return LocalRun(outputs, "registration" in outputs, run_id)


def check_image(image: str) -> None:
    """Raise a one-line ``KdpipeError`` unless a Docker engine answers and has ``image``."""
    import docker

    try:
        client = docker.from_env()
    except docker.errors.DockerException as exc:
        raise KdpipeError(f"{LABEL}: no Docker engine answers ({_first_line(exc)}); start "
                          "one (dockerd), or use --runner kfp-local") from None
    try:
        client.images.get(image)
    except docker.errors.ImageNotFound:
        raise KdpipeError(f"image {image} not found; {BUILD_HINT}") from None
    except docker.errors.DockerException as exc:
        raise KdpipeError(f"{LABEL}: no Docker engine answers ({_first_line(exc)}); start "
                          "one (dockerd), or use --runner kfp-local") from None
    finally:
        client.close()


Mount = tuple[Path, bool]  # (absolute path, read-only)


def input_mounts(cfg: Config) -> list[Mount]:
    """What the tasks read or write of this machine: a local data source, DVC repository or
    teacher folder (read-only), and the soft-label cache (created if missing)."""
    mounts: list[Mount] = []
    for setting, value in (("data.source", cfg.data.source), ("data.repo", cfg.data.repo),
                           ("teacher.checkpoint", cfg.teacher.checkpoint)):
        if not value or value in ("demo", "default") or "://" in value:
            continue  # packaged (demo set, default teacher), remote, or unset
        path = _local(setting, value)
        if path.is_file() and path.parent != Path("/"):
            # The folder: ingest also reads a `<file>.dvc` beside the file (the data card).
            path = path.parent
        if path.exists():
            mounts.append((path, True))
    cache = _local("soft_labels.cache_dir", str(cfg.soft_labels.cache_dir))
    cache.mkdir(parents=True, exist_ok=True)
    mounts.append((cache, False))
    return mounts


def _local(setting: str, value: str) -> Path:
    if value.startswith("~"):
        # The container's home is another folder: `~` would name a different path there.
        raise KdpipeError(f"{LABEL}: {setting} {value!r}: write the path without '~'")
    return Path(os.path.abspath(value))  # not resolve(): the container sees cwd's spelling


def artifact_mounts(cfg: Config, run_id: str | None) -> list[Mount]:
    """The experiment's artifact folder when it is a local path (``file:``): experiments a
    SQLite store made keep their artifacts beside it, which a task must write into, not
    into its own filesystem. ``mlflow-artifacts:`` and object-store locations go through
    the server and need nothing."""
    if run_id is None:
        return []
    import mlflow

    experiment = mlflow.MlflowClient().get_experiment_by_name(cfg.tracking.experiment)
    location = urlparse(experiment.artifact_location if experiment else "")
    if location.scheme not in ("", "file") or not location.path:
        return []
    folder = Path(unquote(location.path))
    folder.mkdir(parents=True, exist_ok=True)
    return [(folder, False)]


def docker_mounts(mounts: list[Mount]) -> list[Any]:
    """Bind mounts at the same paths, one per folder (read-write wins over read-only)."""
    from docker.types import Mount as DockerMount

    read_only: dict[str, bool] = {}
    for path, ro in mounts:
        read_only[str(path)] = read_only.get(str(path), True) and ro
    return [DockerMount(target=path, source=path, type="bind", read_only=ro)
            for path, ro in sorted(read_only.items())]


def task_environment(errors: Path, tracking_env: dict[str, str]) -> dict[str, str]:
    """The tasks' environment: what ``PASSED_ENV`` names from here, the errors file, the
    tracking URI and parent run (``tracking_env``), and a writable home (tasks run as this
    user's uid, which the image has no home for)."""
    passed = {name: os.environ[name] for name in PASSED_ENV if name in os.environ}
    return {**passed, **QUIET_MLFLOW, "MLFLOW_DISABLE_TELEMETRY": "true", "HOME": "/tmp",
            ERRORS_ENV: str(errors), **tracking_env}


@contextlib.contextmanager
def tracking_server(cfg: Config, log_path: Path) -> Iterator[str | None]:
    """The URI the tasks log to: None when tracking is off or the store is a server already
    (it is used as it is); for a local store (SQLite, files), an ``mlflow server`` on it for
    the duration, on a free loopback port, serving artifacts from the same folder kdpipe
    gives the store's experiments; stopped (its process group) afterwards."""
    from kdpipe import tracking

    uri = tracking.tracking_uri(cfg)
    if not cfg.tracking.enabled or uri.startswith(("http://", "https://", "databricks")):
        yield None
        return
    # The store's tables and the experiment exist before the server opens it, the experiment
    # with the local artifact location `kdpipe run` gives it (so both runners share it).
    tracking.configure(cfg)
    artifacts = cfg.paths.mlflow_artifacts.resolve()
    artifacts.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port",
             str(port), "--workers", "1", "--backend-store-uri", uri, "--serve-artifacts",
             "--artifacts-destination", str(artifacts)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: its workers stop with it
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, server, log_path, tracking.redact(uri))
        yield url
    finally:
        _stop(server)


def _loopback_unproxied() -> dict[str, str]:
    """NO_PROXY with the loopback added: a proxy set here must not carry the MLflow
    client's calls to the server this run started on 127.0.0.1."""
    current = os.environ.get("NO_PROXY", os.environ.get("no_proxy", ""))
    value = ",".join(part for part in (current, "127.0.0.1,localhost") if part)
    return {"NO_PROXY": value, "no_proxy": value}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_healthy(url: str, server: subprocess.Popen, log_path: Path, store: str) -> None:
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            lines = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
            why = lines[-1] if lines else f"exit code {server.returncode}"
            raise KdpipeError(f"{LABEL}: mlflow server on {store} stopped: {why}")
        with contextlib.suppress(OSError):
            with _DIRECT.open(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        time.sleep(0.25)
    raise KdpipeError(f"{LABEL}: mlflow server on {store} did not answer in "
                      f"{SERVER_START_S:.0f} s")


def _stop(server: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, SERVER_STOP_S), (signal.SIGKILL, SERVER_STOP_S)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(timeout=wait)
            return


@contextlib.contextmanager
def tasks_in(image: str) -> Iterator[None]:
    """kfp 2.17's DockerRunner, mended for this run in two ways:

    - A task's image set from a pipeline parameter reaches it unresolved (the literal
      ``{{$.inputs.parameters['pipelinechannel--cpu_image']}}``): every task runs
      ``image`` instead.
    - It starts containers with ``auto_remove=True`` and reads a container already removed
      as exit code 0, so a task that fails fast counts as a success
      (kubeflow/pipelines#13332): the container is kept until its exit code is read.
    """
    from kfp.local import docker_task_handler

    def run(client: Any, image: str, command: list[str], volumes: dict[str, Any],
            **run_args: Any) -> int:
        return run_container(client, chosen, command, volumes, **run_args)

    chosen = image

    original = docker_task_handler.run_docker_container
    docker_task_handler.run_docker_container = run
    try:
        yield
    finally:
        docker_task_handler.run_docker_container = original


def run_container(client: Any, image: str, command: list[str], volumes: dict[str, Any],
                  **run_args: Any) -> int:
    """Run ``command`` in a container of ``image``, print its output as it comes, and return
    its exit code; the container is removed afterwards."""
    import docker

    container = client.containers.run(image=image, command=command, volumes=volumes,
                                      detach=True, **run_args)
    try:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        for chunk in container.logs(stream=True, follow=True):
            print(decoder.decode(chunk), end="")
        print(decoder.decode(b"", final=True), end="")
        return int(container.wait()["StatusCode"])
    finally:
        with contextlib.suppress(docker.errors.APIError):
            container.remove(force=True)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
