"""kdpipe against the tracking stack a team runs: an MLflow server on PostgreSQL with its
artifacts in S3 (moto's server), all on loopback (``tests/server_stack.py``). The pipeline
logs its runs there, registers and promotes the model, and the champion is served from S3."""

from __future__ import annotations

import json

import pytest
import server_stack
from typer.testing import CliRunner

from kdpipe.cli import app
from kdpipe.pipeline import STEPS

pytestmark = [pytest.mark.slow, pytest.mark.services]
MODEL = "stack-student"
SECRET = "stack-s3cr3t-do-not-log"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with server_stack.required_stack(tmp_path_factory.mktemp("stack")) as running:
        yield running


@pytest.fixture
def kdpipe_on_stack(stack, tmp_path, monkeypatch, tiny_bert, separable_csv):
    """``kdpipe`` commands with MLFLOW_TRACKING_URI on the stack's server, and no S3
    credentials in kdpipe's own environment: the server holds them."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", stack.tracking_uri)
    for name in ("MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)

    def invoke(*args, code=0):
        base = ["-S", f"teacher.checkpoint={tiny_bert}", "-S", f"work_dir={tmp_path / 'work'}",
                "-S", f"data.source={separable_csv}", "-S", "tracking.experiment=stack",
                "-S", f"registry.model_name={MODEL}"]
        result = CliRunner().invoke(app, [*args, *base])
        assert result.exit_code == code, result.output
        return result

    return invoke


def test_the_pipeline_logs_registers_and_serves_through_the_server_stack(
        stack, kdpipe_on_stack, tmp_path, monkeypatch):
    import mlflow
    from rich.console import Console

    from kdpipe import cli

    # One line per version: the CLI's console measures its width once, at import.
    monkeypatch.setattr(cli, "out", Console(width=200))
    # Credentials a user's shell holds: none may reach MLflow, the bucket, logs or files.
    for name in ("HF_TOKEN", "AWS_SECRET_ACCESS_KEY", "PGPASSWORD", "KFP_API_TOKEN"):
        monkeypatch.setenv(name, SECRET)

    result = kdpipe_on_stack("run")
    assert SECRET not in result.output
    client = mlflow.MlflowClient(tracking_uri=stack.tracking_uri)
    experiment = client.get_experiment_by_name("stack")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    children = {r.info.run_name: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert set(children) == {step.name for step in STEPS}
    assert parents[0].data.params["ingest.max_length"] == "128"
    assert children["ingest"].data.metrics["rows_train"] == 160
    assert "loss/total" in children["distill"].data.metrics

    # Artifacts went through the server into the bucket (the client holds no S3 credentials).
    s3 = server_stack.s3_client(stack.s3_endpoint)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=stack.bucket, MaxKeys=1000)
            .get("Contents", [])]
    evaluate_id = children["evaluate"].info.run_id
    assert any(evaluate_id in k and k.endswith("comparison.md") for k in keys), keys[:20]
    assert any(evaluate_id in k and k.endswith(".png") for k in keys)
    assert any(k.endswith("model.onnx") for k in keys)

    # Neither the client's secrets nor the server's S3 key reached the store or the bucket.
    for needle in (SECRET, server_stack.SECRET_KEY):
        for run in runs:
            assert needle not in json.dumps({**run.data.params, **run.data.tags})
        assert [p for p in tmp_path.rglob("*") if p.is_file()
                and needle.encode() in p.read_bytes()] == []
        assert [k for k in keys if needle.encode() in s3.get_object(
            Bucket=stack.bucket, Key=k)["Body"].read()] == []

    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert SECRET not in (champion.description or "") + json.dumps(champion.tags)
    assert client.get_model_version_by_alias(MODEL, "challenger").version == champion.version
    listed = kdpipe_on_stack("models")
    row = next(line for line in listed.stdout.splitlines() if "champion" in line)
    assert str(champion.version) in row and "challenger" in row
    kdpipe_on_stack("promote")  # the champion already: exit 0

    with server_stack.models_serve(f"models:/{MODEL}@champion",
                                   {"MLFLOW_TRACKING_URI": stack.tracking_uri}, tmp_path) as base:
        status, answer = server_stack.post_json(
            f"{base}/invocations", json.dumps({"inputs": {"text": ["good film"]}}).encode())
    assert status == 200, answer
    assert answer["predictions"][0]["label"] in {"pos", "neg"}


def test_eight_processes_log_into_one_run_at_once_and_nothing_is_lost(stack):
    result = server_stack.concurrent_logging(stack.tracking_uri, processes=8, metrics=40)
    assert result["exit_codes"] == [0] * 8
    assert result["errors"] == 0, result["first_error"]
    assert result["arrived"] == 8 * 40
