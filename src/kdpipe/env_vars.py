"""Environment variables set for a block and put back afterwards (kfp.local's task
subprocesses, MLflow's retry settings for a probe)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


def restore(saved: dict[str, str | None]) -> None:
    """Put back the values ``saved`` recorded (None: the variable was unset)."""
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@contextlib.contextmanager
def environ(values: dict[str, str]) -> Iterator[None]:
    """``values`` set in os.environ for the block, the previous ones restored afterwards."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        restore(saved)
