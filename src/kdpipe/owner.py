"""Who holds a lock: a host and a process ID, written so another process can tell whether
that holder still lives.

Used by the promotion lock in the registry and the ``work_dir`` lock of ``kdpipe run``. A
holder on this host whose process is gone (killed with SIGKILL, its pod's container ended)
is dead at once; one on another host cannot be checked from here, so only its age can
retire it.
"""

from __future__ import annotations

import os
import re
import socket

_HOLDER = re.compile(r"(?P<host>\S+) pid (?P<pid>\d+)")


def me() -> str:
    """This process, as a holder string: ``<host> pid <pid>``."""
    return f"{socket.gethostname()} pid {os.getpid()}"


def alive(pid: int) -> bool:
    """Whether a process with this ID exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def gone(holder: str) -> bool:
    """True when ``holder`` (as ``me()`` wrote it) is a process of this host that has ended;
    False when it lives, is another host's, or cannot be read."""
    found = _HOLDER.search(holder or "")
    if not found or found["host"] != socket.gethostname():
        return False
    pid = int(found["pid"])
    return pid != os.getpid() and not alive(pid)
