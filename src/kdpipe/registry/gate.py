"""The promotion gate: may a candidate become ``champion``? (TFX's evaluator "blessing".)

``decide`` is a pure function of the candidate's key metrics, the thresholds in
``registry.gate`` and, when there is a champion, both models' accuracy measured on the same
rows. It returns every check with its value, threshold and reason, passed or not, so a
refusal always says why. Measuring is the caller's job (``kdpipe.registry.promotion``).

Checks, in order:

- ``min_accuracy``: candidate accuracy on the evaluate split >= the minimum;
- ``min_teacher_retention``: candidate accuracy / teacher accuracy >= the minimum;
- ``max_latency_p50_ms``: batch-1 p50 latency (tokenization included) <= the limit;
- ``max_size_bytes``: model folder bytes <= the limit;
- ``max_regression``: candidate accuracy >= champion accuracy - max_regression, both measured
  now on the same rows; passes when there is no champion yet.

A threshold that is not set (null, or a minimum of 0) passes whatever the value; a value
that was not measured fails a threshold that is set, since it cannot be shown to hold.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from kdpipe.config import GateConfig

# Accuracies are shares of the same rows; this only absorbs float rounding in a - b.
_EPS = 1e-9


@dataclass(frozen=True)
class KeyMetrics:
    """What a registered version records about its model (as tags) and the gate reads.
    Accuracies are shares in [0, 1] on the evaluate split; None where not measured."""

    accuracy: float | None = None
    macro_f1: float | None = None
    teacher_accuracy: float | None = None
    latency_b1_p50_ms: float | None = None
    size_bytes: int | None = None

    @property
    def retention(self) -> float | None:
        """Candidate accuracy / teacher accuracy (None when either is unknown or zero)."""
        if self.accuracy is None or not self.teacher_accuracy:
            return None
        return self.accuracy / self.teacher_accuracy

    def to_dict(self) -> dict[str, float | int | None]:
        return {**asdict(self), "retention": self.retention}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> KeyMetrics:
        """From ``to_dict`` output or string tags; missing or unreadable values are None."""
        values: dict[str, Any] = {}
        for field in fields(cls):
            number = _number(data.get(field.name))
            if field.name == "size_bytes" and number is not None:
                number = int(number)
            values[field.name] = number
        return cls(**values)


@dataclass(frozen=True)
class ChampionComparison:
    """The candidate and the champion, each measured with ``Predictor`` on the same ``rows``
    of ``split``; an accuracy is None (and ``problem`` says why) when it could not be."""

    champion_version: int
    split: str
    rows: int
    candidate_accuracy: float | None
    champion_accuracy: float | None
    problem: str = ""


@dataclass(frozen=True)
class Check:
    name: str
    value: float | None
    threshold: float | None
    passed: bool
    message: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Decision:
    """Every check; ``promote`` when all passed, or when ``forced``."""

    checks: tuple[Check, ...]
    forced: bool = False

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    @property
    def promote(self) -> bool:
        return self.passed or self.forced

    @property
    def failures(self) -> tuple[Check, ...]:
        return tuple(check for check in self.checks if not check.passed)

    def why_not(self) -> str:
        """The failed checks' messages, joined; empty when every check passed."""
        return "; ".join(check.message for check in self.failures)

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "forced": self.forced, "promote": self.promote,
                "checks": [check.to_dict() for check in self.checks]}


def unguarded(gate: GateConfig) -> str | None:
    """A warning line when the gate checks no quality at all (both accuracy minimums off),
    so that it would pass any model; None otherwise."""
    if gate.min_accuracy or gate.min_teacher_retention:
        return None
    return ("warning: the promotion gate checks no quality (registry.gate.min_accuracy and "
            "min_teacher_retention are 0): any model that runs passes it")


def decide(candidate: KeyMetrics, gate: GateConfig, comparison: ChampionComparison | None,
           force: bool = False) -> Decision:
    """Run every check (see the module docstring); ``comparison`` is None when there is no
    champion. ``force`` promotes whatever the checks say, and the decision records it."""
    checks = (
        _at_least("min_accuracy", "accuracy", candidate.accuracy, gate.min_accuracy, _percent),
        _at_least("min_teacher_retention", "teacher retention", candidate.retention,
                  gate.min_teacher_retention, _percent),
        _at_most("max_latency_p50_ms", "batch-1 p50 latency", candidate.latency_b1_p50_ms,
                 gate.max_latency_p50_ms, lambda v: f"{v:.3g} ms"),
        _at_most("max_size_bytes", "size", candidate.size_bytes, gate.max_size_bytes, _bytes),
        _regression(comparison, gate.max_regression),
    )
    return Decision(checks, forced=force)


def _at_least(name: str, label: str, value: float | None, minimum: float,
              show: Any) -> Check:
    if value is None:
        passed = minimum <= 0
        return Check(name, None, minimum, passed,
                     f"{label} not measured" + ("; no minimum set" if passed else
                                                f", so minimum {show(minimum)} not shown"))
    passed = value >= minimum - _EPS
    relation = ">=" if passed else "<"
    return Check(name, value, minimum, passed,
                 f"{label} {show(value)} {relation} minimum {show(minimum)}")


def _at_most(name: str, label: str, value: float | None, limit: float | None,
             show: Any) -> Check:
    if limit is None:
        shown = "not measured" if value is None else show(value)
        return Check(name, value, None, True, f"{label} {shown}; no limit set")
    if value is None:
        return Check(name, None, limit, False,
                     f"{label} not measured, so limit {show(limit)} not shown")
    passed = value <= limit + _EPS
    relation = "<=" if passed else ">"
    return Check(name, value, limit, passed, f"{label} {show(value)} {relation} limit "
                 f"{show(limit)}")


def _regression(comparison: ChampionComparison | None, max_regression: float) -> Check:
    name = "max_regression"
    if comparison is None:
        return Check(name, None, -max_regression, True, "no champion yet")
    c = comparison
    if c.candidate_accuracy is None or c.champion_accuracy is None:
        return Check(name, None, -max_regression, False,
                     f"accuracy against champion v{c.champion_version} not measured: "
                     f"{c.problem or 'unknown reason'}")
    delta = c.candidate_accuracy - c.champion_accuracy
    passed = delta >= -max_regression - _EPS
    verdict = "within" if passed else "worse than"
    return Check(name, delta, -max_regression, passed,
                 f"accuracy {_percent(c.candidate_accuracy)} vs champion "
                 f"v{c.champion_version} {_percent(c.champion_accuracy)} on the same "
                 f"{c.rows} {c.split} rows: {100 * delta:+.2f} points, {verdict} the "
                 f"-{100 * max_regression:.2f} allowed")


def _number(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _percent(value: float) -> str:
    return f"{100 * value:.2f}%"


def _bytes(value: float) -> str:
    return f"{value / 1e6:.2f} MB" if value >= 1e5 else f"{int(value):,} bytes"


def gate_table(checks: list[dict[str, Any]]) -> str:
    """The checks (``Decision.to_dict()["checks"]``, as register.json keeps them) as a
    markdown table: value, limit, result."""
    rows = ["| gate check | value | limit | result |", "| --- | ---: | ---: | --- |"]
    for check in checks:
        name = check.get("name", "?")
        result = ("pass" if check.get("passed") else "**FAIL**") + (
            f": {check.get('message')}" if check.get("message") and (
                not check.get("passed") or check.get("value") is None) else "")
        cells = (name, value_text(name, check.get("value")),
                 limit_text(name, check.get("threshold")), result)
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def value_text(name: str, value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "–"
    if name == "max_size_bytes":
        return _bytes(value)
    if name == "max_latency_p50_ms":
        return f"{value:.3g} ms"
    if name == "max_regression":
        return f"{value * 100:+.2f} points"
    return f"{value:.2%}"


def limit_text(name: str, threshold: Any) -> str:
    if threshold is None or (name.startswith("min_") and not threshold):
        return "off"
    if name == "max_regression":
        return f"{threshold * 100:+.2f} points"
    return value_text(name, threshold).replace("+", "")
