"""register: the candidate model as a new MLflow registry version, and the promotion gate.

Reads ``candidate_dir`` (the quantized or exported folder, per ``registry.candidate``),
``evaluation_dir/metrics.json`` (written by ``kdpipe evaluate``; the candidate's entry is
``models.quantized``; an exported folder may have none, and then accuracy and macro F1 are
measured here on the evaluate rows and latency is left unknown, which the card says) and
``prepared_dir`` (data_card.json; the rows the gate measures on).

Logs the folder as a pyfunc model (``kdpipe.registry.pyfunc``) into the active MLflow run,
or into a run of its own; registers it as a new version of ``registry.model_name`` tagged
with the data hash, teacher checkpoint, params hash, git commit and key metrics, with the
model card as its description; points the alias ``challenger`` at it; and, when
``registry.auto_promote``, runs the gate and moves ``champion`` if it passes.

Writes ``out_dir`` atomically: ``register.json`` (name, version, run id, model URI, the
gate's every check, promoted or not, champion before and after) and ``model_card.md``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from kdpipe import tracking
from kdpipe.atomic import atomic_dir, write_json
from kdpipe.config import Config
from kdpipe.errors import KdpipeError
from kdpipe.evaluation.models import EXPORTED_KINDS
from kdpipe.models.teacher import checkpoint_name
from kdpipe.registry.card import CardFacts, model_card
from kdpipe.registry.gate import KeyMetrics, unguarded
from kdpipe.registry.outcome import outcome
from kdpipe.registry.promotion import Promotion, evaluation_rows, promote
from kdpipe.registry.store import (
    CANDIDATE_KEY,
    CHALLENGER,
    CHAMPION,
    TAG_PREFIX,
    metric_tags,
    open_registry,
    quiet_downloads,
)
from kdpipe.serving.predictor import LABELS_FILE, MODEL_FILE, RECORD_FILE, TORCH_DIR
from kdpipe.step_result import StepResult
from kdpipe.training.softcache import cache_key, file_tree_hash

REGISTER_FILE = "register.json"
CARD_FILE = "model_card.md"
RECORD_FORMAT = 1
METRICS_FILE = "metrics.json"
# The evaluate step's file names (importing that step would pull its dependencies, and
# its DVC code deps, into this stage).
COMPARISON_FILE = "comparison.md"
PLOTS_DIR = "plots"


def candidate_folder(cfg: Config, exported_dir: Path, quantized_dir: Path) -> Path:
    """The folder ``registry.candidate`` names: the quantized or the exported model."""
    return Path(quantized_dir if cfg.registry.candidate == "quantized" else exported_dir)


def run_candidate(cfg: Config, exported_dir: Path, quantized_dir: Path, evaluation_dir: Path,
                  prepared_dir: Path, out_dir: Path) -> StepResult:
    """``run`` on the candidate ``registry.candidate`` names (the pipeline's entry point)."""
    return run(cfg, candidate_folder(cfg, exported_dir, quantized_dir), evaluation_dir,
               prepared_dir, out_dir)


def run(cfg: Config, candidate_dir: Path, evaluation_dir: Path, prepared_dir: Path,
        out_dir: Path) -> StepResult:
    """Register ``candidate_dir`` (see the module docstring).

    Metrics: ``version``, ``promoted`` (1 or 0), ``gate_passed`` (1 or 0) and the key
    metrics that were measured (``accuracy``, ``macro_f1``, ``teacher_accuracy``,
    ``retention``, ``latency_b1_p50_ms``, ``size_bytes``).
    """
    from kdpipe.registry.pyfunc import log_model

    candidate_dir, evaluation_dir = Path(candidate_dir), Path(evaluation_dir)
    prepared_dir, out_dir = Path(prepared_dir), Path(out_dir)
    _check_inputs(candidate_dir, evaluation_dir, prepared_dir)
    if not cfg.tracking.enabled:
        return _skipped(cfg, candidate_dir, out_dir)
    evaluation = _read_json(evaluation_dir / METRICS_FILE)
    data_card = _read_json(prepared_dir / "data_card.json")
    entry_name, metrics, notes = key_metrics(cfg, evaluation, evaluation_dir / METRICS_FILE,
                                             candidate_dir, prepared_dir)
    facts = _card_facts(cfg, candidate_dir, evaluation, data_card, entry_name, metrics, notes)
    card = model_card(facts)
    registry = open_registry(cfg, create=True)
    name = cfg.registry.model_name
    tags = {**metric_tags(metrics), **_provenance_tags(cfg, data_card, facts)}
    tags[CANDIDATE_KEY] = candidate_key(candidate_dir, tags)
    # A rerun after a failure (the server gone mid-registration, say) completes the version
    # it registered then instead of adding a duplicate of the same candidate.
    existing = registry.find(name, CANDIDATE_KEY, tags[CANDIDATE_KEY])
    with tracking.active_or_own_run(cfg, "register") as run_id, quiet_downloads():
        logged_uri = log_model(candidate_dir).model_uri if existing is None else existing.source
        if existing is None:
            version = registry.register(name, logged_uri, tags, card)
        else:
            version = existing.version
            registry.describe(name, version, tags, card)
            notes.append(f"v{version} already held this candidate (same files, data and "
                         "settings), so it was completed rather than registered again.")
        registry.set_alias(name, CHALLENGER, version)
        if cfg.registry.auto_promote:
            warning = unguarded(cfg.registry.gate)
            if warning:  # loud: a gate that passes anything is rarely what a user meant
                print(warning, file=sys.stderr, flush=True)
                notes.append(warning)
            promotion = promote(cfg, version=version, prepared_dir=prepared_dir,
                                completing=existing is not None)
        else:
            champion = registry.alias(name, CHAMPION)
            promotion = Promotion(name, version, None, False, champion, champion,
                                  note=f"v{version} registered as {CHALLENGER}; registry."
                                  "auto_promote is off (promote with `kdpipe promote`)")
        if promotion.decision is not None:  # the card gets the gate's every check
            card = model_card(replace(facts, gate=promotion.decision.to_dict()))
            registry.describe(name, version, {}, card)
        tracking.log_text(card, CARD_FILE)
    record = {"format": RECORD_FORMAT, "name": name, "version": version, "run_id": run_id,
              "model_uri": f"models:/{name}/{version}", "logged_model_uri": logged_uri,
              "candidate": cfg.registry.candidate, "candidate_dir": str(candidate_dir),
              "metrics": metrics.to_dict(), "metrics_source": entry_name or "measured here",
              "notes": notes, "aliases": {CHALLENGER: version,
                                          CHAMPION: promotion.champion_after},
              **{k: v for k, v in promotion.to_dict().items() if k not in ("name", "version")}}
    with atomic_dir(out_dir) as tmp:
        write_json(tmp / REGISTER_FILE, record)
        (tmp / CARD_FILE).write_text(card, encoding="utf-8")
    # The parent run (the whole pipeline's) shows the outcome first; every runner's pipeline
    # ends here, so this is the one place that knows it.
    shown = outcome(evaluation, record, data_card, facts.student_arch)
    tracking.annotate(run_id, shown.run_name, shown.note, shown.metrics, shown.tags,
                      {"": [evaluation_dir / METRICS_FILE, evaluation_dir / COMPARISON_FILE,
                            out_dir / CARD_FILE],
                       "plots": sorted((evaluation_dir / PLOTS_DIR).glob("*.png"))})
    result_metrics = {"version": float(version), "promoted": float(promotion.promoted),
                      "gate_passed": float(bool(promotion.decision
                                                and promotion.decision.passed))}
    result_metrics.update({k: float(v) for k, v in metrics.to_dict().items() if v is not None})
    again = " (already registered)" if existing is not None else ""
    summary = f"{name} v{version}{again}: {promotion.summary()}"
    return StepResult("register", out_dir, result_metrics,
                      [out_dir / REGISTER_FILE, out_dir / CARD_FILE], summary)


def candidate_key(candidate_dir: Path, tags: dict[str, str]) -> str:
    """What makes two registrations the same candidate: the model's files (less the
    reports, whose timings differ run to run), the data and the settings."""
    files = file_tree_hash(candidate_dir, ("*",), exclude=(RECORD_FILE, "quantize.json"))
    return cache_key({"files": files, "data_hash": tags.get(f"{TAG_PREFIX}data_hash"),
                      "params_hash": tags.get(f"{TAG_PREFIX}params_hash")})


def _skipped(cfg: Config, candidate_dir: Path, out_dir: Path) -> StepResult:
    """tracking.enabled=false means no MLflow at all, so there is no registry to write to;
    the record says so (DVC still gets its output)."""
    why = ("skipped: tracking.enabled is false and the registry is MLflow's; "
           "run with -S tracking.enabled=true to register")
    with atomic_dir(out_dir) as tmp:
        write_json(tmp / REGISTER_FILE, {"format": RECORD_FORMAT, "name": cfg.registry.model_name,
                                         "candidate_dir": str(candidate_dir), "skipped": why})
    return StepResult("register", out_dir, {"registered": 0.0}, [], why)


def key_metrics(cfg: Config, evaluation: dict[str, Any], metrics_path: Path,
                candidate_dir: Path, prepared_dir: Path
                ) -> tuple[str | None, KeyMetrics, list[str]]:
    """(name of the candidate's metrics.json entry or None, its key metrics, notes on what
    had to be measured here or is unknown)."""
    models = evaluation.get("models")
    if not isinstance(models, dict):
        raise KdpipeError(f"{metrics_path}: no 'models' mapping; rerun `kdpipe evaluate`")
    reference = models.get(evaluation.get("reference") or "teacher")
    teacher_accuracy = _field(reference, "accuracy") if isinstance(reference, dict) else None
    entry_name = _entry_for(cfg.registry.candidate, models, candidate_dir)
    notes: list[str] = []
    if teacher_accuracy is None:
        notes.append("The teacher was not evaluated, so retention is unknown.")
    if entry_name is None:
        if cfg.registry.candidate == "quantized":
            raise KdpipeError(f"{metrics_path}: no models.quantized entry; evaluate the "
                              "quantized model (evaluate.models) before registering it")
        accuracy, macro_f1 = _measure(cfg, candidate_dir, prepared_dir)
        notes.append(f"{metrics_path} has no entry for the {cfg.registry.candidate} folder: "
                     "accuracy and macro F1 were measured at registration on the same rows; "
                     "latency was not measured.")
        return None, KeyMetrics(accuracy, macro_f1, teacher_accuracy, None,
                                _folder_bytes(candidate_dir)), notes
    entry = models[entry_name]
    where = f"{metrics_path}: models.{entry_name}"
    accuracy = _field(entry, "accuracy")
    if accuracy is None:
        raise KdpipeError(f"{where}.accuracy: missing or not a number")
    latency = _field(((entry.get("latency_ms") or {}).get("b1") or {}), "p50")
    if latency is None:
        notes.append("Batch-1 latency was not measured (evaluate.latency_batch_sizes has "
                      "no 1).")
    size = _field(entry, "size_bytes")
    return entry_name, KeyMetrics(accuracy, _field(entry, "macro_f1"), teacher_accuracy,
                                  latency, int(size) if size is not None else
                                  _folder_bytes(candidate_dir)), notes


def _entry_for(candidate: str, models: dict[str, Any], folder: Path) -> str | None:
    """metrics.json's entry for the candidate: ``quantized`` for the quantized folder, else
    any entry that evaluated this very folder."""
    if candidate == "quantized":
        return "quantized" if isinstance(models.get("quantized"), dict) else None
    target = folder.resolve()
    for name, entry in models.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            continue
        if entry.get("kind") in EXPORTED_KINDS and Path(entry["path"]).resolve() == target:
            return name
    return None


def _measure(cfg: Config, folder: Path, prepared_dir: Path) -> tuple[float, float]:
    import numpy as np

    from kdpipe.evaluation.metrics import accuracy_and_f1
    from kdpipe.serving.predictor import Predictor

    texts, gold = evaluation_rows(prepared_dir, cfg.evaluate.split, cfg.evaluate.max_rows)
    predictor = Predictor(folder, threads=cfg.evaluate.threads)
    predicted = predictor.logits(texts).argmax(axis=1)
    ids = {name: i for i, name in enumerate(predictor.labels)}
    return accuracy_and_f1(np.asarray([ids.get(g, -1) for g in gold]), predicted)


def _card_facts(cfg: Config, candidate_dir: Path, evaluation: dict[str, Any],
                data_card: dict[str, Any], entry_name: str | None, metrics: KeyMetrics,
                notes: list[str]) -> CardFacts:
    record = _read_json(candidate_dir / RECORD_FILE)
    labels = _read_json(candidate_dir / LABELS_FILE).get("names") or []
    return CardFacts(
        name=cfg.registry.model_name, candidate=cfg.registry.candidate, labels=labels,
        data_card=data_card, teacher_checkpoint=_teachers(cfg),
        student_arch=str(record.get("arch") or cfg.student.arch),
        quantization=_quantization(candidate_dir), max_length=record.get("max_length"),
        metrics=metrics, evaluation=evaluation, candidate_entry=entry_name,
        params_hash=cfg.params_hash(), git_commit=tracking.git_commit(), notes=notes)


def _teachers(cfg: Config) -> str:
    """The teacher checkpoint, and the others of an ensemble (soft_labels.teachers)."""
    name = checkpoint_name(cfg.teacher.checkpoint)
    if cfg.soft_labels.assistant:
        name += f", through the teacher assistant {cfg.soft_labels.assistant}"
    more = cfg.soft_labels.teachers
    if not more:
        return name
    return (f"{name}, with {len(more)} more teacher{'s' if len(more) > 1 else ''} "
            f"({cfg.soft_labels.ensemble} of their distributions): {', '.join(more)}")


def _quantization(folder: Path) -> str | None:
    """How quantize made the folder (method, and which model its accuracy gate kept)."""
    path = folder / "quantize.json"
    if not path.is_file():
        return None
    record = _read_json(path)
    return f"{record.get('method', 'unknown')}, kept {record.get('kept', 'unknown')}"


def _provenance_tags(cfg: Config, data_card: dict[str, Any], facts: CardFacts
                     ) -> dict[str, str]:
    tags = {"data_hash": str(data_card.get("content_hash", "unknown")),
            "teacher_checkpoint": checkpoint_name(cfg.teacher.checkpoint),
            "params_hash": facts.params_hash,
            "candidate": cfg.registry.candidate, "student_arch": facts.student_arch,
            "eval_split": str(facts.evaluation.get("split", cfg.evaluate.split)),
            "eval_rows": str(facts.evaluation.get("rows", "unknown"))}
    if facts.git_commit:
        tags["git_commit"] = facts.git_commit
    if cfg.soft_labels.assistant:  # a teacher assistant made the soft labels
        tags["assistant"] = cfg.soft_labels.assistant
    if cfg.soft_labels.teachers:  # an ensemble made the soft labels
        tags["teachers"] = json.dumps([checkpoint_name(cfg.teacher.checkpoint),
                                       *cfg.soft_labels.teachers])
        tags["teacher_ensemble"] = cfg.soft_labels.ensemble
    return {f"{TAG_PREFIX}{k}": v for k, v in tags.items()}


def _check_inputs(candidate_dir: Path, evaluation_dir: Path, prepared_dir: Path) -> None:
    hint = "run `kdpipe export` / `kdpipe quantize` first"
    model = [] if (candidate_dir / TORCH_DIR).is_dir() else [MODEL_FILE]  # torch_dynamic
    needed = [(candidate_dir / n, hint) for n in (*model, LABELS_FILE, RECORD_FILE)]
    needed += [(evaluation_dir / METRICS_FILE, "run `kdpipe evaluate` first"),
               (prepared_dir / "data_card.json", "run `kdpipe ingest` first")]
    for path, hint in needed:
        if not path.is_file():
            raise KdpipeError(f"{path}: not found; {hint}")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KdpipeError(f"{path}: not readable JSON ({type(exc).__name__})") from None
    if not isinstance(doc, dict):
        raise KdpipeError(f"{path}: expected a JSON object")
    return doc


def _field(entry: Any, key: str) -> float | None:
    value = entry.get(key) if isinstance(entry, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
