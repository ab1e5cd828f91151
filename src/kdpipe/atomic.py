"""Write outputs so that an interrupted step leaves either the old output or the new one.

Everything goes to a temporary sibling first and is renamed into place: a rename within one
file system is atomic, so no reader (DVC, a later step, a rerun) ever sees half a file.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kdpipe.interrupts import deferred
from kdpipe.owner import alive


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it replaces ``target`` whole.

    On an exception the temporary folder is removed and ``target`` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep(target)
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(target), dir=target.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it owner-only; outputs are shared
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_tree(tmp)
    old = None
    with deferred():  # a SIGTERM between the two renames would leave no target at all
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
        os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(target: Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[Any]:
    """Open a temporary sibling of ``target`` for writing; rename it into place on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep(target)
    fd, name = tempfile.mkstemp(prefix=_prefix(target), dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        with open(tmp, mode, encoding=None if "b" in mode else encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(target: Path, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_file(target) as handle:
        json.dump(data, handle, indent=2, ensure_ascii=False)
        handle.write("\n")


def read_json(path: Path, missing: Any = None, damaged: Any = None) -> Any:
    """The JSON document at ``path``: ``missing`` when there is no file, ``damaged`` when it
    cannot be read or parsed. For kdpipe's own bookkeeping (provenance records, locks), where
    a file left half-written by a killed process counts as no record rather than an error."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return missing
    except (OSError, ValueError):
        return damaged


def _prefix(target: Path) -> str:
    # The writer's pid in the name tells a killed writer's leftovers from a live one's.
    return f".{target.name}.tmp-{os.getpid()}-"


def sweep(target: Path) -> None:
    """Remove what writers of ``target`` that were killed (SIGKILL, power loss) left beside
    it: temporary folders/files and a previous version set aside, when their process is gone."""
    for leftover in target.parent.glob(f".{glob.escape(target.name)}.*"):
        kind, _, rest = leftover.name[len(target.name) + 2:].partition("-")
        pid = rest.split("-", 1)[0]
        if kind not in ("tmp", "old") or not pid.isdigit() or alive(int(pid)):
            continue
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def _fsync_tree(root: Path) -> None:
    # Flush file contents before the rename publishes them, so a crash cannot leave a
    # renamed folder holding empty files.
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
