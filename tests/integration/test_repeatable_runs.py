"""Runs are repeatable. The same params and seed twice on a CPU give identical metrics
(timings aside), prepared data, weights and ONNX files. SIGKILL ``kdpipe run`` inside teacher
training, soft labelling, registration and distillation, then run it again: every rerun
completes, long steps resume from their checkpoints, nothing half-written is left, and the
final metrics equal those of a run never interrupted."""

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

# Wall-clock measurements (and whether the soft-label cache was warm) differ between any two
# runs; everything else must not.
TIMED = re.compile(r"second|latency|throughput|tokenize|speedup|texts_per|cache_hit|"
                   r"^version$")  # a killed registration may have made a version already
# Files whose bytes must match: data, weights, the exported and quantized models.
SAME_BYTES = ["prepared/train.parquet", "prepared/validation.parquet", "prepared/test.parquet",
              "teacher/model.safetensors", "soft_labels/train_logits.npy",
              "student/model.safetensors", "pruned/student/model.safetensors",
              "export/model.onnx", "quantized/model.onnx"]


def command(work: Path, tiny_bert: Path, csv: Path) -> list[str]:
    return [sys.executable, "-m", "kdpipe", "run", "-S", f"teacher.checkpoint={tiny_bert}",
            "-S", f"work_dir={work}", "-S", f"data.source={csv}",
            "-S", f"soft_labels.cache_dir={work / 'cache'}",
            # Several epochs and a checkpoint per teacher step leave room to land a kill.
            "-S", "teacher.epochs=4", "-S", "teacher.checkpoint_every_steps=1",
            "-S", "teacher.early_stopping_patience=null", "-S", "distill.epochs=4",
            "-S", "distill.min_steps=0",
            "-S", "distill.early_stopping_patience=null",
            "-S", "evaluate.latency_repeats=2", "-S", "evaluate.latency_warmup=0"]


def run_until(cmd: list[str], cwd: Path, kill_when) -> tuple[bool, str]:
    """Run ``cmd``; SIGKILL its process group as soon as ``kill_when(stderr_lines)`` is
    true. Returns (killed, stderr)."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True,
                            env={**{k: v for k, v in os.environ.items()
                                    if k != "MLFLOW_TRACKING_URI"}, "COLUMNS": "200"})
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    deadline = time.monotonic() + 240
    killed = False
    while proc.poll() is None and time.monotonic() < deadline:
        if kill_when(lines):
            os.killpg(proc.pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.01)
    proc.wait(timeout=60)
    reader.join(timeout=10)
    return killed, "".join(lines)


def final_metrics(work: Path) -> dict:
    """Every step's metrics but timings (and size ratios: see ``assert_same``)."""
    return {p.stem: {k: v for k, v in json.loads(p.read_text()).items()
                     if not TIMED.search(k) and not k.endswith("size_vs_teacher")}
            for p in sorted((work / "metrics").glob("*.json"))}


def assert_same(found: dict, expected: dict) -> None:
    """Equal, except folder sizes within 1 kB: the records in a folder hold paths and
    durations, a few bytes more or less."""
    assert found.keys() == expected.keys()
    for step, values in expected.items():
        sizes = {k for k in values if k.endswith("size_bytes")}
        assert {k: v for k, v in found[step].items() if k not in sizes} == \
            {k: v for k, v in values.items() if k not in sizes}, step
        for key in sizes:
            assert abs(found[step][key] - values[key]) < 1000, (step, key)


def leftovers(work: Path) -> list[str]:
    # Not the soft-label cache's staging folders (".<key>.staged-..."): a killed store's stays
    # until a later store sweeps it a day on, as kdpipe.training.softcache says, because a young one
    # may be a live writer's on another host sharing the cache.
    return [str(p.relative_to(work)) for p in work.rglob(".*")
            if (".tmp-" in p.name or ".old-" in p.name) and ".staged-" not in p.name]


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, tiny_bert):
    """The work folder of one uninterrupted run, and its final metrics."""
    from conftest import separable_rows, write_csv

    root = tmp_path_factory.mktemp("clean")
    csv = write_csv(root / "reviews.csv", separable_rows(200))
    killed, err = run_until(command(root / "work", tiny_bert, csv), root, lambda _: False)
    assert not killed and "✓ evaluate" in err, err
    return root / "work", csv, final_metrics(root / "work")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_two_runs_with_the_same_seed_are_identical(clean_run, tmp_path_factory, tiny_bert):
    first, csv, expected = clean_run
    tmp_path = tmp_path_factory.mktemp("again")
    second = tmp_path / "work"
    killed, err = run_until(command(second, tiny_bert, csv), tmp_path, lambda _: False)
    assert not killed, err
    assert expected["distill"]["val_accuracy"] > 0 and "evaluate" in expected
    assert_same(final_metrics(second), expected)
    for name in SAME_BYTES:
        assert digest(first / name) == digest(second / name), name
    cards = [json.loads((w / "prepared/data_card.json").read_text()) for w in (first, second)]
    assert cards[0]["content_hash"] == cards[1]["content_hash"]


@pytest.mark.slow
def test_killed_runs_resume_and_end_like_an_uninterrupted_one(clean_run, tmp_path_factory,
                                                               tiny_bert):
    _, separable_csv, expected = clean_run
    tmp_path = tmp_path_factory.mktemp("kills")
    work = tmp_path / "work"
    cmd = command(work, tiny_bert, separable_csv)
    teacher_ckpt = work / "checkpoints" / "teacher" / "state.json"
    distill_ckpt = work / "checkpoints" / "distill" / "state.json"
    started = {}

    def after(step, seconds):
        def when(lines):
            if any(f"▶ {step}" in line for line in lines):
                started.setdefault(step, time.monotonic())
                return time.monotonic() - started[step] >= seconds
            return False
        return when

    kill_points = {
        "teacher": lambda lines: teacher_ckpt.is_file() and json.loads(
            teacher_ckpt.read_text())["state"]["step"] >= 3,
        "soft_labels": after("soft_labels", 0.3),
        "register": after("register", 1.0),
        "distill": lambda lines: distill_ckpt.is_file(),  # last: the final run resumes it
    }
    for point, when in kill_points.items():
        # After the register kill every step before it is up to date and would be kept:
        # --from distill makes the last kill land in distill.
        killed, err = run_until(cmd + ["--from", "distill"] * (point == "distill"), tmp_path,
                                when)
        assert killed, f"the run ended before the {point} kill point:\n{err}"
        if point == "soft_labels":  # this run went on from the teacher checkpoint
            training = json.loads((work / "teacher" / "training.json").read_text())
            assert training["resumed"] is True and training["resumed_from_steps"][0] >= 3
    # The last kill left a distill checkpoint; the teacher's was cleared when it finished.
    assert distill_ckpt.is_file() and not teacher_ckpt.exists()

    killed, err = run_until(cmd, tmp_path, lambda _: False)
    assert not killed and "✓ evaluate" in err, err
    assert json.loads((work / "student" / "distill.json").read_text())["resumed_at_epoch"] >= 1
    assert_same(final_metrics(work), expected)
    assert leftovers(work) == []
    assert not (work / "checkpoints" / "distill").exists()
