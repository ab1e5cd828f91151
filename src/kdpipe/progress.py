"""Progress bars for long loops, on stderr so stdout stays clean for tables and YAML."""

from __future__ import annotations

from typing import Any


def progress_bar(*extra_columns: Any) -> Any:
    """A rich ``Progress`` (use as a context manager) with bar, count, elapsed and ETA.

    rich hides it when stderr is not a terminal, so logs and CI stay readable.
    """
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), *extra_columns,
                    console=Console(stderr=True))
