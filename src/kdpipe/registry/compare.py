"""Registered candidates side by side (``kdpipe compare``): the key metrics, the gate's
verdict and what each was made from, one column per version.

A reference is a version number (``3`` or ``v3``), an alias (``champion``,
``challenger``), or the id of the MLflow run that registered it (its register step's run
or the pipeline's parent run).
"""

from __future__ import annotations

import datetime as dt
import re

from kdpipe.errors import KdpipeError
from kdpipe.registry.gate import KeyMetrics
from kdpipe.registry.store import TAG_PREFIX, Registry, Version
from kdpipe.tracking import redact

_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def resolve(registry: Registry, name: str, ref: str) -> Version:
    """The version of ``name`` that ``ref`` names (see the module docstring)."""
    text = ref.strip()
    number = text[1:] if text[:1] in "vV" else text
    if number.isdigit():
        return registry.version(name, int(number))
    aliases = registry.aliases(name)
    if text in aliases:
        return registry.version(name, aliases[text])
    if _RUN_ID.match(text):
        versions = registry.versions(name)
        for version in versions:
            if version.run_id == text:
                return version
        from mlflow.exceptions import MlflowException

        try:
            tags = registry.client.get_run(text).data.tags
        except MlflowException:
            raise KdpipeError(f"run {text}: not found in {redact(registry.uri)}") from None
        registered = tags.get(f"{TAG_PREFIX}registered")
        if registered and registered.startswith(f"{name}/"):
            return registry.version(name, int(registered.rsplit("/", 1)[1]))
        raise KdpipeError(f"run {text} registered no version of {name!r}")
    known = ", ".join(sorted(aliases)) or "none"
    raise KdpipeError(f"{ref!r}: not a version number, alias ({known}) or run id of {name!r}")


def rows(versions: list[Version]) -> list[tuple[str, list[str]]]:
    """(label, one value per version) for each line of the comparison."""
    metrics = [v.metrics for v in versions]

    def of(get, fmt) -> list[str]:
        return ["–" if get(m) is None else fmt(get(m)) for m in metrics]

    best = _best(metrics)
    return [
        ("aliases", [",".join(v.aliases) or "–" for v in versions]),
        ("accuracy", [a + (" *" if i == best else "") for i, a in
                          enumerate(of(lambda m: m.accuracy, "{:.2%}".format))]),
        ("macro F1", of(lambda m: m.macro_f1, "{:.4f}".format)),
        ("teacher accuracy", of(lambda m: m.teacher_accuracy, "{:.2%}".format)),
        ("retention", of(lambda m: m.retention, "{:.2%}".format)),
        ("p50 b1 ms", of(lambda m: m.latency_b1_p50_ms, "{:.3g}".format)),
        ("size MB", of(lambda m: m.size_bytes, lambda b: f"{b / 1e6:.2f}")),
        ("gate", [v.tags.get(f"{TAG_PREFIX}gate", "–") for v in versions]),
        ("student", [v.tags.get(f"{TAG_PREFIX}student_arch", "–") for v in versions]),
        ("data hash", [v.tags.get(f"{TAG_PREFIX}data_hash", "–")[:12] for v in versions]),
        ("params hash", [v.tags.get(f"{TAG_PREFIX}params_hash", "–")[:12]
                             for v in versions]),
        ("created", [dt.datetime.fromtimestamp(v.created_ms / 1000).strftime("%Y-%m-%d")
                         for v in versions]),
    ]


def _best(metrics: list[KeyMetrics]) -> int | None:
    scored = [(m.accuracy, i) for i, m in enumerate(metrics) if m.accuracy is not None]
    return max(scored)[1] if len(scored) > 1 else None
