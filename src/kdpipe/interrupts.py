"""SIGTERM and SIGHUP handled like Ctrl-C.

``timeout``, CI cancellation, ``docker stop`` and ``kubectl delete pod`` send SIGTERM; a
closed terminal sends SIGHUP. Python's default for both is to die on the spot: no ``finally``
runs, so MLflow runs stay RUNNING and temporary folders stay behind. Inside
``as_interrupts()`` each of them (and SIGINT) raises ``Interrupted``, a ``KeyboardInterrupt``,
in the main thread: everything that already cleans up after Ctrl-C (atomic writes, the
training checkpoints, the MLflow runs, which end KILLED) does so for them too. SIGTERM and
SIGHUP are passed on to child processes, which would otherwise run on.

``deferred()`` holds signals back for a few lines that must not be cut in two (swapping an
output folder into place); they are delivered when the block ends.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(KeyboardInterrupt):
    """A signal asked the process to stop; ``exit_code`` is the shell's 128 + its number."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.name = signal.Signals(signum).name
        super().__init__(self.name)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def as_interrupts() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP raise ``Interrupted`` inside the block (main thread only;
    elsewhere the block runs unchanged). A second SIGTERM or SIGHUP while the first one's
    clean-up runs is ignored; a second Ctrl-C gets Python's default (stop now)."""
    if not _in_main_thread():
        yield
        return
    received: list[int] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        if received:  # cleaning up after the first one: let it finish
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        received.append(signum)
        if signum != signal.SIGINT:
            _forward_to_children(signum)
        raise Interrupted(signum)

    previous = {sig: signal.signal(sig, handler) for sig in HANDLED}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _children() -> list[int]:
    """This process's child processes (Linux's /proc; none found elsewhere)."""
    me = str(os.getpid())
    found = []
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            # "pid (command) state ppid ...": the command may hold spaces and parentheses.
            fields = entry.read_text().rpartition(")")[2].split()
        except OSError:
            continue  # ended meanwhile
        if len(fields) > 1 and fields[1] == me:
            found.append(int(entry.parent.name))
    return found


def _forward_to_children(signum: int) -> None:
    """Pass SIGTERM or SIGHUP on to child processes (a kfp.local task, the MLflow server
    started for kfp-docker): ``subprocess.Popen`` waits for its child when an exception
    leaves its block, so an unsignalled task would hold the stop until it ended. Ctrl-C is
    not forwarded: a terminal sends SIGINT to the whole foreground process group already."""
    for pid in _children():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signum)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """The handled signals are held back inside the block and delivered after it."""
    if not _in_main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
