"""One kdpipe process writes into a work_dir at a time.

Two ``kdpipe run`` on one work_dir would replace each other's step outputs and leave a mix
no record can explain. The first takes ``<work_dir>/.kdpipe.lock``, a file holding its host,
process ID and command; the second stops at once with one line naming them. A lock whose
holder was a process of this host that has ended (SIGKILL, a crash) is taken over; one held
from another host (a shared file system) is only reported: this host cannot tell whether
that process lives.

Written by hand: ``filelock`` and ``fcntl`` locks vanish with their process, which is what
is wanted, but say nothing about who holds them, and advisory locks are not reliable on the
network file systems work_dirs often live on; ``O_CREAT | O_EXCL`` is atomic on all of them.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from kdpipe import owner
from kdpipe.atomic import read_json
from kdpipe.errors import KdpipeError

LOCK_NAME = ".kdpipe.lock"


def _holder(path: Path) -> dict[str, str] | None:
    # Being written, or damaged: held by an unknown owner ({}).
    return read_json(path, None, {})


@contextlib.contextmanager
def work_dir_lock(work_dir: Path, command: str) -> Iterator[None]:
    """Hold ``work_dir``'s lock for the block, or raise ``KdpipeError`` naming its holder."""
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    path = work_dir / LOCK_NAME
    me = {"holder": owner.me(), "command": command,
          "since": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())}
    for _ in range(3):  # another process may take over the same stale lock meanwhile
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            held = _holder(path)
            if held is None:
                continue  # released meanwhile
            if held and owner.gone(held.get("holder", "")):
                print(f"kdpipe: taking over {path} from {held['holder']}, which has ended",
                      file=sys.stderr)
                path.unlink(missing_ok=True)
                continue
            who = held.get("holder", "an unknown process")
            raise KdpipeError(
                f"work_dir {work_dir} is in use by `{held.get('command', 'kdpipe')}` "
                f"({who}, since {held.get('since', '?')}); wait for it to end, or use "
                f"another: -S work_dir=PATH (if no such process runs, delete {path})"
            ) from None
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(me, handle)
        break
    else:
        raise KdpipeError(f"{path}: could not take the work_dir lock; try again")
    try:
        yield
    finally:
        if (_holder(path) or {}).get("holder") == me["holder"]:
            path.unlink(missing_ok=True)
