"""The work_dir lock: one writer at a time, a dead holder's lock taken over."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from kdpipe.errors import KdpipeError
from kdpipe.work_lock import LOCK_NAME, work_dir_lock


def test_a_held_work_dir_is_refused_naming_its_holder_and_released_after(tmp_path):
    lock = tmp_path / LOCK_NAME
    with work_dir_lock(tmp_path, "kdpipe run"):
        held = json.loads(lock.read_text())
        assert held["holder"] == f"{socket.gethostname()} pid {os.getpid()}"
        with pytest.raises(KdpipeError) as info:
            with work_dir_lock(tmp_path, "kdpipe distill"):
                pass
        message = str(info.value)
        assert message.startswith(f"work_dir {tmp_path} is in use by `kdpipe run` "
                                  f"({socket.gethostname()} pid {os.getpid()}, since ")
        assert "-S work_dir=PATH" in message and "\n" not in message
    assert not lock.exists()


def test_a_lock_whose_holder_ended_is_taken_over_another_hosts_is_not(tmp_path, capsys):
    lock = tmp_path / LOCK_NAME
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(json.dumps({"holder": f"{socket.gethostname()} pid {dead.pid}",
                                "command": "kdpipe run", "since": "earlier"}))
    with work_dir_lock(tmp_path, "kdpipe run"):
        assert f"pid {os.getpid()}" in lock.read_text()
    assert f"taking over {lock} from" in capsys.readouterr().err
    assert not lock.exists()

    lock.write_text(json.dumps({"holder": "another-host pid 1", "command": "kdpipe run",
                                "since": "earlier"}))
    with pytest.raises(KdpipeError, match=r"in use by `kdpipe run` \(another-host pid 1"):
        with work_dir_lock(tmp_path, "kdpipe run"):
            pass
    assert lock.exists()  # not ours to remove
