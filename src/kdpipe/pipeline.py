"""The steps in order, wired to their paths under work_dir, for ``kdpipe run`` and the CLI.

dvc.yaml declares the same stages and paths (a test checks they agree); the KFP DAG maps
them onto artifacts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kdpipe.config import Config
from kdpipe.steps import StepResult


@dataclass(frozen=True)
class Step:
    name: str
    help: str
    call: Callable[[Config], StepResult]


def _ingest(cfg: Config) -> StepResult:
    from kdpipe.steps import ingest

    return ingest.run(cfg, cfg.paths.prepared)


STEPS: tuple[Step, ...] = (
    Step("ingest", "Read, check and split the data; write Parquet splits and a data card.",
         _ingest),
)


def step_named(name: str) -> Step:
    return next(step for step in STEPS if step.name == name)
