import json

import pytest
from typer.testing import CliRunner

from kdpipe.cli import app


@pytest.fixture
def tracked(tmp_path, monkeypatch, tiny_bert, separable_csv):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path}/mlflow.db"

    def invoke(*args):
        base = ["-S", f"teacher.checkpoint={tiny_bert}", "-S", f"work_dir={tmp_path / 'work'}",
                "-S", f"data.source={separable_csv}", "-S", f"tracking.uri={uri}",
                "-S", "tracking.experiment=t"]
        result = CliRunner().invoke(app, [*args, *base])
        assert result.exit_code == 0, result.output
        return result

    return invoke, uri


def _runs(uri):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("t")
    return client, client.search_runs([experiment.experiment_id])


SECRET = "s3cr3t-t0ken-do-not-log"


def _files_holding(root, needle: bytes):
    return [p for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def test_pipeline_run_has_a_nested_run_per_step_with_params_and_data_card(
        tracked, tmp_path, monkeypatch):
    invoke, uri = tracked
    # Secrets a user's shell typically holds must not reach params, tags, logs or artifacts.
    for name in ("HF_TOKEN", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD",
                 "KFP_API_TOKEN"):
        monkeypatch.setenv(name, SECRET)
    result = invoke("run")
    assert SECRET not in result.output
    assert _files_holding(tmp_path, SECRET.encode()) == []
    assert "kdpipe run" in result.output
    # The run ends with the side-by-side table, every evaluated model in it.
    table = result.output.rsplit("models on 20 validation rows", 1)[1]
    for model in ("teacher_int8", "quantized"):
        assert model in table
    register = json.loads((tmp_path / "work" / "register" / "register.json").read_text())
    assert register["promoted"] is True and register["aliases"]["champion"] == 1
    client, runs = _runs(uri)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert "ingest" in {c.info.run_name for c in children}
    assert parent.data.params["ingest.max_length"] == "128"
    assert len(parent.data.tags["kdpipe.params_hash"]) == 16
    ingest_run = next(c for c in children if c.info.run_name == "ingest")
    assert ingest_run.data.metrics["rows_train"] == 160
    assert ingest_run.data.metrics["seconds"] > 0
    card_path = client.download_artifacts(ingest_run.info.run_id, "data_card.json")
    assert json.load(open(card_path))["rows"]["validation"] == 20
    distill_run = next(c for c in children if c.info.run_name == "distill")
    assert "loss/total" in distill_run.data.metrics  # per-step curves through log_metric

    # The parent run shows the outcome first: name, description, headline, tags, artifacts.
    assert parent.info.run_name == "bilstm · reviews · v1 champion"
    note = parent.data.tags["mlflow.note.content"]
    assert "**v1 is the champion**" in note and "| gate check |" in note
    assert "| min_teacher_retention |" in note and "retention" in note
    quantized = json.loads((tmp_path / "work" / "evaluation" / "metrics.json").read_text()
                           )["models"]["quantized"]
    assert parent.data.metrics["student_accuracy"] == pytest.approx(quantized["accuracy"])
    assert parent.data.metrics["registered_version"] == 1
    assert parent.data.metrics["promoted"] == 1
    assert {"teacher_accuracy", "retention", "speedup", "size_ratio"} <= set(
        parent.data.metrics)
    assert parent.data.tags["kdpipe.outcome"] == "champion"
    assert parent.data.tags["kdpipe.student"] == "bilstm"
    assert parent.data.tags["kdpipe.registered"] == "kdpipe-student/1"
    shown = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"comparison.md", "metrics.json", "model_card.md", "plots"} <= shown
    assert client.list_artifacts(parent.info.run_id, "plots")
    experiment = client.get_experiment_by_name("t")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    # The pipeline run names its version for `kdpipe compare`; a step run registered none.
    compared = invoke("compare", parent.info.run_id, "champion")
    assert compared.stdout.count("v1") >= 2
    other = CliRunner().invoke(app, ["compare", ingest_run.info.run_id, "1", "-S",
                                     f"tracking.uri={uri}", "-S", "tracking.experiment=t"])
    assert other.exit_code == 1 and "registered no version" in other.output

    predicted = CliRunner().invoke(app, ["predict", "--model", "work/quantized",
                                         "good film", "bad"])
    assert predicted.exit_code == 0, predicted.output
    lines = [json.loads(line) for line in predicted.stdout.splitlines()]
    assert [line["text"] for line in lines] == ["good film", "bad"]
    assert all(abs(sum(line["probabilities"].values()) - 1) < 1e-5 for line in lines)
    assert {line["label"] for line in lines} <= {"neg", "pos"}


def test_a_single_step_gets_its_own_run_and_env_uri_wins(tracked, tmp_path, monkeypatch):
    invoke, uri = tracked
    other = f"sqlite:///{tmp_path}/other.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", other)
    invoke("ingest")
    _, runs = _runs(other)
    assert [r.info.run_name for r in runs] == ["ingest"]
    assert runs[0].data.params["data.source"].endswith("reviews.csv")
    assert not (tmp_path / "mlflow.db").exists()


def test_tracking_can_be_switched_off(tmp_path, monkeypatch, tiny_bert, separable_csv):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = CliRunner().invoke(app, [
        "run", "-S", f"teacher.checkpoint={tiny_bert}", "-S", f"work_dir={tmp_path / 'w'}",
        "-S", f"data.source={separable_csv}", "-S", "tracking.enabled=false"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "w" / "prepared" / "train.parquet").exists()
    assert not (tmp_path / "w" / "mlflow.db").exists()


def test_telemetry_is_off_once_kdpipe_is_imported():
    import os

    import kdpipe  # noqa: F401

    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert os.environ["DVC_NO_ANALYTICS"] == "1"
    assert os.environ["HF_HUB_DISABLE_TELEMETRY"] == "1"


def test_an_experiment_another_run_just_created_is_used_not_an_error(tmp_path):
    """Two runs starting at once both find no experiment and both create it: the second
    creation's RESOURCE_ALREADY_EXISTS means the experiment is there to use."""
    import mlflow

    from kdpipe import tracking

    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'race.db'}")
    try:
        tracking._create_experiment("race", None)
        tracking._create_experiment("race", None)  # the other run's creation
        assert mlflow.get_experiment_by_name("race") is not None
        with pytest.raises(mlflow.exceptions.MlflowException):
            tracking._create_experiment("", None)  # other errors still raise
    finally:
        mlflow.set_tracking_uri(before)


def test_an_experiment_tag_another_run_just_set_is_not_an_error(tmp_path, monkeypatch):
    """Two runs starting at once both tag the experiment; on PostgreSQL the later insert
    fails on the tag's primary key (seen in CI), though the tag is set as wanted."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from kdpipe import tracking

    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'tags.db'}")
    real = mlflow.MlflowClient.set_experiment_tag

    def raced(self, experiment_id, key, value):
        real(self, experiment_id, key, value)  # the other run's insert
        raise MlflowException('duplicate key value violates unique constraint '
                              '"experiment_tag_pk"')

    try:
        experiment_id = mlflow.create_experiment("tags")
        monkeypatch.setattr(mlflow.MlflowClient, "set_experiment_tag", raced)
        tracking._tag_experiment(experiment_id)
        assert mlflow.get_experiment(experiment_id).tags[tracking.EXPERIMENT_KIND[0]] == \
            tracking.EXPERIMENT_KIND[1]
        monkeypatch.setattr(mlflow.MlflowClient, "set_experiment_tag",
                            lambda *a: (_ for _ in ()).throw(MlflowException("store down")))
        other = mlflow.create_experiment("untagged")
        with pytest.raises(MlflowException, match="store down"):
            tracking._tag_experiment(other)  # not set by anyone: still an error
    finally:
        mlflow.set_tracking_uri(before)


def test_a_moved_work_dir_is_one_line_not_artifacts_written_to_the_old_place(
        tmp_path, monkeypatch, tiny_bert, separable_csv):
    """MLflow keeps absolute artifact paths: after moving work_dir, the store still points
    at the old folder. kdpipe says so (run, a step, models) instead of writing there."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    def invoke(*args, work):
        return CliRunner().invoke(app, [*args, "-S", f"work_dir={work}", "-S",
                                        f"data.source={separable_csv}", "-S",
                                        f"teacher.checkpoint={tiny_bert}"],
                                  env={"COLUMNS": "300"})

    first = invoke("ingest", work=tmp_path / "a" / "work")
    assert first.exit_code == 0, first.output
    (tmp_path / "a" / "work").rename(tmp_path / "b")
    for command in ("ingest", "models"):
        moved = invoke(command, work=tmp_path / "b")
        assert moved.exit_code == 1, moved.output
        assert "(was work_dir moved from there?)" in moved.stderr
        assert moved.stderr.count("error:") == 1 and "Traceback" not in moved.output
    assert not (tmp_path / "a" / "work").exists()  # nothing recreated at the old place
