"""What every step returns (``kdpipe.steps``), and what the adapters track and print."""

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
