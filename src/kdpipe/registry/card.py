"""The model card: what a registered version is, what it was made from, how well it does,
and where those numbers stop applying. Markdown; it becomes the version's description and
the run's ``model_card.md``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kdpipe.registry.gate import KeyMetrics, gate_table


@dataclass(frozen=True)
class CardFacts:
    """Everything the card states; the register step gathers it."""

    name: str
    candidate: str  # registry.candidate: quantized | exported
    labels: list[str]
    data_card: dict[str, Any]
    teacher_checkpoint: str
    student_arch: str
    quantization: str | None  # e.g. "ort_dynamic, kept int8" (from quantize.json)
    max_length: int | None
    metrics: KeyMetrics
    evaluation: dict[str, Any]  # metrics.json (may lack the candidate's entry)
    candidate_entry: str | None  # its name in metrics.json models, if any
    params_hash: str
    git_commit: str | None
    notes: list[str] = field(default_factory=list)
    gate: dict[str, Any] | None = None  # the promotion gate's decision, once it ran


def model_card(facts: CardFacts) -> str:
    sections = [_header(facts), _data(facts), _models(facts), _metrics(facts), _gate(facts),
                _limits(facts), _provenance(facts)]
    return "\n\n".join(s for s in sections if s) + "\n"


def _gate(f: CardFacts) -> str:
    if not f.gate:
        return ""
    verdict = ("passed" if f.gate.get("passed") else "refused") + (
        ", promotion forced" if f.gate.get("forced") else "")
    return f"## Promotion gate: {verdict}\n\n{gate_table(f.gate.get('checks') or [])}"


def _header(f: CardFacts) -> str:
    return (f"# {f.name}\n\nA text classifier ({', '.join(f.labels)}) distilled by kdpipe "
            f"from the teacher `{f.teacher_checkpoint}` into a {f.student_arch} student, "
            f"exported to ONNX and served by ONNX Runtime from raw text "
            f"(`models:/{f.name}@champion`).")


def _data(f: CardFacts) -> str:
    card = f.data_card
    source = card.get("source") or {}
    where = source.get("path") or source.get("id") or source.get("kind") or "unknown"
    rows = card.get("rows") or {}
    lines = ["## Data", "",
             f"- source: {where}" + (" (the DEMO set shipped with kdpipe)"
                                     if card.get("demo") else ""),
             f"- content hash: `{card.get('content_hash', 'unknown')}`",
             "- rows: " + ", ".join(f"{split} {count:,}" for split, count in rows.items())]
    balance = (card.get("class_balance") or {}).get("train")
    if balance:
        lines.append("- train class balance: " + ", ".join(
            f"{label} {share:.0%}" for label, share in balance.items()))
    return "\n".join(lines)


def _models(f: CardFacts) -> str:
    lines = ["## Models", "", f"- teacher: `{f.teacher_checkpoint}`",
             f"- student: {f.student_arch}, registered from the {f.candidate} folder"
             + (f" (quantization: {f.quantization})" if f.quantization else "")]
    if f.max_length:
        lines.append(f"- input: raw text, cut to {f.max_length} tokens")
    return "\n".join(lines)


def _metrics(f: CardFacts) -> str:
    ev = f.evaluation
    header = (f"## Metrics\n\nOn {ev.get('rows', '?')} rows of the "
              f"{ev.get('split', '?')} split, {ev.get('threads', '?')} thread(s); latency is "
              "batch 1, p50, tokenization included.\n\n"
              "| model | accuracy | macro F1 | vs teacher | latency b1 p50 | size |\n"
              "| --- | --- | --- | --- | --- | --- |")
    rows = []
    models = ev.get("models") or {}
    for model, entry in models.items():
        if not isinstance(entry, dict):
            continue
        mark = " (registered)" if model == f.candidate_entry else ""
        rows.append(_row(f"{model}{mark}", entry.get("accuracy"), entry.get("macro_f1"),
                         (entry.get("vs_teacher") or {}).get("accuracy"),
                         ((entry.get("latency_ms") or {}).get("b1") or {}).get("p50"),
                         entry.get("size_bytes")))
    if f.candidate_entry is None:
        m = f.metrics
        rows.append(_row(f"{f.candidate} (registered)", m.accuracy, m.macro_f1, m.retention,
                         m.latency_b1_p50_ms, m.size_bytes))
    return "\n".join([header, *rows])


def _row(name: str, accuracy: Any, f1: Any, ratio: Any, latency: Any, size: Any) -> str:
    cells = [name, _fmt(accuracy, "{:.2%}"), _fmt(f1, "{:.4f}"), _fmt(ratio, "{:.3f}x"),
             _fmt(latency, "{:.3g} ms"), _size(size)]
    return "| " + " | ".join(cells) + " |"


def _limits(f: CardFacts) -> str:
    ev = f.evaluation
    lines = ["## Limits", "",
             f"- The numbers hold for {ev.get('rows', '?')} {ev.get('split', '?')} rows of this "
             "data set; text from elsewhere (other domains, lengths, languages) will score "
             "differently.",
             "- Latency was measured on the machine that ran `kdpipe evaluate`; other "
             "hardware, thread counts or batch sizes change it.",
             "- The student imitates the teacher: it inherits the teacher's errors and biases, "
             "and a confident score is not a calibrated guarantee."]
    if f.data_card.get("demo"):
        lines.append("- Trained on the small DEMO set: a smoke test, not a usable model.")
    lines += [f"- {note}" for note in f.notes]
    return "\n".join(lines)


def _provenance(f: CardFacts) -> str:
    return "\n".join(["## Provenance", "", f"- params hash: `{f.params_hash}`",
                      f"- git commit: `{f.git_commit or 'unknown'}`"])


def _size(value: Any) -> str:
    if not _is_number(value):
        return "–"
    return f"{value / 1e6:.2f} MB" if value >= 1e5 else f"{int(value):,} bytes"


def _fmt(value: Any, pattern: str) -> str:
    return pattern.format(value) if _is_number(value) else "–"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
