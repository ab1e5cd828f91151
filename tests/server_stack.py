"""The tracking stack a team runs, started on loopback for the tests: PostgreSQL (``initdb``
into a temporary folder), moto's S3 server, and ``mlflow server`` with its backend store on
that database and its artifacts in a bucket of that S3. Each runs as a process of its own
and is stopped by its PID (PostgreSQL through ``pg_ctl``, which reads its PID file).

``missing()`` says, in one line, what is absent where the binaries are; the tests skip then,
except under CI, which must have them (``.ci/run`` installs PostgreSQL).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

PG_BIN_DIRS = [Path("/usr/lib/postgresql") / v / "bin" for v in ("17", "16", "15", "14")]
ACCESS_KEY, SECRET_KEY = "stack-access-key", "stack-secret-key"
# Loopback connections need this password (scram-sha-256), as a team's database would.
DB_PASSWORD = "stack-db-pa55word"
START_TIMEOUT_S = 90


@dataclass
class Stack:
    tracking_uri: str
    s3_endpoint: str
    bucket: str
    database_uri: str
    # What the MLflow server (and anything that reads the bucket directly) needs.
    s3_env: dict[str, str] = field(default_factory=dict)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    root: Path | None = None
    pg_data: Path | None = None

    @contextlib.contextmanager
    def postgres_stopped(self) -> Iterator[None]:
        """PostgreSQL down for the block (the MLflow server left running), then up again
        on the same port and data."""
        assert self.pg_data is not None
        _run(_as_postgres([pg_binary("pg_ctl"), "-D", str(self.pg_data), "-m", "fast", "-w",
                           "stop"]), "pg_ctl stop", 60)
        try:
            yield
        finally:
            _pg_start(self.pg_data, int(self.database_uri.rsplit(":", 1)[1].split("/")[0]))

    def restart_mlflow(self, down_s: float = 0.0) -> None:
        """Stop the MLflow server, wait ``down_s``, start it again on the same port."""
        assert self.root is not None
        stop(self.processes["mlflow"])
        time.sleep(down_s)
        port = int(self.tracking_uri.rsplit(":", 1)[1])
        self.processes["mlflow"], _ = start_mlflow(self.root, self.database_uri, self.bucket,
                                                   self.s3_env, port=port)


def pg_binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    return next((str(d / name) for d in PG_BIN_DIRS if (d / name).is_file()), None)


def missing() -> str | None:
    """Why the stack cannot start here, in one line, or None."""
    absent = [name for name in ("initdb", "pg_ctl", "postgres") if pg_binary(name) is None]
    if absent:
        return f"PostgreSQL binaries not found ({', '.join(absent)}): apt-get install postgresql"
    for module in ("psycopg", "moto", "mlflow"):
        try:
            __import__(module)
        except ImportError:
            return f"python package {module!r} is missing: pip install -e '.[dev]'"
    if os.geteuid() == 0 and _user_id("postgres") is None:
        return "running as root and no 'postgres' user to run PostgreSQL as"
    return None


@contextlib.contextmanager
def required_stack(root: Path) -> Iterator[Stack]:
    """``running_stack`` for a test module; skipped with the one-line reason where the
    binaries are missing, except under CI, which must have them."""
    import pytest

    why = missing()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"CI must have the tracking stack: {why}")
        pytest.skip(why)
    with running_stack(root) as running:
        yield running


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _user_id(name: str) -> int | None:
    import pwd

    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        return None


def _as_postgres(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: under root, run it as the 'postgres' user."""
    if os.geteuid() != 0:
        return command
    return ["runuser", "-u", "postgres", "--", *command]


def _wait(check, what: str, log: Path, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if check():
            return
        if process is not None and process.poll() is not None:
            break
        time.sleep(0.3)
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
    raise RuntimeError(f"{what} did not start within {START_TIMEOUT_S} s:\n{tail}")


def answers_health(base: str) -> bool:
    """Whether an MLflow server at ``base`` answers ``/health``."""
    return _answers(f"{base}/health")


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _run(command: list[str], what: str, timeout: float) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if done.returncode:
        raise RuntimeError(f"{what} failed ({done.returncode}): {done.stderr[-2000:]}")


def start_postgres(root: Path) -> tuple[str, Path]:
    """A new cluster on a free port, password auth (``DB_PASSWORD``) on loopback only;
    returns the SQLAlchemy URI of its ``postgres`` database and the data folder. Under root
    the cluster lives in a folder of its own under the system temp folder (pytest's are
    private to root) owned by the 'postgres' user; ``stop_postgres`` removes it."""
    if os.geteuid() == 0:
        root = Path(tempfile.mkdtemp(prefix="kdpipe-pg-"))
        root.chmod(0o755)
        os.chown(root, _user_id("postgres"), -1)
    data = root / "pg"
    password_file = root / "pw"
    password_file.write_text(DB_PASSWORD + "\n")
    if os.geteuid() == 0:
        os.chown(password_file, _user_id("postgres"), -1)
    _run(_as_postgres([pg_binary("initdb"), "-D", str(data), "-U", "kdpipe",
                       "--auth-host=scram-sha-256", "--auth-local=trust",
                       f"--pwfile={password_file}", "-E", "UTF8", "--no-instructions"]),
         "initdb", 120)
    password_file.unlink()
    port = free_port()
    _pg_start(data, port)
    return f"postgresql+psycopg://kdpipe:{DB_PASSWORD}@127.0.0.1:{port}/postgres", data


def _pg_start(data: Path, port: int) -> None:
    # Unix sockets in the data folder (not /var/run/postgresql, which may not exist).
    options = f"-p {port} -h 127.0.0.1 -k {data}"
    _run(_as_postgres([pg_binary("pg_ctl"), "-D", str(data), "-o", options, "-l",
                       str(data.parent / "postgres.log"), "-w", "-t", str(START_TIMEOUT_S),
                       "start"]), "pg_ctl start", START_TIMEOUT_S + 30)


def create_database(database_uri: str, name: str) -> str:
    """A new database on the stack's server; the URI of it (same user and password)."""
    import psycopg

    plain = database_uri.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(plain, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    return database_uri.rsplit("/", 1)[0] + f"/{name}"


def stop_postgres(data: Path) -> None:
    subprocess.run(_as_postgres([pg_binary("pg_ctl"), "-D", str(data), "-m", "fast", "-w",
                                 "stop"]), capture_output=True, timeout=60)
    if data.parent.name.startswith("kdpipe-pg-"):
        shutil.rmtree(data.parent, ignore_errors=True)


def start_moto(root: Path, **env: str) -> tuple[subprocess.Popen, str]:
    """moto's S3 server on a free loopback port; ``env``: moto settings (e.g.
    INITIAL_NO_AUTH_ACTION_COUNT="0" makes it check keys, so that any key is wrong)."""
    port, log = free_port(), root / "moto.log"
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                                "-p", str(port)], stdout=log.open("a"),
                               stderr=subprocess.STDOUT, start_new_session=True,
                               env={**os.environ, **env})
    endpoint = f"http://127.0.0.1:{port}"
    _wait(lambda: _answers(f"{endpoint}/moto-api/"), "moto's S3 server", log, process)
    return process, endpoint


def s3_client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)


def start_mlflow(root: Path, database_uri: str, bucket: str, s3_env: dict[str, str],
                 port: int | None = None) -> tuple[subprocess.Popen, str]:
    port, log = port or free_port(), root / "mlflow-server.log"
    env = {**os.environ, **s3_env, "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", database_uri,
         "--artifacts-destination", f"s3://{bucket}/mlartifacts", "--host", "127.0.0.1",
         "--port", str(port), "--workers", "2"],
        stdout=log.open("a"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    _wait(lambda: _answers(f"{uri}/health"), "mlflow server", log, process)
    return process, uri


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to the process group (uvicorn's workers too), SIGKILL after 20 s."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


@contextlib.contextmanager
def running_stack(root: Path, bucket: str = "kdpipe-artifacts") -> Iterator[Stack]:
    """The three services, up for the duration of the block, stopped whatever happens."""
    started: list = []
    root.mkdir(parents=True, exist_ok=True)
    try:
        database_uri, data = start_postgres(root)
        started.append(lambda: stop_postgres(data))
        moto, endpoint = start_moto(root)
        started.append(lambda: stop(moto))
        s3_client(endpoint).create_bucket(Bucket=bucket)
        s3_env = {"MLFLOW_S3_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                  "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1"}
        server, uri = start_mlflow(root, database_uri, bucket, s3_env)
        processes = {"moto": moto, "mlflow": server}
        # By name: restart_mlflow replaces the server's process.
        started.append(lambda: stop(processes["mlflow"]))
        yield Stack(uri, endpoint, bucket, database_uri, s3_env, processes, root, data)
    finally:
        for stop_one in reversed(started):
            stop_one()


def post_json(url: str, body: bytes) -> tuple[int, dict]:
    """POST ``body`` to a loopback ``url`` (no proxy); the status and the JSON answer."""
    import json
    import urllib.error

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1 only
    request = urllib.request.Request(url, data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with opener.open(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


@contextlib.contextmanager
def models_serve(model_uri: str, env: dict[str, str], folder: Path,
                 limit_s: float = 180) -> Iterator[str]:
    """``mlflow models serve -m model_uri`` (this interpreter's MLflow, no new environment)
    on a free loopback port until the block ends; yields its base URL. ``env``: added to
    this process's environment (the tracking URI, S3 settings)."""
    port = free_port()
    bin_dir = Path(sys.executable).parent  # serve runs `uvicorn` from PATH
    full_env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", **env,
                "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = folder / "serve.log"
    with open(log, "w") as handle:
        process = subprocess.Popen(
            [str(bin_dir / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager",
             "local", "-h", "127.0.0.1", "-p", str(port)],
            stdout=handle, stderr=subprocess.STDOUT, env=full_env, start_new_session=True,
            cwd=folder)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + limit_s
        while not _answers(f"{base}/ping"):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow models serve did not answer /ping (exit "
                                   f"{process.poll()}):\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield base
    finally:
        stop(process)


# One writer of concurrent_logging: logs ``metrics`` values of its own key into one run.
_WRITER = """
import sys, time
from mlflow import MlflowClient
uri, run_id, key, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
client = MlflowClient(tracking_uri=uri)
errors = 0
for step in range(count):
    try:
        client.log_metric(run_id, key, float(step), step=step)
    except Exception as exc:  # counted: the point is how many fail
        errors += 1
        print(f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}", file=sys.stderr)
print(errors)
"""


def concurrent_logging(uri: str, processes: int, metrics: int) -> dict:
    """``processes`` writers at once, each logging ``metrics`` steps of its own key into one
    new run (as parallel KFP tasks log to one experiment); what arrived, what failed, how
    long it took. Every writer is a process of its own, as the tasks are."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("concurrency")
    experiment_id = (experiment.experiment_id if experiment is not None
                     else client.create_experiment("concurrency"))
    run_id = client.create_run(experiment_id).info.run_id
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    start = time.perf_counter()
    writers = [subprocess.Popen([sys.executable, "-c", _WRITER, uri, run_id, f"w{i}",
                                 str(metrics)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env)
               for i in range(processes)]
    outputs = [w.communicate(timeout=600) for w in writers]
    seconds = time.perf_counter() - start
    errors = sum(int(out.strip().splitlines()[-1]) if out.strip() else metrics
                 for out, _ in outputs)
    arrived = sum(len(client.get_metric_history(run_id, f"w{i}")) for i in range(processes))
    first_error = next((err.strip().splitlines()[0] for _, err in outputs if err.strip()), None)
    client.set_terminated(run_id)
    return {"processes": processes, "metrics_each": metrics, "logged": processes * metrics,
            "arrived": arrived, "errors": errors, "exit_codes": [w.returncode for w in writers],
            "seconds": round(seconds, 1), "first_error": first_error}
