"""The DAG in containers: docker/build.sh builds the image here (--local-base --no-push),
and `kdpipe run --runner kfp-docker` runs every task in it with kfp's DockerRunner.

Needs a Docker engine: without one these tests skip, except under CI (CI=true), where they
fail. The image build is a session fixture: cold (Debian base, wheelhouse, image) it takes
some minutes; warm (nothing changed, or only kdpipe's source) seconds to a minute.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import separable_rows, write_csv
from typer.testing import CliRunner

from kdpipe.cli import app
from kdpipe.config import Config

pytestmark = pytest.mark.container

REPO = Path(__file__).resolve().parents[2]
BUILD_TIMEOUT_S = 1800


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@pytest.fixture(scope="session")
def engine() -> None:
    """A Docker engine answers, or the test skips (outside CI) or fails (in CI)."""
    try:
        done = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"],
                              capture_output=True, text=True, timeout=60)
        answered = done.returncode == 0
        why = (done.stderr.strip().splitlines() or ["docker info failed"])[-1]
    except (OSError, subprocess.TimeoutExpired) as exc:
        answered, why = False, f"{type(exc).__name__}: {exc}"
    if not answered:
        message = f"no Docker engine answers ({why})"
        if in_ci():
            pytest.fail(f"{message}; under CI the container tests must run (.ci/run starts "
                        "dockerd)")
        pytest.skip(message)


@pytest.fixture(scope="session")
def image(engine) -> str:
    """The kdpipe image built from this checkout; its tag."""
    done = subprocess.run(["bash", str(REPO / "docker" / "build.sh"), "--local-base",
                           "--no-push"], capture_output=True, text=True,
                          timeout=BUILD_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-4000:]
    settings = done.stdout.strip()
    assert settings.startswith("-S kfp.cpu_image="), settings
    return settings.removeprefix("-S kfp.cpu_image=")


def containers_of(work: Path) -> list[str]:
    """Containers (running or not) that a kfp-docker run with this work_dir started."""
    listed = subprocess.run(["docker", "ps", "--all", "--filter", "label=kdpipe.run",
                             "--format", '{{.Label "kdpipe.run"}}'],
                            capture_output=True, text=True, timeout=60, check=True)
    return [run for run in listed.stdout.split() if run.startswith(str(work.resolve()))]


def servers_on(store: Path) -> list[int]:
    """Processes of an `mlflow server` whose command line names ``store``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"server" in argv and any(str(store).encode() in arg for arg in argv):
            found.append(int(proc.name))
    return found


def files(folder: Path) -> set[str]:
    """Files under ``folder``, but the MLflow store's, the runners' logs and kdpipe's
    provenance records (the DAG's outputs carry Kubeflow's lineage instead)."""
    found = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    return {f for f in found if f not in {"mlflow.db", "kfp-docker.log"}
            and not f.startswith(("mlartifacts/", "provenance/"))}


def tiny_settings(teacher: Path, **extra) -> dict:
    """Relative paths on purpose: the containers start in this folder and see it."""
    return {"work_dir": "work", "data": {"source": "data/reviews.csv"},
            "teacher": {"checkpoint": str(teacher), "max_steps": 2},
            "ingest": {"max_length": 32}, "distill": {"epochs": 1, "min_steps": 0},
            "soft_labels": {"cache_dir": "cache", "batch_size": 16, "shards": 2},
            "evaluate": {"models": ["teacher", "quantized"], "latency_repeats": 1,
                         "latency_warmup": 0}, **extra}


def test_the_dag_in_containers_makes_what_kdpipe_run_makes_and_registers(
        image, tiny_bert, tmp_path, monkeypatch):
    import mlflow

    from kdpipe.kfp.pipeline import STEP_COMPONENTS

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    write_csv(tmp_path / "data" / "reviews.csv", separable_rows(200))
    # tracking.uri null: the SQLite store in work_dir, which the run serves to the tasks.
    (tmp_path / "docker.yaml").write_text(yaml.safe_dump(tiny_settings(
        tiny_bert, tracking={"experiment": "docker"}, kfp={"cpu_image": image})))
    dag = CliRunner().invoke(app, ["run", "--runner", "kfp-docker", "-p", "docker.yaml"])
    assert dag.exit_code == 0, dag.output
    assert "registered: yes" in dag.output
    work = tmp_path / "work"
    log = re.sub(r"\x1b\[[0-9;]*m", "", (work / "kfp-docker.log").read_text())
    assert "Task 'register' finished with status" in log

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    name = Config().registry.model_name
    version = client.get_model_version_by_alias(name, "champion")
    assert int(version.version) == 1
    experiment = client.get_experiment_by_name("docker")
    # The experiment keeps its artifacts beside the store, as `kdpipe run` makes it, and the
    # tasks wrote them there (mounted), not into their containers.
    assert experiment.artifact_location == (work / "mlartifacts").resolve().as_uri()
    runs = client.search_runs([experiment.experiment_id])
    # The DAG's parent run, named by the register task for the outcome.
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert parent.info.run_name.endswith(" · v1 champion"), parent.info.run_name
    assert parent.data.tags["kdpipe.outcome"] == "champion"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert {r.info.run_name for r in children} == set(STEP_COMPONENTS)
    ingest = next(r for r in children if r.info.run_name == "ingest")
    assert [a.path for a in client.list_artifacts(ingest.info.run_id)]
    assert (work / "mlartifacts" / ingest.info.run_id / "artifacts").is_dir()
    stored = client.get_model_version_download_uri(name, version.version)
    assert Path(stored.removeprefix("file://"), "MLmodel").is_file()

    # The same folders as `kdpipe run` on the same settings, with this user's files in them.
    (tmp_path / "cli.yaml").write_text(yaml.safe_dump(tiny_settings(
        tiny_bert, work_dir="cli", tracking={"experiment": "cli"})))
    result = CliRunner().invoke(app, ["run", "-p", "cli.yaml"])
    assert result.exit_code == 0, result.output
    assert files(work) == files(tmp_path / "cli")
    assert {"evaluation/metrics.json", "register/register.json"} <= files(work)
    for name in ("train.parquet", "validation.parquet", "test.parquet", "labels.json"):
        assert (work / "prepared" / name).read_bytes() == \
            (tmp_path / "cli" / "prepared" / name).read_bytes(), name
    card = json.loads((work / "prepared" / "data_card.json").read_text())
    assert card["source"]["path"] == str(tmp_path / "data" / "reviews.csv")
    assert {p.stat().st_uid for p in work.rglob("*")} == {os.getuid()}
    assert list((tmp_path / "cache").iterdir())  # the soft-label cache is this machine's
    assert not list(work.glob(".kfp-docker-*"))
    assert containers_of(work) == []
    assert servers_on(work / "mlflow.db") == []


def test_a_failing_task_ends_the_run_with_its_one_line(image, tiny_bert, tmp_path,
                                                      monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_csv(tmp_path / "data" / "reviews.csv", separable_rows(40))
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(tiny_settings(
        tiny_bert, tracking={"enabled": False}, kfp={"cpu_image": image},
        data={"source": "data/reviews.csv", "text_column": "review"})))
    result = CliRunner().invoke(app, ["run", "--runner", "kfp-docker", "-p", "bad.yaml"])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: kfp-docker: ingest: ")
    assert "no column 'review'" in result.output
    assert "registered" not in result.output
    work = tmp_path / "work"
    assert not (work / "prepared").exists()
    assert not list(work.glob(".kfp-docker-*"))
    assert containers_of(work) == []


def test_a_missing_image_is_one_line_saying_how_to_build_it(engine, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["run", "--runner", "kfp-docker", "-S",
                                      "kfp.cpu_image=kdpipe:no-such-tag", "-S",
                                      "tracking.enabled=false"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (
        "error: image kdpipe:no-such-tag not found; build it with docker/build.sh "
        "--local-base --no-push")
