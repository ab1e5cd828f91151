"""ingest: read a data source, check it, split it, and write Parquet splits, labels.json and
a data card.

Outputs in ``out_dir``: ``train.parquet``, ``validation.parquet``, ``test.parquet`` (columns
``text``: str, ``label``: int id), ``unlabeled.parquet`` (the texts of ``data.unlabeled``,
label -1, none repeated nor in the three splits; no rows when it is not set),
``labels.json`` (``{"names": [...]}`` in id order) and
``data_card.json`` (rows per split and class, token-length percentiles with the teacher
tokenizer, texts longer than ``ingest.max_length`` tokens, duplicates, source provenance, and
the content hash later steps key on). With ``ingest.truncation: refuse`` a text longer than
``max_length`` tokens stops ingest instead, naming its file and row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kdpipe.atomic import atomic_dir, write_json
from kdpipe.config import MAX_LENGTH_LIMIT, Config
from kdpipe.data.prepare import (
    SPLITS,
    UNLABELED,
    Prepared,
    Split,
    clean_texts,
    prepare,
    prepare_unlabeled,
)
from kdpipe.data.readers import RawSplit
from kdpipe.data.sources import load_source, load_unlabeled
from kdpipe.errors import DataError
from kdpipe.models.teacher import load_tokenizer
from kdpipe.step_result import StepResult

# Token counts stop at STATS_TOKEN_CAP tokens and look at a text's first STATS_TOKEN_CAP * 12
# characters: tokenizing a 5 MB text whole takes 2-5 s (all-MiniLM-L6-v2's fast tokenizer,
# measured), its first 98,304 characters 40 ms, and a text that long is cut at max_length
# (at most 8,192 tokens) anyway. See count_tokens for the rare text where the prefix is not
# enough to know.
STATS_TOKEN_CAP = 8192
_CHARS_PER_TOKEN = 12


def run(cfg: Config, out_dir: Path) -> StepResult:
    """Ingest ``cfg.data.source`` (and ``data.unlabeled``) into ``out_dir`` (replaced
    atomically)."""
    source = load_source(cfg.data)
    prepared = prepare(source.splits, cfg.ingest, cfg.seed, cfg.data.label_names)
    extra = load_unlabeled(cfg.data)
    raw_unlabeled = extra.splits[UNLABELED] if extra is not None else None
    if extra is not None:
        prepared.unlabeled, prepared.report[UNLABELED] = prepare_unlabeled(
            raw_unlabeled, cfg.ingest.normalize, prepared.splits)
        prepared.report[UNLABELED]["source"] = extra.provenance
    tokenizer = load_tokenizer(cfg.teacher.checkpoint)
    lengths = token_lengths(prepared, tokenizer, cfg)
    truncated = {name: lengths[name]["truncated"]["texts"] for name in _text_sets(prepared)}
    if cfg.ingest.truncation == "refuse" and any(truncated.values()):
        raw = {**source.splits, **({UNLABELED: raw_unlabeled} if raw_unlabeled else {})}
        refuse_truncation(raw, tokenizer, cfg, sum(truncated.values()))
    card = data_card(prepared, source.provenance, lengths)
    card["normalize"] = cfg.ingest.normalize.model_dump()
    with atomic_dir(out_dir) as tmp:
        for name in SPLITS:
            write_split(prepared.splits[name], tmp / f"{name}.parquet")
        # Written with no rows when there are none: DVC lists it among ingest's outputs.
        write_split(Split(prepared.unlabeled, [-1] * len(prepared.unlabeled)),
                    tmp / f"{UNLABELED}.parquet")
        write_json(tmp / "labels.json", {"names": prepared.label_names})
        write_json(tmp / "data_card.json", card)
    rows = card["rows"]
    metrics = {f"rows_{name}": float(rows[name]) for name in SPLITS}
    metrics["num_classes"] = float(len(prepared.label_names))
    metrics["train_repeated_rows"] = float(card["duplicates"]["train_repeated_rows"])
    metrics.update({f"truncated_{name}": float(n) for name, n in truncated.items()})
    more = ""
    if raw_unlabeled is not None:
        metrics["rows_unlabeled"] = float(len(prepared.unlabeled))
        report = prepared.report[UNLABELED]
        gone = report["rows_read"] - report["rows"]
        more = (f" + {report['rows']:,} unlabeled"
                + (f" ({gone:,} dropped: {_dropped(report['dropped'])})" if gone else ""))
    summary = (
        f"{rows['train']:,} / {rows['validation']:,} / {rows['test']:,} rows{more}, "
        f"{len(prepared.label_names)} classes, hash {card['content_hash'][:12]}, "
        f"{truncation_summary(lengths)}"
    )
    return StepResult(
        "ingest", out_dir, metrics, [out_dir / "data_card.json", out_dir / "labels.json"], summary
    )


def _text_sets(prepared: Prepared) -> dict[str, list[str]]:
    """The texts of each split, and the unlabeled ones when there are any."""
    sets = {name: prepared.splits[name].texts for name in SPLITS}
    return {**sets, UNLABELED: prepared.unlabeled} if prepared.unlabeled else sets


def _dropped(counts: dict[str, int]) -> str:
    """``"12 repeated, 3 in test"``: the nonzero reasons."""
    return ", ".join(f"{n:,} {reason.replace('_', ' ')}" for reason, n in counts.items() if n)


def write_split(split: Split, path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({
        "text": pa.array(split.texts, pa.string()),
        "label": pa.array(split.labels, pa.int64()),
    })
    pq.write_table(table, path)


def token_lengths(prepared: Prepared, tokenizer: Any, cfg: Config) -> dict[str, Any]:
    """Token-count percentiles per split with the teacher tokenizer (special tokens included),
    and the texts longer than ``ingest.max_length`` tokens: how many, and the longest of them
    in tokens and characters (null when none). Counts stop at ``counted_up_to``: a count equal
    to it means at least that many."""
    max_length = cfg.ingest.max_length
    cap = _count_cap(max_length)
    stats: dict[str, Any] = {
        "tokenizer": f"{cfg.teacher.checkpoint} ({type(tokenizer).__name__})",
        "max_length": max_length,
        "counted_up_to": cap,
    }
    for name, texts in _text_sets(prepared).items():
        lengths = count_tokens(texts, tokenizer, cap)
        over = np.flatnonzero(lengths > max_length).tolist()
        longest = max(over, key=lambda i: (lengths[i], len(texts[i])), default=None)
        stats[name] = {
            **{f"p{q}": round(float(np.percentile(lengths, q)), 2) for q in (50, 90, 95, 99)},
            "max": int(lengths.max()),
            "mean": round(float(lengths.mean()), 2),
            "truncated_fraction": round(len(over) / len(texts), 6),
            "truncated": {
                "texts": len(over),
                "longest_tokens": None if longest is None else int(lengths[longest]),
                "longest_chars": None if longest is None else len(texts[longest]),
            },
        }
    return stats


def count_tokens(texts: list[str], tokenizer: Any, cap: int) -> np.ndarray:
    """Tokens in each text (special tokens included), counted up to ``cap``.

    Only the first ``cap * 12`` characters of a text are tokenized (see STATS_TOKEN_CAP). A
    longer text whose prefix holds fewer than ``cap`` tokens is tokenized whole, so that no
    count is a guess: only texts averaging more than 12 characters a token get there (long
    whitespace runs, an unbroken blob that is one [UNK]), and they cost seconds per 5 MB.
    """
    chars = cap * _CHARS_PER_TOKEN
    lengths = _encoded_lengths([text[:chars] for text in texts], tokenizer, cap)
    unsure = [i for i, text in enumerate(texts) if len(text) > chars and lengths[i] < cap]
    if unsure:
        lengths[unsure] = _encoded_lengths([texts[i] for i in unsure], tokenizer, cap)
    return lengths


def _encoded_lengths(texts: list[str], tokenizer: Any, cap: int) -> np.ndarray:
    encoded = tokenizer(texts, truncation=True, max_length=cap)
    return np.array([len(ids) for ids in encoded["input_ids"]], dtype=np.int64)


def _count_cap(max_length: int) -> int:
    # One more than max_length at least, so that a text over it is always seen to be.
    return max(STATS_TOKEN_CAP, max_length + 1)


def truncation_summary(lengths: dict[str, Any]) -> str:
    """``"2 texts cut at 128 tokens (train 1, test 1; longest 8,192+ tokens, 5,000,000
    chars)"``, or ``"no text over 128 tokens"``."""
    max_length = lengths["max_length"]
    counts = {name: lengths[name]["truncated"] for name in (*SPLITS, UNLABELED)
              if name in lengths}
    total = sum(c["texts"] for c in counts.values())
    if not total:
        return f"no text over {max_length} tokens"
    per_split = ", ".join(f"{name} {c['texts']:,}" for name, c in counts.items() if c["texts"])
    longest = max((c for c in counts.values() if c["texts"]),
                  key=lambda c: (c["longest_tokens"], c["longest_chars"]))
    tokens = _tokens_text(longest["longest_tokens"], lengths["counted_up_to"])
    return (f"{total:,} text{'s' if total > 1 else ''} cut at {max_length} tokens ({per_split}; "
            f"longest {tokens} tokens, {longest['longest_chars']:,} chars)")


def _tokens_text(tokens: int, cap: int) -> str:
    return f"{tokens:,}+" if tokens >= cap else f"{tokens:,}"


def refuse_truncation(raw: dict[str, RawSplit], tokenizer: Any, cfg: Config, total: int) -> None:
    """Raise a ``DataError`` naming the first source row whose text is longer than
    ``ingest.max_length`` tokens (``total`` of the prepared texts are)."""
    max_length = cfg.ingest.max_length
    cap = _count_cap(max_length)
    # A longer max_length is worth suggesting only where the config and the tokenizer allow it.
    limit = min(MAX_LENGTH_LIMIT, getattr(tokenizer, "model_max_length", None) or MAX_LENGTH_LIMIT)
    for split in raw.values():
        texts = clean_texts(split, cfg.ingest.normalize)
        lengths = count_tokens(texts, tokenizer, cap)
        over = np.flatnonzero(lengths > max_length)
        if not len(over):
            continue
        i = int(over[0])
        tokens = int(lengths[i])
        fits = tokens < cap and tokens <= limit
        raise_to = f"raise ingest.max_length to {tokens}, " if fits else ""
        others = f" ({total:,} texts in all)" if total > 1 else ""
        raise DataError(
            f"{split.origin}: row {split.rows[i]}: text is {_tokens_text(tokens, cap)} tokens "
            f"({len(texts[i]):,} characters), more than ingest.max_length={max_length}{others}; "
            f"shorten it, {raise_to}or set -S ingest.truncation=keep to let the tokenizer cut it"
        )
    raise DataError(  # not reached: every prepared text is a cleaned source text
        f"{cfg.data.source}: {total:,} texts longer than ingest.max_length={max_length} tokens"
    )


def data_card(prepared: Prepared, provenance: dict[str, Any],
              lengths: dict[str, Any]) -> dict[str, Any]:
    names = prepared.label_names
    counts = {
        split: {names[i]: int(n) for i, n in enumerate(np.bincount(
            prepared.splits[split].labels, minlength=len(names)))}
        for split in SPLITS
    }
    rows = {split: len(prepared.splits[split].texts) for split in SPLITS}
    return {
        "content_hash": prepared.content_hash(),
        "source": provenance,
        "demo": provenance.get("kind") == "demo",
        "labels": names,
        "num_classes": len(names),
        "rows": rows,
        "class_counts": counts,
        "class_balance": {
            split: {k: round(v / rows[split], 4) for k, v in counts[split].items()}
            for split in SPLITS
        },
        "token_length": lengths,
        **prepared.report,
    }
