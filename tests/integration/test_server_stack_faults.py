"""What a shared tracking stack adds, against a stack of this module's own (faults here stop
and restart its services): two runs registering into one model at once, the server going
away mid-run, PostgreSQL or S3 failing before a run starts, and a database password in the
tracking URI. ``tests/server_stack.py`` starts the services."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
import server_stack
from typer.testing import CliRunner
from watched_process import WatchedProcess

from kdpipe.cli import app

pytestmark = [pytest.mark.slow, pytest.mark.services]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with server_stack.required_stack(tmp_path_factory.mktemp("faults")) as running:
        yield running


def settings(tiny_bert: Path, data: Path, work: Path, model: str, seed: int = 42) -> list[str]:
    pairs = {"teacher.checkpoint": tiny_bert, "data.source": data, "work_dir": work,
             "tracking.experiment": "faults", "registry.model_name": model, "seed": seed}
    return [arg for key, value in pairs.items() for arg in ("-S", f"{key}={value}")]


def kdpipe(args: list[str], uri: str, cwd: Path, **env: str) -> WatchedProcess:
    """``python -m kdpipe ARGS`` as a process of its own (as two users' runs are)."""
    full_env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_DISABLE_TELEMETRY": "true",
                "COLUMNS": "400", **env}  # no wrapped lines to search
    for name in ("MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        full_env.pop(name, None)  # the server holds the S3 credentials
    return WatchedProcess([sys.executable, "-m", "kdpipe", *args], cwd, full_env)


def record(work: Path) -> dict:
    return json.loads((work / "register" / "register.json").read_text())


def test_two_runs_at_once_register_both_and_the_champion_is_the_gates_pick(
        stack, tiny_bert, separable_csv, tmp_path):
    """Two users' runs of different candidates into one registered model at the same time:
    both versions are registered, the promotions take turns (the later one compared against
    the champion the earlier one left), and the alias ends where the later gate put it."""
    import mlflow

    model = "race-student"
    runs = [kdpipe(["run", *settings(tiny_bert, separable_csv, tmp_path / f"w{seed}", model,
                                     seed=seed)], stack.tracking_uri, tmp_path)
            for seed in (1, 2)]
    codes = [run.finish() for run in runs]
    assert codes == [0, 0], "\n\n".join(run.output for run in runs)
    records = [record(tmp_path / f"w{seed}") for seed in (1, 2)]
    assert sorted(r["version"] for r in records) == [1, 2]
    client = mlflow.MlflowClient(tracking_uri=stack.tracking_uri)
    versions = client.search_model_versions(f"name = '{model}'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    assert all(v.status == "READY" for v in versions)
    champion = int(client.get_model_version_by_alias(model, "champion").version)
    # Serialised: one order of the two promotions explains both records and the alias.
    assert any(later["champion_before"] == earlier["champion_after"]
               and champion == later["champion_after"]
               for earlier, later in (records, records[::-1])), records
    assert not client.search_registered_models(f"name = '{model}.promotion-lock'")


def test_the_server_restarting_mid_run_is_ridden_out_and_a_dead_one_is_one_line(
        stack, tiny_bert, separable_csv, tmp_path):
    """The server restarts during distill: MLflow's bounded retries carry the run through.
    Then it stops during the evaluate step and stays down: the run ends with one line within the
    (here shortened) retries. Once it is back, the next run completes and registers no
    second version of the same candidate."""
    import mlflow

    model, work = "restart-student", tmp_path / "work"
    args = ["run", *settings(tiny_bert, separable_csv, work, model)]

    first = kdpipe(args, stack.tracking_uri, tmp_path)
    first.wait_for("▶ distill")
    stack.restart_mlflow(down_s=2)
    assert first.finish() == 0, first.output
    assert record(work)["version"] == 1

    # --from evaluate: every step is up to date; the server stops while evaluate runs (the
    # last step before register, so the next run has little to redo).
    second = kdpipe([*args, "--from", "evaluate"], stack.tracking_uri, tmp_path,
                    MLFLOW_HTTP_REQUEST_MAX_RETRIES="1",
                    MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1")
    second.wait_for("▶ evaluate")
    server_stack.stop(stack.processes["mlflow"])
    stopped = time.monotonic()
    try:
        assert second.finish(limit_s=120) == 1, second.output
        assert time.monotonic() - stopped < 60
    finally:
        stack.restart_mlflow()
    errors = [line for line in second.lines if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in second.output, second.output
    assert f"MLflow tracking store {stack.tracking_uri} failed during" in errors[0]
    assert "rerun" in errors[0]

    third = kdpipe(args, stack.tracking_uri, tmp_path)
    assert third.finish() == 0, third.output
    again = record(work)
    assert again["version"] == 1 and "(already registered)" in third.output
    client = mlflow.MlflowClient(tracking_uri=stack.tracking_uri)
    assert [v.version for v in client.search_model_versions(f"name = '{model}'")] == ["1"]
    assert client.get_model_version_by_alias(model, "champion").version == "1"


def invoke_run(uri: str, tiny_bert: Path, data: Path, work: Path, monkeypatch) -> tuple:
    """``kdpipe run`` in this process; (exit code, output, seconds)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    start = time.perf_counter()
    result = CliRunner().invoke(app, ["run", *settings(tiny_bert, data, work, "never")])
    return result.exit_code, result.output, time.perf_counter() - start


def assert_one_line_before_any_step(code: int, output: str, seconds: float, work: Path,
                                    expected: str) -> None:
    assert code == 1, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in output, output
    assert expected in errors[0], errors[0]
    assert seconds < 30, (seconds, output)
    assert "▶" not in output and not (work / "prepared").exists()


def test_postgresql_down_at_start_is_one_line_before_any_step(
        stack, tiny_bert, separable_csv, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with stack.postgres_stopped():
        outcome = invoke_run(stack.tracking_uri, tiny_bert, separable_csv, tmp_path / "w",
                             monkeypatch)
    assert_one_line_before_any_step(*outcome, tmp_path / "w", "a query of its backend store")


def test_an_s3_the_server_cannot_use_is_one_line_before_any_step(
        stack, tiny_bert, separable_csv, tmp_path, monkeypatch):
    """A second MLflow server on the same database whose S3 refuses its keys (a moto server
    that checks them: INITIAL_NO_AUTH_ACTION_COUNT=0), then cannot be reached (that moto
    stopped)."""
    monkeypatch.chdir(tmp_path)
    moto, endpoint = server_stack.start_moto(tmp_path, INITIAL_NO_AUTH_ACTION_COUNT="0")
    server, uri = server_stack.start_mlflow(
        tmp_path, stack.database_uri, stack.bucket,
        {**stack.s3_env, "MLFLOW_S3_ENDPOINT_URL": endpoint})
    try:
        refused = invoke_run(uri, tiny_bert, separable_csv, tmp_path / "w", monkeypatch)
        server_stack.stop(moto)
        unreachable = invoke_run(uri, tiny_bert, separable_csv, tmp_path / "w", monkeypatch)
    finally:
        for process in (server, moto):
            server_stack.stop(process)
    assert_one_line_before_any_step(*refused, tmp_path / "w",
                                    "AWS Access Key Id you provided does not exist")
    assert_one_line_before_any_step(*unreachable, tmp_path / "w", "HTTP 500")
    assert "artifact store mlflow-artifacts:/" in refused[1] + unreachable[1]


def test_a_database_password_in_the_tracking_uri_reaches_nothing_kdpipe_writes(
        stack, tiny_bert, separable_csv, tmp_path, monkeypatch):
    """kdpipe straight on PostgreSQL (no server), the password in the URI: it logs there and
    the password is in no output, param, tag or file; a wrong one is one quick line."""
    import mlflow

    monkeypatch.chdir(tmp_path)
    uri = server_stack.create_database(stack.database_uri, "direct")
    password = server_stack.DB_PASSWORD
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    base = ["-S", f"data.source={separable_csv}", "-S", f"work_dir={tmp_path / 'w'}",
            "-S", f"teacher.checkpoint={tiny_bert}", "-S", "tracking.experiment=direct"]
    result = CliRunner().invoke(app, ["ingest", *base])
    assert result.exit_code == 0, result.output
    assert password not in result.output
    runs = mlflow.MlflowClient(tracking_uri=uri).search_runs(
        [mlflow.MlflowClient(tracking_uri=uri).get_experiment_by_name("direct").experiment_id])
    assert len(runs) == 1
    assert password not in json.dumps({**runs[0].data.params, **runs[0].data.tags})
    assert [p for p in tmp_path.rglob("*")
            if p.is_file() and password.encode() in p.read_bytes()] == []

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri.replace(password, "not-the-password"))
    start = time.perf_counter()
    wrong = CliRunner().invoke(app, ["ingest", *base])
    assert wrong.exit_code == 1 and time.perf_counter() - start < 20
    assert "password authentication failed" in wrong.output
    assert "not-the-password" not in wrong.output and password not in wrong.output
    assert [line.startswith("error:") for line in wrong.output.strip().splitlines()
            if "▶" not in line] == [True], wrong.output
