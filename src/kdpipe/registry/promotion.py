"""Moving ``champion``: through the gate, or forced; and listing what is registered.

``promote(cfg, version)`` runs ``kdpipe.registry.gate.decide`` on the version's key-metric
tags and, when there is a champion, on both models' accuracy measured now, with the same
``Predictor`` code, on the same rows (the first ``evaluate.max_rows`` of the prepared
``evaluate.split``): numbers from two different evaluations are never compared. Rolling back
is promoting an older version. ``force`` moves the alias whatever the gate says and tags the
version ``kdpipe.forced_promotion=true`` with who and when.
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kdpipe.config import Config
from kdpipe.errors import KdpipeError
from kdpipe.registry.gate import ChampionComparison, Check, Decision, decide
from kdpipe.registry.store import (
    CHALLENGER,
    CHAMPION,
    READY,
    TAG_PREFIX,
    Registry,
    Version,
    open_registry,
)

# A registered-model tag: the champion before the latest promotion (or rollback).
PREVIOUS_CHAMPION = f"{TAG_PREFIX}previous_champion"
# A version tag: the gate's checks as JSON, the last time it ran on that version.
GATE_CHECKS = f"{TAG_PREFIX}gate_checks"
# A version tag: the champion its promotion replaced ("-" for none).
CHAMPION_BEFORE = f"{TAG_PREFIX}champion_before"


@dataclass(frozen=True)
class Promotion:
    """What ``promote`` did. ``decision`` is None when there was nothing to decide (the
    version already is the champion, or promotion was not asked for)."""

    name: str
    version: int
    decision: Decision | None
    promoted: bool
    champion_before: int | None
    champion_after: int | None
    note: str = ""

    def summary(self) -> str:
        """One line: what happened and, for a refusal, why."""
        if self.note:
            return self.note
        assert self.decision is not None
        if self.promoted and self.decision.forced and not self.decision.passed:
            return (f"v{self.version} FORCED to champion past the gate "
                    f"({self.decision.why_not()})")
        if self.promoted:
            before = f" (was v{self.champion_before})" if self.champion_before else ""
            forced = "; forced, though the gate passed" if self.decision.forced else ""
            return f"v{self.version} promoted to champion{before}{forced}"
        kept = (f"champion stays v{self.champion_before}" if self.champion_before
                else "no champion")
        return f"v{self.version} not promoted, {kept}: {self.decision.why_not()}"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "promoted": self.promoted,
                "forced": bool(self.decision and self.decision.forced and self.promoted),
                "champion_before": self.champion_before, "champion_after": self.champion_after,
                "gate": self.decision.to_dict() if self.decision else None,
                "summary": self.summary()}


def promote(cfg: Config, version: int | None = None, force: bool = False,
            prepared_dir: Path | None = None, dry_run: bool = False,
            completing: bool = False) -> Promotion:
    """Make ``version`` (default: the one aliased ``challenger``) of ``registry.model_name``
    the champion if the gate passes, or if ``force``. ``prepared_dir`` (default
    ``cfg.paths.prepared``) holds the rows both models are measured on. ``dry_run``: decide
    and say what would happen, moving and tagging nothing. ``completing``: the caller is
    finishing an interrupted registration of ``version``; if that attempt already promoted
    it, its recorded promotion is returned, so the rerun reports what an uninterrupted run
    would have."""
    registry = open_registry(cfg)
    name = cfg.registry.model_name
    # Read the champion, decide and move the alias under one lock: two runs promoting at
    # once would otherwise both compare against the same (or no) champion, and the later
    # alias write would win unchecked.
    with registry.locked(name, waiting=lambda line: print(line, file=sys.stderr, flush=True)):
        return _promote(cfg, registry, name, version, force, prepared_dir, dry_run,
                        completing)


def _promote(cfg: Config, registry: Registry, name: str, version: int | None, force: bool,
             prepared_dir: Path | None, dry_run: bool, completing: bool) -> Promotion:
    aliases = registry.aliases(name)
    if version is None:
        version = aliases.get(CHALLENGER)
        if version is None:
            raise KdpipeError(f"registered model {name!r} has no {CHALLENGER!r} alias; "
                              "pass --version N (see `kdpipe models`)")
    candidate = registry.version(name, version)
    if candidate.status != READY:
        raise KdpipeError(f"version {version} of {name!r} is {candidate.status}, not {READY}; "
                          "an alias may only point at a completely registered version")
    champion = aliases.get(CHAMPION)
    if champion == version:
        recorded = _recorded_promotion(candidate) if completing else None
        if recorded is not None:
            return recorded
        return Promotion(name, version, None, False, champion, champion,
                         note=f"v{version} already is the champion")
    comparison = None
    if champion is not None:
        comparison = compare_with_champion(cfg, registry, candidate, champion,
                                           Path(prepared_dir or cfg.paths.prepared), force)
    decision = decide(candidate.metrics, cfg.registry.gate, comparison, force=force)
    if dry_run:
        would = "would be promoted" if decision.promote else "would not be promoted"
        why = f": {decision.why_not()}" if decision.failures else ""
        return Promotion(name, version, decision, False, champion, champion,
                         note=f"dry run: v{version} {would}{why}; nothing was changed")
    stamp = {f"{TAG_PREFIX}gate": "passed" if decision.passed else "refused",
             f"{TAG_PREFIX}gate_failed": ",".join(c.name for c in decision.failures) or "-",
             # Every check, for `kdpipe models --version N` (registry tags hold 100k chars).
             GATE_CHECKS: json.dumps(decision.to_dict()["checks"]),
             f"{TAG_PREFIX}gate_checked_at": _now()}
    if decision.promote:
        stamp.update({f"{TAG_PREFIX}promoted_at": stamp[f"{TAG_PREFIX}gate_checked_at"],
                      f"{TAG_PREFIX}promoted_by": _who(),
                      f"{TAG_PREFIX}forced_promotion": "true" if force else "false",
                      CHAMPION_BEFORE: str(champion) if champion is not None else "-"})
    # The stamp goes on before the alias moves: a process killed in between leaves a
    # version that is champion only with its decision recorded (`_recorded_promotion`).
    registry.set_tags(name, version, stamp)
    if decision.promote:
        if champion is not None:  # what `kdpipe rollback` returns to
            registry.set_model_tag(name, PREVIOUS_CHAMPION, str(champion))
        registry.set_alias(name, CHAMPION, version)
    after = version if decision.promote else champion
    return Promotion(name, version, decision, decision.promote, champion, after)


def _recorded_promotion(version: Version) -> Promotion | None:
    """The promotion that made ``version`` the champion, rebuilt from its stamp; None when
    the stamp is missing, unreadable, or from a refusal."""
    tags = version.tags
    try:
        checks = tuple(Check(**check) for check in json.loads(tags[GATE_CHECKS]))
        before = tags[CHAMPION_BEFORE]
        champion_before = None if before == "-" else int(before)
    except (KeyError, TypeError, ValueError):
        return None
    if f"{TAG_PREFIX}promoted_at" not in tags:
        return None
    decision = Decision(checks, forced=tags.get(f"{TAG_PREFIX}forced_promotion") == "true")
    if not decision.promote:  # a later refusal's stamp (the version came back by rollback)
        return None
    return Promotion(version.name, version.version, decision, True, champion_before,
                     version.version)


def rollback(cfg: Config) -> Promotion:
    """Point ``champion`` back at the previous champion (the registered model's
    ``kdpipe.previous_champion`` tag, set at each promotion), without the gate: it served
    before. The version rolled back from becomes the previous one, so a second rollback
    undoes the first."""
    registry = open_registry(cfg)
    name = cfg.registry.model_name
    with registry.locked(name, waiting=lambda line: print(line, file=sys.stderr, flush=True)):
        current = registry.aliases(name).get(CHAMPION)
        previous = registry.model_tags(name).get(PREVIOUS_CHAMPION)
        if current is None or previous is None:
            raise KdpipeError(f"registered model {name!r} has no previous champion to roll "
                              "back to (none recorded; `kdpipe promote --version N --force` "
                              "picks one)")
        target = registry.version(name, int(previous))  # still there? (else one line)
        if target.status != READY:
            raise KdpipeError(f"version {target.version} of {name!r} is {target.status}, "
                              f"not {READY}; not rolled back")
        registry.set_alias(name, CHAMPION, target.version)
        registry.set_model_tag(name, PREVIOUS_CHAMPION, str(current))
        registry.set_tags(name, target.version, {f"{TAG_PREFIX}rolled_back_at": _now(),
                                                 f"{TAG_PREFIX}rolled_back_by": _who(),
                                                 f"{TAG_PREFIX}rolled_back_from": str(current)})
    return Promotion(name, target.version, None, True, current, target.version,
                     note=f"champion rolled back from v{current} to v{target.version}")


def compare_with_champion(cfg: Config, registry: Registry, candidate: Version, champion: int,
                          prepared_dir: Path, force: bool = False) -> ChampionComparison:
    """Both versions downloaded and measured on the same rows. Missing data is a
    ``KdpipeError`` unless ``force`` (then the comparison says why it is missing); a
    champion that cannot be loaded is a failed measurement, which the gate refuses."""
    split = cfg.evaluate.split
    try:
        texts, gold = evaluation_rows(prepared_dir, split, cfg.evaluate.max_rows)
    except KdpipeError as exc:
        if not force:
            raise KdpipeError(f"{exc}; the gate measures the candidate and champion "
                              f"v{champion} on it (or promote with --force)") from None
        return ChampionComparison(champion, split, 0, None, None, str(exc))
    with tempfile.TemporaryDirectory(prefix="kdpipe-gate-") as scratch:
        accuracies: list[float | None] = []
        problem = ""
        for version in (candidate.version, champion):
            try:
                folder = registry.download(candidate.name, version, Path(scratch) / str(version))
                accuracies.append(accuracy_on(folder, texts, gold, cfg.evaluate.threads))
            except KdpipeError as exc:
                accuracies.append(None)
                problem = problem or f"v{version}: {exc}"
    return ChampionComparison(champion, split, len(texts), accuracies[0], accuracies[1],
                              problem)


def evaluation_rows(prepared_dir: Path, split: str, max_rows: int | None
                    ) -> tuple[list[str], list[str]]:
    """The first ``max_rows`` texts of ``split`` and their gold label names."""
    import json

    import pyarrow.parquet as pq

    path = prepared_dir / f"{split}.parquet"
    labels_path = prepared_dir / "labels.json"
    for needed in (path, labels_path):
        if not needed.is_file():
            raise KdpipeError(f"{needed}: not found (run `kdpipe ingest`)")
    table = pq.read_table(path, columns=["text", "label"])
    if max_rows is not None:
        table = table.slice(0, max_rows)
    names = json.loads(labels_path.read_text(encoding="utf-8"))["names"]
    texts = table.column("text").to_pylist()
    if not texts:
        raise KdpipeError(f"{path}: no rows to measure accuracy on")
    return texts, [names[i] for i in table.column("label").to_pylist()]


def accuracy_on(folder: Path, texts: list[str], gold: list[str], threads: int | None) -> float:
    """Share of ``texts`` whose predicted label name is the gold name (names, not ids, so a
    model with other label ids is still measured fairly)."""
    from kdpipe.serving.predictor import Predictor

    predictor = Predictor(folder, threads=threads)
    predicted = predictor.logits(texts).argmax(axis=1)
    names = np.asarray(predictor.labels, dtype=object)[predicted]
    return float(np.mean(names == np.asarray(gold, dtype=object)))


def list_models(cfg: Config) -> list[Version]:
    """Every version of ``registry.model_name``, oldest first, with aliases and key-metric
    tags (``Version.metrics``)."""
    return open_registry(cfg).versions(cfg.registry.model_name)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _who() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry in some containers
        return "unknown"
