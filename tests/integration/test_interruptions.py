"""Signals, mixed outputs and a shared work_dir, each on a real ``kdpipe`` process.

- SIGTERM (what ``timeout``, CI cancellation and ``docker stop`` send) during distill: the
  process ends within seconds with exit code 143 and one line naming the step and how it
  resumes; the MLflow parent and step runs end KILLED; nothing half-written is left.
- The work_dir it leaves mixes two runs (a new teacher, an old student): ``kdpipe predict``
  and ``kdpipe register`` refuse it with one line; ``kdpipe run`` says why each step re-runs,
  keeps what is up to date, and distill resumes from its checkpoint.
- A second ``kdpipe run`` on a work_dir in use stops at once, naming the first; a lock whose
  holder was killed is taken over.
- SIGHUP and SIGINT end a step like SIGTERM does (exit codes 129 and 130, run KILLED).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from watched_process import WatchedProcess

pytestmark = pytest.mark.slow


def kdpipe(*args: str, work: Path, teacher: Path, csv: Path) -> list[str]:
    return [sys.executable, "-m", "kdpipe", *args, "-S", f"teacher.checkpoint={teacher}",
            "-S", f"work_dir={work}", "-S", f"data.source={csv}",
            "-S", f"soft_labels.cache_dir={work / 'cache'}",
            "-S", f"tracking.uri=sqlite:///{work / 'mlflow.db'}",
            "-S", "teacher.epochs=2", "-S", "teacher.checkpoint_every_steps=1",
            "-S", "distill.epochs=3", "-S", "distill.min_steps=0",
            "-S", "distill.early_stopping_patience=null",
            "-S", "evaluate.latency_repeats=1", "-S", "evaluate.latency_warmup=0"]


def process(cmd: list[str], cwd: Path) -> WatchedProcess:
    """A kdpipe command in its own session, its stderr collected as it comes."""
    return WatchedProcess(cmd, cwd, {**os.environ, "COLUMNS": "250"}, stderr_only=True,
                          new_session=True)


def statuses(work: Path) -> dict[str, list[str]]:
    """MLflow run name -> the statuses of runs of that name, oldest first."""
    with sqlite3.connect(work / "mlflow.db") as db:
        rows = db.execute("select name, status from runs order by start_time").fetchall()
    found: dict[str, list[str]] = {}
    for name, status in rows:
        found.setdefault(name, []).append(status)
    return found


def leftovers(work: Path) -> list[str]:
    return [str(p) for p in work.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from conftest import separable_rows, write_csv

    return write_csv(tmp_path_factory.mktemp("data") / "reviews.csv", separable_rows(120))


def test_sigterm_mid_distill_then_a_mix_refused_then_a_resumed_rerun(tmp_path, tiny_bert,
                                                                     data):
    work = tmp_path / "work"
    cmd = kdpipe("run", work=work, teacher=tiny_bert, csv=data)
    first = process([*cmd, "-S", "distill.epochs=1"], tmp_path)  # quick: only its student
    assert first.finish() == 0, first.output
    student = (work / "student" / "model.safetensors").read_bytes()

    # Another seed re-makes everything from the teacher on; SIGTERM lands in distill.
    second = process([*cmd, "-S", "seed=1"], tmp_path)
    checkpoint = work / "checkpoints" / "distill" / "state.json"
    second.wait_for(checkpoint.is_file)

    second.process.send_signal(signal.SIGTERM)  # the process only, as `timeout` does
    started = time.monotonic()
    assert second.finish(limit_s=60) == 128 + signal.SIGTERM
    assert time.monotonic() - started < 30
    last = second.output.strip().splitlines()[-1]
    assert last.startswith("interrupted (SIGTERM) during distill; MLflow runs ended KILLED")
    assert "distill resumes from its checkpoint (epoch" in last, last
    assert "Traceback" not in second.output
    runs = statuses(work)
    assert runs["distill"][-1] == "KILLED" and runs["pipeline"][-1] == "KILLED", runs
    assert runs["teacher"][-1] == "FINISHED"
    assert leftovers(work) == [] and not (work / ".kdpipe.lock").exists()
    # The old student is still there, beside a teacher made by the interrupted run.
    assert (work / "student" / "model.safetensors").read_bytes() == student

    for refused in (["predict", "a lovely film", "--model", str(work / "quantized")],
                    [*kdpipe("register", work=work, teacher=tiny_bert, csv=data)[3:],
                     "-S", "seed=1"]):
        done = subprocess.run([sys.executable, "-m", "kdpipe", *refused], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 1, done.stderr
        message = done.stderr.strip()
        assert "\n" not in message and "mix of runs" in message, message
        assert "Traceback" not in done.stderr

    third = process([*cmd, "-S", "seed=1"], tmp_path)
    assert third.finish() == 0, third.output
    err = third.output
    for kept in ("ingest", "teacher", "baseline", "soft_labels", "fractionate"):
        assert f"✓ {kept}: up to date (made by `kdpipe run`" in err, (kept, err)
    assert "runs: its last run did not finish" in err
    assert "resumes from the checkpoint an interrupted run left (epoch" in err
    assert "has changed since it ran" in err  # prune onwards: a new student
    distilled = json.loads((work / "student" / "distill.json").read_text())
    assert distilled["resumed_at_epoch"] >= 1
    done = subprocess.run([sys.executable, "-m", "kdpipe", "predict", "a lovely film",
                           "--model", str(work / "quantized")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["label"] in {"pos", "neg"}

    # Nothing stale now: a rerun keeps every step and opens no MLflow run.
    before = sum(len(v) for v in statuses(work).values())
    again = subprocess.run(cmd + ["-S", "seed=1"], cwd=tmp_path, capture_output=True,
                           text=True, timeout=120)
    assert again.returncode == 0 and "every step is up to date" in again.stderr
    last_run = json.loads((work / "provenance" / "register.json").read_text())["pipeline_run_id"]
    assert f"MLflow run {last_run}" in again.stdout  # the link to the run that made them
    assert sum(len(v) for v in statuses(work).values()) == before


def test_a_second_run_is_refused_and_a_killed_runs_lock_taken_over(tmp_path, tiny_bert, data):
    work = tmp_path / "work"
    cmd = kdpipe("ingest", work=work, teacher=tiny_bert, csv=data)
    victim = process(kdpipe("run", work=work, teacher=tiny_bert, csv=data), tmp_path)
    victim.wait_for((work / ".kdpipe.lock").is_file)
    # A second run on the same work_dir stops at once, naming the first.
    rival = subprocess.run(kdpipe("run", work=work, teacher=tiny_bert, csv=data), cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
    assert rival.returncode == 1
    line = rival.stderr.strip()
    assert "\n" not in line and f"pid {victim.process.pid}" in line and "is in use by" in line
    assert victim.process.poll() is None
    os.killpg(victim.process.pid, signal.SIGKILL)
    victim.finish(limit_s=30)
    assert (work / ".kdpipe.lock").is_file()  # nothing could remove it
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"taking over {work / '.kdpipe.lock'} from" in done.stderr
    assert not (work / ".kdpipe.lock").exists()


@pytest.fixture(scope="module")
def ingested(tmp_path_factory, tiny_bert, data) -> Path:
    root = tmp_path_factory.mktemp("ingested")
    done = subprocess.run(kdpipe("ingest", work=root / "work", teacher=tiny_bert, csv=data),
                          cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return root / "work"


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGINT])
def test_sighup_and_sigint_end_a_step_like_sigterm(tmp_path, tiny_bert, data, ingested, sig):
    work = tmp_path / "work"
    shutil.copytree(ingested, work)
    step = process([*kdpipe("teacher", work=work, teacher=tiny_bert, csv=data),
                    "-S", "teacher.epochs=50"], tmp_path)
    step.wait_for((work / "checkpoints" / "teacher" / "state.json").is_file)
    step.process.send_signal(sig)
    assert step.finish(limit_s=60) == 128 + sig
    name = signal.Signals(sig).name
    last = step.output.strip().splitlines()[-1]
    assert last.startswith(f"interrupted ({name}) during teacher"), last
    assert "MLflow runs ended KILLED; `kdpipe teacher` again: teacher resumes from its " \
        "checkpoint (step" in last
    assert statuses(work)["teacher"][-1] == "KILLED"
    assert leftovers(work) == [] and not (work / ".kdpipe.lock").exists()
