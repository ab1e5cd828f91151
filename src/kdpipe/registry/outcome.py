"""A run's outcome at a glance: what the MLflow parent run shows first.

From the evaluate step's ``metrics.json``, the register step's record and the data card:
a run name that says what it was (``bilstm · sst2 · v3 champion``), a description (MLflow's
note) with the headline (the registered student against the teacher, and what the gate did
and why), the headline metrics under names that line up in MLflow's compare view, and tags
to filter runs by. Pure: the register step logs it (``kdpipe.tracking.annotate``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdpipe.evaluation.report import headline_batch
from kdpipe.registry.gate import gate_table

# Metric names on the parent run: the same for every run, so MLflow's compare view lines
# them up (the step runs keep their own, longer, names).
HEADLINE_METRICS = ("student_accuracy", "teacher_accuracy", "retention",
                    "student_latency_b1_p50_ms", "teacher_latency_b1_p50_ms", "speedup",
                    "student_size_bytes", "teacher_size_bytes", "size_ratio",
                    "registered_version", "promoted")


@dataclass(frozen=True)
class Outcome:
    run_name: str
    note: str
    metrics: dict[str, float]
    tags: dict[str, str]


def dataset_name(data_card: dict[str, Any]) -> str:
    """A short name for the data: the file's or folder's stem, the hub id, or ``demo``."""
    source = data_card.get("source") or {}
    kind = source.get("kind")
    if kind == "demo":
        return "demo"
    if kind == "huggingface":
        return str(source.get("id") or "huggingface").split("/")[-1]
    where = source.get("path") or source.get("uri") or ""
    name = Path(str(where).rstrip("/")).stem if where else "data"
    if kind == "dvc" and source.get("rev"):
        name += f"@{source['rev']}"
    return name or "data"


def status(record: dict[str, Any]) -> str:
    """``champion`` (promoted now or already), ``refused`` (the gate said no),
    ``registered`` (promotion not asked for) or ``not registered``."""
    if record.get("skipped") or "version" not in record:
        return "not registered"
    if record.get("aliases", {}).get("champion") == record["version"]:
        return "champion"
    if record.get("gate") is not None:
        return "refused"
    return "registered"


def outcome(evaluation: dict[str, Any], record: dict[str, Any], data_card: dict[str, Any],
            student_arch: str) -> Outcome:
    dataset = dataset_name(data_card)
    state = status(record)
    version = record.get("version")
    name = " · ".join([student_arch, dataset] + ([f"v{version} {state}"] if version
                                                  else [state]))
    models = evaluation.get("models") or {}
    entry_name = record.get("metrics_source")
    entry = models.get(entry_name) if isinstance(models.get(entry_name), dict) else {}
    reference = models.get(evaluation.get("reference") or "teacher") or {}
    key = record.get("metrics") or {}
    batch = headline_batch(evaluation) if evaluation.get("latency") else "b1"
    vs = entry.get("vs_teacher") or {}
    metrics = {
        "student_accuracy": key.get("accuracy"),
        "teacher_accuracy": key.get("teacher_accuracy"),
        "retention": key.get("retention"),
        "student_latency_b1_p50_ms": key.get("latency_b1_p50_ms"),
        "teacher_latency_b1_p50_ms": _p50(reference, "b1"),
        "speedup": vs.get(f"speedup_{batch}_p50"),
        "student_size_bytes": key.get("size_bytes"),
        "teacher_size_bytes": reference.get("size_bytes"),
        "size_ratio": vs.get("size"),
        "registered_version": version,
        "promoted": 1.0 if record.get("promoted") else 0.0 if version else None,
    }
    metrics = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    tags = {"kdpipe.outcome": state.replace(" ", "_"), "kdpipe.student": student_arch,
            "kdpipe.dataset": dataset,
            "kdpipe.data_hash": str(data_card.get("content_hash", "unknown"))[:16]}
    if version:
        tags["kdpipe.registered"] = f"{record.get('name')}/{version}"
    note = _note(name, state, record, metrics, batch, evaluation, data_card, entry_name)
    return Outcome(name, note, metrics, tags)


def _p50(entry: dict[str, Any], batch: str) -> float | None:
    return ((entry.get("latency_ms") or {}).get(batch) or {}).get("p50")


def _note(name: str, state: str, record: dict[str, Any], m: dict[str, float], batch: str,
          evaluation: dict[str, Any], data_card: dict[str, Any], entry_name: str | None) -> str:
    version = record.get("version")
    lines = [f"## {name}", ""]
    if state == "champion":
        before = record.get("champion_before")
        was = f" (was v{before})" if before and before != version else ""
        gate = record.get("gate") or {}
        how = ("promoted past the gate by force" if record.get("forced")
               else "the gate passed every check" if gate.get("passed")
               else record.get("summary", ""))
        lines.append(f"**v{version} is the champion{was}**: {how}")
    elif state == "refused":
        lines.append(f"**v{version} was not promoted**: {record.get('summary', '')}")
    elif state == "registered":
        lines.append(f"**v{version} registered**, not promoted: {record.get('summary', '')}")
    else:
        lines.append(f"**Not registered**: {record.get('skipped', 'no registration record')}")
    lines += ["", "| | student | teacher | student / teacher |", "| --- | ---: | ---: | ---: |",
              _row("accuracy", _share(m.get("student_accuracy")),
                   _share(m.get("teacher_accuracy")),
                   _percent(m.get("retention"), " retention")),
              _row("latency, batch 1, p50", _ms(m.get("student_latency_b1_p50_ms")),
                   _ms(m.get("teacher_latency_b1_p50_ms")),
                   _times(m.get("speedup"), f" faster ({batch})")),
              _row("size", _mb(m.get("student_size_bytes")), _mb(m.get("teacher_size_bytes")),
                   _fraction(m.get("size_ratio")))]
    gate = record.get("gate")
    if gate:
        lines += ["", gate_table(gate["checks"])]
    rows = evaluation.get("rows")
    lines += ["", f"Measured on {rows:,} {evaluation.get('split', '?')} rows"
              if isinstance(rows, int) else "", ""]
    facts = [f"student entry `{entry_name}`" if entry_name else None,
             f"data `{str(data_card.get('content_hash', 'unknown'))[:12]}`",
             f"model `{record.get('model_uri')}`" if version else None]
    lines.append(" · ".join(f for f in facts if f))
    lines += ["", "Artifacts: `comparison.md` (every model side by side), the plots, "
              "`model_card.md`; each step's details are in its child run."]
    return "\n".join(line for line in lines if line is not None) + "\n"


def _row(*cells: str) -> str:
    return "| " + " | ".join(cells) + " |"


def _share(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def _percent(value: float | None, suffix: str = "") -> str:
    return "–" if value is None else f"{value:.1%}{suffix}"


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.3g} ms"


def _mb(value: float | None) -> str:
    return "–" if value is None else f"{value / 1e6:.2f} MB"


def _times(value: float | None, suffix: str = "") -> str:
    return "–" if value is None else f"{value:.1f}x{suffix}"


def _fraction(value: float | None) -> str:
    return "–" if not value else f"1/{1 / value:.0f}"
