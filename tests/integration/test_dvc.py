"""DVC: the pipeline reproduces in a fresh clone, raw data is versioned with dvc add and a
local-folder remote, and ingest reads data inside a DVC repo at a git revision."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import separable_rows, write_csv

from kdpipe.steps import ingest

REPO = Path(__file__).resolve().parents[2]
BIN = str(Path(sys.executable).parent)
pytestmark = pytest.mark.slow


def sh(*args, cwd, check=True):
    env = {**os.environ, "PATH": BIN + os.pathsep + os.environ["PATH"],
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    done = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, env=env,
                          timeout=900)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done


def _fresh_clone(tmp_path: Path, teacher: Path) -> Path:
    files = sh("git", "ls-files", "-co", "--exclude-standard", cwd=REPO).stdout.split()
    clone = tmp_path / "clone"
    for name in files:
        if (REPO / name).is_file() and not name.startswith("work/"):
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, clone / name)
    params = yaml.safe_load((clone / "params.yaml").read_text())
    # The real pipeline, made small: a tiny teacher, one short epoch per training step.
    params["teacher"].update(checkpoint=str(teacher), epochs=1)
    params["student"]["embedding_dim"] = 16
    params["distill"]["epochs"] = 1
    params["distill"]["min_steps"] = 0
    params["evaluate"].update(latency_repeats=2, latency_warmup=0)
    # No MLflow: it costs each stage's process seconds, and tracking is tested elsewhere.
    params["tracking"]["enabled"] = False
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh("git", "init", "-q", cwd=clone)
    sh("git", "add", "-A", cwd=clone)
    sh("git", "commit", "-qm", "clone", cwd=clone)
    return clone


def test_dvc_repro_and_exp_run_in_a_fresh_clone(tmp_path, tiny_bert):
    clone = _fresh_clone(tmp_path, tiny_bert)
    sh("dvc", "repro", cwd=clone)
    card = json.loads((clone / "work/prepared/data_card.json").read_text())
    assert card["rows"]["train"] == 324
    lock = yaml.safe_load((clone / "dvc.lock").read_text())
    assert {o["path"] for o in lock["stages"]["ingest"]["outs"]} >= {"work/prepared/train.parquet"}
    assert (clone / "work/student/model.safetensors").exists()
    status = sh("dvc", "status", "--json", cwd=clone).stdout
    assert json.loads(status) == {"ingest": ["always changed"]}  # the rest is up to date
    metrics = json.loads(sh("dvc", "metrics", "show", "--json", cwd=clone).stdout)
    shown = json.dumps(metrics)
    assert "val_accuracy" in shown and "kept_fraction" in shown
    plots = json.loads(sh("dvc", "plots", "show", "--json", cwd=clone).stdout)["data"]
    assert {f"work/evaluation/plots/{name}.csv" for name in
            ("confusion_quantized", "reliability", "accuracy_latency")} <= set(plots)
    # A setting only register reads changes: `dvc exp run` re-runs register (and ingest,
    # always) and skips the rest. (A distill change re-running what follows distill is
    # bench/run.py's re-run, checked in test_bench_run.py.)
    made = {name: (clone / "work" / name).stat().st_mtime_ns
            for name in ("teacher/model.safetensors", "student/model.safetensors",
                         "register/register.json")}
    out = sh("dvc", "exp", "run", "-S", "registry.gate.max_regression=0.01", cwd=clone).stdout
    assert "Stage 'teacher' didn't change, skipping" in out
    assert "Running stage 'register'" in out and "Running stage 'distill'" not in out
    now = {name: (clone / "work" / name).stat().st_mtime_ns for name in made}
    assert [now[n] == made[n] for n in made] == [True, True, False]
    params = yaml.safe_load((clone / "params.yaml").read_text())
    assert params["registry"]["gate"]["max_regression"] == 0.01
    # A distill setting changes: DVC would re-run distill and the stages reading distill's
    # settings (what follows them re-runs on their changed outputs), not the teacher.
    params["distill"]["lr"] = 0.001
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = json.loads(sh("dvc", "status", "--json", cwd=clone).stdout)
    assert sorted(status) == ["distill", "ingest", "prune", "register"]


def test_raw_data_versioned_with_dvc_pushed_pulled_and_read_at_a_revision(
        tmp_path, make_config):
    data_repo = tmp_path / "data-repo"
    data_repo.mkdir()
    sh("git", "init", "-q", cwd=data_repo)
    sh("dvc", "init", "-q", cwd=data_repo)
    sh("dvc", "config", "core.analytics", "false", cwd=data_repo)
    sh("dvc", "remote", "add", "-d", "local", str(tmp_path / "remote"), cwd=data_repo)
    write_csv(data_repo / "raw" / "reviews.csv", separable_rows(60))
    sh("dvc", "add", "raw/reviews.csv", cwd=data_repo)
    sh("git", "add", "-A", cwd=data_repo)
    sh("git", "commit", "-qm", "v1", cwd=data_repo)
    v1 = sh("git", "rev-parse", "HEAD", cwd=data_repo).stdout.strip()
    sh("dvc", "push", cwd=data_repo)
    write_csv(data_repo / "raw" / "reviews.csv", separable_rows(100, seed=1))
    sh("dvc", "add", "raw/reviews.csv", cwd=data_repo)
    sh("git", "commit", "-qam", "v2", cwd=data_repo)
    sh("dvc", "push", cwd=data_repo)

    clone = tmp_path / "clone"
    sh("git", "clone", "-q", str(data_repo), str(clone), cwd=tmp_path)
    assert not (clone / "raw" / "reviews.csv").exists()
    sh("dvc", "pull", cwd=clone)
    assert (clone / "raw" / "reviews.csv").read_bytes() == \
        (data_repo / "raw" / "reviews.csv").read_bytes()

    cfg = make_config(**{"data.repo": str(clone), "data.rev": v1,
                         "data.source": "raw/reviews.csv"})
    ingest.run(cfg, cfg.paths.prepared)
    card = json.loads((cfg.paths.prepared / "data_card.json").read_text())
    assert sum(card["rows"].values()) == 60  # v1, not the 100 rows in the workspace
    assert card["source"] == {"kind": "dvc", "repo": str(clone), "path": "raw/reviews.csv",
                              "rev": v1, "git_commit": v1}

    local = make_config(**{"data.source": str(clone / "raw" / "reviews.csv")})
    ingest.run(local, local.paths.prepared)
    source = json.loads((local.paths.prepared / "data_card.json").read_text())["source"]
    dvc_file = yaml.safe_load((clone / "raw" / "reviews.csv.dvc").read_text())
    assert source["dvc_md5"] == dvc_file["outs"][0]["md5"]
    assert source["git_commit"] == sh("git", "rev-parse", "HEAD", cwd=clone).stdout.strip()


def test_unknown_path_in_dvc_repo_is_a_clear_error(tmp_path, make_config):
    from kdpipe.errors import DataError

    repo = tmp_path / "r"
    repo.mkdir()
    sh("git", "init", "-q", cwd=repo)
    sh("dvc", "init", "-q", cwd=repo)
    sh("git", "commit", "-qm", "init", cwd=repo)
    cfg = make_config(**{"data.repo": str(repo), "data.source": "raw/none.csv"})
    with pytest.raises(DataError, match=r"no 'raw/none\.csv' in this repository"):
        ingest.run(cfg, cfg.paths.prepared)
