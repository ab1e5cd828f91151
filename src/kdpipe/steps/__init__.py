"""One module per pipeline step, each with ``run(cfg, ..., out_dir) -> StepResult``.

Steps read paths and write into ``out_dir``; they import neither kfp nor dvc nor mlflow.
The CLI, dvc.yaml and the KFP components are thin adapters around them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class StepResult:
    """What a step reports back: numbers to track, files to attach, a line for humans."""

    step: str
    out_dir: Path
    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: list[Path] = field(default_factory=list)
    summary: str = ""
