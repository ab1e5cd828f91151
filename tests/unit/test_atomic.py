import os
import stat

import pytest

from kdpipe.atomic import atomic_dir, atomic_file, read_json, write_json


def test_atomic_dir_replaces_the_target_whole_on_success(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    with atomic_dir(target) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_dir_keeps_the_old_target_when_the_body_fails(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "half.txt").write_text("partial")
        raise RuntimeError("interrupted")
    assert (target / "keep.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_outputs_get_normal_permissions_not_owner_only(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "x").write_text("1")
        write_json(tmp_path / "f.json", {"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "f.json").stat().st_mode) == 0o644


def test_atomic_file_leaves_nothing_when_writing_fails(tmp_path):
    target = tmp_path / "a.json"
    target.write_text("before")
    with pytest.raises(ValueError), atomic_file(target) as handle:
        handle.write("half")
        raise ValueError("boom")
    assert target.read_text() == "before"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_leftovers_of_a_killed_writer_are_swept_but_a_live_writers_are_kept(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (tmp_path / f".out.tmp-{dead}-abc").mkdir()          # a folder being written when killed
    (tmp_path / f".out.old-{dead}").mkdir()              # the previous version set aside
    (tmp_path / f".out.tmp-{dead}-x1").write_text("half")  # an atomic_file's temp file
    live = tmp_path / f".out.tmp-{os.getpid()}-live"     # another writer, still running
    live.mkdir()
    (tmp_path / ".outer.tmp-1-x").mkdir()                # a different target's: not ours
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "f").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [".outer.tmp-1-x", live.name, "out"])


def test_read_json_tells_a_missing_file_from_a_damaged_one(tmp_path):
    path = tmp_path / "record.json"
    assert read_json(path, "missing", "damaged") == "missing"
    path.write_text('{"half": ', encoding="utf-8")  # what a killed writer could leave
    assert read_json(path, "missing", "damaged") == "damaged"
    write_json(path, {"whole": 1})
    assert read_json(path, "missing", "damaged") == {"whole": 1}
