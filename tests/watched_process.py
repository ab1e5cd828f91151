"""A command run in the background while a test watches its output: the tests that signal,
kill or race real ``kdpipe`` processes act when a line or a file appears."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path


class WatchedProcess:
    """``cmd`` as a process of its own, its output collected line by line as it comes (a
    reader thread, so the pipe never fills). ``stderr_only`` collects stderr alone (stdout
    goes nowhere), for tests that look at kdpipe's last stderr line; otherwise both streams
    are collected together. ``new_session`` puts it in a process group of its own, so a test
    can kill the group."""

    def __init__(self, cmd: list[str], cwd: Path, env: dict[str, str], *,
                 stderr_only: bool = False, new_session: bool = False) -> None:
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            cmd, cwd=cwd, env=env, text=True, start_new_session=new_session,
            stdout=subprocess.DEVNULL if stderr_only else subprocess.PIPE,
            stderr=subprocess.PIPE if stderr_only else subprocess.STDOUT)
        stream = self.process.stderr if stderr_only else self.process.stdout
        self._reader = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._reader.start()

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, what: str | Callable[[], bool], limit_s: float = 300) -> None:
        """Until a line contains ``what`` (a string) or ``what()`` is true; fails if the
        process ends first or ``limit_s`` passes."""
        done = (lambda: any(what in line for line in self.lines)) if isinstance(what, str) \
            else what
        deadline = time.monotonic() + limit_s
        while not done():
            assert self.process.poll() is None, f"ended before {what!r}:\n{self.output}"
            assert time.monotonic() < deadline, f"no {what!r} in {limit_s} s:\n{self.output}"
            time.sleep(0.05)

    def finish(self, limit_s: float = 600) -> int:
        """Its exit code, once it ends and all its output is read."""
        code = self.process.wait(timeout=limit_s)
        self._reader.join(timeout=10)
        return code

    @property
    def output(self) -> str:
        return "\n".join(self.lines)
