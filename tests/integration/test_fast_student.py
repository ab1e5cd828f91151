"""`kdpipe run` with the fast student (student.arch fast) end to end on the fixture: every
step runs, the exported and int8 graphs keep parity, and `kdpipe predict` serves it."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def test_the_fast_student_runs_through_every_step(tmp_path, tiny_bert, separable_csv):
    work = tmp_path / "work"
    env = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"},
           "COLUMNS": "200"}
    run = subprocess.run(
        [sys.executable, "-m", "kdpipe", "run", "-S", f"teacher.checkpoint={tiny_bert}",
         "-S", f"work_dir={work}", "-S", f"data.source={separable_csv}",
         "-S", f"soft_labels.cache_dir={tmp_path / 'cache'}", "-S", "tracking.enabled=false",
         "-S", "student.arch=fast", "-S", "student.fast.buckets=512",
         "-S", "prune.structured_fraction=0.25",
         "-S", "evaluate.latency_repeats=2", "-S", "evaluate.latency_warmup=0"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]

    student = json.loads((work / "student" / "student.json").read_text())
    assert student["arch"] == "fast" and student["student"]["fast"]["buckets"] == 512
    # Structured pruning removed a quarter of the 128 hidden units; the bigram table stays.
    pruned = json.loads((work / "pruned" / "pruning.json").read_text())
    assert pruned["sizes"] == {"hidden_size": 96, "buckets": 512}
    export = json.loads((work / "export" / "export.json").read_text())
    assert export["parity"]["max_abs_diff"] <= 1e-4
    models = json.loads((work / "evaluation" / "metrics.json").read_text())["models"]
    assert models["quantized"]["accuracy"] >= 0.8, models  # the label is one word

    predicted = subprocess.run(
        [sys.executable, "-m", "kdpipe", "predict", "--model", str(work / "quantized"),
         "the movie was good", "the food was bad"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    labels = [json.loads(line)["label"] for line in predicted.stdout.splitlines()]
    assert labels == ["pos", "neg"]
