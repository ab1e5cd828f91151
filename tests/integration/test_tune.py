"""`kdpipe tune` after `kdpipe run` on the fixture: trials from the cached soft labels, one
MLflow run with a child run per trial, the best settings written into params.yaml (its
comments kept) because they beat its own; SIGTERM during a trial, and a later tune continuing
the same study."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys

import pytest
from watched_process import WatchedProcess

from kdpipe.config import load_config

pytestmark = pytest.mark.slow

SPACE = "tune.space={distill.lr: {low: 1.0e-6, high: 0.02, log: true}, " \
        "distill.epochs: {choices: [1, 2]}}"


def environment():
    return {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"},
            "COLUMNS": "200"}


def kdpipe(tmp_path, *args, timeout=600):
    return subprocess.run([sys.executable, "-m", "kdpipe", *args], cwd=tmp_path,
                          env=environment(), capture_output=True, text=True, timeout=timeout)


def test_tune_searches_records_and_writes_back_the_best(tmp_path, tiny_bert, separable_csv):
    params = tmp_path / "params.yaml"
    # lr 1e-6 barely moves the student: a setting the search should beat.
    params.write_text(f"""\
# kept through the write-back
teacher:
  checkpoint: {tiny_bert}
data:
  source: {separable_csv}
soft_labels:
  cache_dir: {tmp_path / 'cache'}
distill:
  lr: 1.0e-06  # too low
  min_steps: 0
evaluate:
  latency_repeats: 2
  latency_warmup: 0
""")
    run = kdpipe(tmp_path, "run")
    assert run.returncode == 0, run.stderr[-3000:]

    tuned = kdpipe(tmp_path, "tune", "--trials", "3", "-S", SPACE)
    assert tuned.returncode == 0, tuned.stderr[-3000:]
    record = json.loads((tmp_path / "work" / "tune" / "tune.json").read_text())
    trials = record["trials"]
    assert len(trials) == 3 and record["steps"] == ["distill"]
    assert trials[0]["baseline"] and trials[0]["settings"] == {"distill.lr": 1e-6,
                                                               "distill.epochs": 2}
    assert all(t["state"] == "complete" for t in trials)  # the first three are never pruned
    best = max(trials, key=lambda t: t["value"])
    assert record["improved"] and best["value"] > trials[0]["value"]
    assert record["best"]["settings"] == best["settings"]
    assert "(params.yaml's settings)" in tuned.stderr
    assert not list((tmp_path / "work" / "tune").glob("trial-*"))

    # Written back: the best values, the comments and the other settings kept.
    assert "# kept through the write-back" in params.read_text()
    written = load_config(params)
    assert written.distill.lr == best["settings"]["distill.lr"]
    assert written.distill.epochs == best["settings"]["distill.epochs"]
    assert written.distill.min_steps == 0
    assert "`kdpipe run` re-runs distill and what follows" in tuned.stdout

    # MLflow: one run named tune, a child run per trial with its settings and its score.
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("kdpipe")
    parents = client.search_runs([experiment.experiment_id],
                                 "attributes.run_name = 'tune'")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.data.metrics["best_val_accuracy"] == pytest.approx(best["value"])
    children = client.search_runs(
        [experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_trial = {int(c.data.tags["kdpipe.tune.trial"]): c for c in children}
    assert sorted(by_trial) == [0, 1, 2]
    for t in trials:
        child = by_trial[t["number"]]
        assert float(child.data.params["distill.lr"]) == pytest.approx(t["settings"]["distill.lr"])
        assert child.data.metrics["val_accuracy"] == pytest.approx(t["value"])
        assert child.info.status == "FINISHED"

    # SIGTERM during a trial: the trial's run ends KILLED, one line says how to go on.
    stopped = WatchedProcess([sys.executable, "-m", "kdpipe", "tune", "--trials", "6",
                              "--no-write", "-S", SPACE], tmp_path, environment())
    mlflow_db = tmp_path / "work" / "mlflow.db"
    stopped.wait_for(lambda: bool(query(mlflow_db, "SELECT count(*) FROM runs WHERE "
                                         "name = 'trial 3' AND status = 'RUNNING'")))
    stopped.process.send_signal(signal.SIGTERM)
    assert stopped.finish() == 128 + signal.SIGTERM, stopped.output
    assert "interrupted (SIGTERM)" in stopped.output
    assert "`kdpipe tune` again continues this search" in stopped.output
    assert "failed with value" not in stopped.output  # Optuna's own log line, not repeated
    assert query(mlflow_db, "SELECT status FROM runs WHERE name = 'trial 3'") == "KILLED"

    # The same search again continues the study: the killed trial does not count, one more
    # makes four done.
    again = kdpipe(tmp_path, "tune", "--trials", "4", "--no-write", "-S", SPACE)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "3 trials done" in again.stderr
    final = json.loads((tmp_path / "work" / "tune" / "tune.json").read_text())["trials"]
    assert [t["state"] for t in final] == ["complete"] * 3 + ["fail", "complete"]
    # Not the settings of a trial it already ran: the sampler is seeded past them.
    assert final[4]["settings"] not in [t["settings"] for t in trials]


def query(db, sql):
    """The first column of the first row, or None (the file may not hold the table yet)."""
    try:
        with contextlib.closing(sqlite3.connect(db)) as connection:
            row = connection.execute(sql).fetchone()
    except sqlite3.OperationalError:
        return None
    return row[0] if row else None
