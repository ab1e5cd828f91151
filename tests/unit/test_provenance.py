"""Provenance records: why a step is stale, and a mix of runs refused with one line."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from kdpipe import __version__, provenance
from kdpipe.config import validate
from kdpipe.errors import KdpipeError
from kdpipe.pipeline import step_named


@pytest.fixture
def cfg(tmp_path):
    csv = tmp_path / "reviews.csv"
    csv.write_text("text,label\na,pos\n")
    return validate({"work_dir": str(tmp_path / "work"), "data": {"source": str(csv)}})


PREPARED = ("train.parquet", "validation.parquet", "test.parquet", "unlabeled.parquet",
            "labels.json", "data_card.json")


def make(cfg, step_name: str, content: str = "x", command: str = "kdpipe run",
         files: tuple[str, ...] | None = None) -> None:
    """Write ``step_name``'s output folder (``files`` of it: default all; ingest's are named
    as the steps after it read them) and record it as finished."""
    step = step_named(step_name)
    folder = getattr(cfg.paths, step.output)
    folder.mkdir(parents=True, exist_ok=True)
    for name in files or (PREPARED if step_name == "ingest" else ("out.txt",)):
        (folder / name).write_text(content)
    run = provenance.RunInfo(command, pipeline_run_id="0123456789abcdef")
    provenance.started(cfg, step, run)
    provenance.finished(cfg, step, run)


def test_a_recorded_step_is_up_to_date_until_its_settings_source_or_inputs_change(cfg):
    ingest, teacher = step_named("ingest"), step_named("teacher")
    assert provenance.stale(cfg, teacher) == "no record of a finished run in this work_dir"
    make(cfg, "ingest")
    make(cfg, "teacher")
    assert provenance.stale(cfg, ingest) is None and provenance.stale(cfg, teacher) is None
    assert provenance.up_to_date_text(cfg, teacher).startswith(
        "up to date (made by `kdpipe run` at ")

    changed = cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={"epochs": 9})})
    assert provenance.stale(changed, teacher) == \
        f"settings changed: teacher.epochs {cfg.teacher.epochs} → 9.0"
    assert provenance.stale(changed, ingest) is None  # not one of its settings

    make(cfg, "ingest", content="other rows")  # re-made, with other content
    assert provenance.stale(cfg, teacher) == f"{cfg.paths.prepared} has changed since it ran"
    make(cfg, "teacher")
    make(cfg, "ingest", content="other rows")  # re-made, same bytes: teacher stays
    assert provenance.stale(cfg, teacher) is None

    source = cfg.data.source
    with open(source, "a") as handle:
        handle.write("b,neg\n")
    assert provenance.stale(cfg, ingest) == f"{source} changed"


def test_an_interrupted_step_a_missing_output_and_another_version_are_stale(cfg):
    teacher = step_named("teacher")
    make(cfg, "ingest")
    make(cfg, "teacher")
    provenance.started(cfg, teacher, provenance.RunInfo("kdpipe teacher"))
    assert provenance.stale(cfg, teacher).startswith(
        "its last run did not finish (kdpipe teacher at ")
    make(cfg, "teacher")
    record = provenance.records(cfg.paths.root) / "teacher.json"
    doc = json.loads(record.read_text())
    assert doc["inputs"] == {"prepared": provenance.folder_hash(
        cfg.paths.prepared, step_named("teacher").reads["prepared"])}
    assert doc["kdpipe_version"] == __version__ and doc["pipeline_run_id"] == "0123456789abcdef"
    record.write_text(json.dumps({**doc, "kdpipe_version": "0.0.1"}))
    assert provenance.stale(cfg, teacher) == f"made by kdpipe 0.0.1, this is {__version__}"
    record.write_text("{not json")
    assert provenance.stale(cfg, teacher) == "no record of a finished run in this work_dir"
    make(cfg, "teacher")
    for path in cfg.paths.teacher.iterdir():
        path.unlink()
    cfg.paths.teacher.rmdir()
    assert provenance.stale(cfg, teacher) == f"its output {cfg.paths.teacher} is missing"


def test_an_output_replaced_after_its_run_is_stale_and_one_touched_is_not(cfg, monkeypatch):
    """`dvc checkout` (or a run-cache restore in `dvc repro`) puts an earlier run's output
    back and writes no record: the record's settings then describe another model."""
    import os
    import shutil

    teacher = step_named("teacher")
    make(cfg, "ingest")
    make(cfg, "teacher", content="model of run 1")
    kept = cfg.paths.root / "kept"
    shutil.copytree(cfg.paths.teacher, kept)
    make(cfg, "teacher", content="model of run 2")
    shutil.rmtree(cfg.paths.teacher)
    shutil.copytree(kept, cfg.paths.teacher)  # as DVC restores it
    assert provenance.stale(cfg, teacher) == \
        f"its output {cfg.paths.teacher} is not what it made (changed since, e.g. by DVC)"

    make(cfg, "teacher", content="model of run 3")
    hashed = []
    real = provenance.folder_hash
    monkeypatch.setattr(provenance, "folder_hash", lambda p: hashed.append(p) or real(p))
    assert provenance.stale(cfg, teacher) is None and hashed == []  # untouched: no hashing
    out = cfg.paths.teacher / "out.txt"
    os.utime(out, ns=(out.stat().st_atime_ns, out.stat().st_mtime_ns + 10**9))
    assert provenance.stale(cfg, teacher) is None  # same bytes, a new time: hashed, kept
    assert hashed == [cfg.paths.teacher]


def test_a_folder_made_from_a_mix_of_runs_is_refused(cfg):
    for name in ("ingest", "teacher", "soft_labels"):
        make(cfg, name)
    owned = provenance.owning_step(cfg.paths.soft_labels)
    assert owned is not None and owned[1].name == "soft_labels"
    assert provenance.owning_step(cfg.paths.root.parent / "elsewhere") is None
    provenance.check_consistent(cfg.paths, [step_named("soft_labels")], "predict")

    make(cfg, "teacher", content="a new teacher", command="kdpipe teacher")
    with pytest.raises(KdpipeError) as info:
        provenance.check_consistent(cfg.paths, [step_named("soft_labels")], "predict")
    message = str(info.value)
    assert message.startswith(f"predict: {cfg.paths.soft_labels} was made from an earlier "
                              f"{cfg.paths.teacher} (re-made since by `kdpipe teacher` at ")
    assert "mix of runs" in message and "\n" not in message

    make(cfg, "soft_labels")
    # A step that a live process is re-making, and one that a killed process left half-made.
    teacher = step_named("teacher")
    provenance.started(cfg, teacher, provenance.RunInfo("kdpipe run"))
    with pytest.raises(KdpipeError, match="is being re-made now"):
        provenance.check_consistent(cfg.paths, [step_named("soft_labels")], "predict")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    marker = provenance.records(cfg.paths.root) / "teacher.running"
    marker.write_text(json.dumps({"holder": f"{socket.gethostname()} pid {dead.pid}",
                                  "command": "kdpipe run", "since": "today"}))
    with pytest.raises(KdpipeError,
                       match="was left unfinished by a run that failed or was interrupted"):
        provenance.check_consistent(cfg.paths, [step_named("soft_labels")], "predict")


def test_folders_without_records_are_taken_as_they_are(cfg):
    make(cfg, "ingest")
    make(cfg, "teacher")
    provenance.clear(cfg.paths.root)
    assert list(provenance.records(cfg.paths.root).iterdir()) == []
    provenance.check_consistent(cfg.paths, [step_named("teacher")], "predict")
    # Without a record the input's hash is computed from its files.
    assert provenance.current_hash(cfg.paths, "prepared") == \
        provenance.folder_hash(cfg.paths.prepared)


def test_checkpoint_text_reads_where_training_stands(cfg):
    for step, state, text in (("teacher", {"step": 12, "epoch": 1}, "step 12"),
                              ("distill", {"epoch": 1, "step": 40}, "epoch 2 done")):
        folder = cfg.paths.checkpoints / step
        folder.mkdir(parents=True)
        (folder / "state.json").write_text(json.dumps({"state": state}))
        assert provenance.checkpoint_text(cfg.paths, step_named(step)) == text
    assert provenance.checkpoint_text(cfg.paths, step_named("prune")) is None


def test_a_step_is_stale_only_for_the_files_of_a_folder_it_reads(cfg):
    # New unlabeled texts change unlabeled.parquet and the data card only: the teacher, which
    # reads neither, is kept; soft_labels, which reads the texts, is not.
    teacher, soft_labels = step_named("teacher"), step_named("soft_labels")
    make(cfg, "ingest")
    make(cfg, "teacher")
    make(cfg, "soft_labels")
    assert provenance.stale(cfg, teacher) is None and provenance.stale(cfg, soft_labels) is None
    make(cfg, "ingest", content="unlabeled texts", files=("unlabeled.parquet",
                                                          "data_card.json"))
    assert provenance.stale(cfg, teacher) is None
    assert provenance.stale(cfg, soft_labels) == \
        f"{cfg.paths.prepared} has changed since it ran"
    provenance.check_consistent(cfg.paths, [teacher], "kdpipe predict")  # no mix for it
    with pytest.raises(KdpipeError, match="was made from an earlier"):
        provenance.check_consistent(cfg.paths, [soft_labels], "kdpipe predict")
    make(cfg, "ingest", content="new rows", files=("train.parquet",))
    assert provenance.stale(cfg, teacher) == f"{cfg.paths.prepared} has changed since it ran"

