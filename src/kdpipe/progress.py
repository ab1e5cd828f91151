"""Progress bars for long loops, on stderr so stdout stays clean for tables and YAML.

On a terminal this is a live rich bar. Elsewhere (a log file, CI, a Kubeflow pod) a live
bar shows nothing until the end, so a plain status line is printed every ``LOG_SECONDS``.
"""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

LOG_SECONDS = 30.0


class _LoggedProgress(Progress):
    """A ``Progress`` that draws nothing live and logs one line per task now and then."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, disable=True, **kwargs)
        self._last_log = time.monotonic()

    def update(self, task_id: TaskID, **kwargs: Any) -> None:
        super().update(task_id, **kwargs)
        self._maybe_log()

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._maybe_log()

    def _maybe_log(self) -> None:
        now = time.monotonic()
        if now - self._last_log < LOG_SECONDS:
            return
        self._last_log = now
        for task in self.tasks:
            # Not ``task.finished``: rich never clears it, so a task reset for the next epoch
            # (completed=0, a new total) would stay silent for the rest of the run.
            if not task.total or task.completed >= task.total:
                continue
            fields = "".join(f", {k} {v:.4g}" for k, v in task.fields.items()
                             if isinstance(v, float))
            self.console.print(
                f"{task.description}: {task.completed:,.0f}/{task.total:,.0f} "
                f"({task.percentage:.0f}%), {task.elapsed or 0:.0f} s elapsed{fields}",
                highlight=False, soft_wrap=True)


def progress_bar(*extra_columns: Any) -> Progress:
    """A rich ``Progress`` (use as a context manager) with bar, count, elapsed and ETA."""
    console = Console(stderr=True)
    kind = Progress if console.is_terminal else _LoggedProgress
    return kind(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TimeRemainingColumn(), *extra_columns, console=console)
