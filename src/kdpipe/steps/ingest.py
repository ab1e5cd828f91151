"""ingest: read a data source, check it, split it, and write Parquet splits, labels.json and
a data card.

Outputs in ``out_dir``: ``train.parquet``, ``validation.parquet``, ``test.parquet`` (columns
``text``: str, ``label``: int id), ``labels.json`` (``{"names": [...]}`` in id order) and
``data_card.json`` (rows per split and class, token-length percentiles with the teacher
tokenizer, duplicates, source provenance, and the content hash later steps key on).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kdpipe.atomic import atomic_dir, write_json
from kdpipe.config import Config
from kdpipe.data.prepare import SPLITS, Prepared, Split, prepare
from kdpipe.data.sources import load_source
from kdpipe.models.teacher import load_tokenizer
from kdpipe.step_result import StepResult

# Length statistics look at no more than this many tokens of a text: a 1 MB text would
# otherwise cost seconds to tokenize only to be truncated at max_length anyway.
STATS_TOKEN_CAP = 8192
_STATS_CHAR_CAP = STATS_TOKEN_CAP * 12


def run(cfg: Config, out_dir: Path) -> StepResult:
    """Ingest ``cfg.data.source`` into ``out_dir`` (replaced atomically)."""
    source = load_source(cfg.data)
    prepared = prepare(source.splits, cfg.ingest, cfg.seed, cfg.data.label_names)
    tokenizer = load_tokenizer(cfg.teacher.checkpoint)
    card = data_card(prepared, source.provenance, token_lengths(prepared, tokenizer, cfg))
    card["normalize"] = cfg.ingest.normalize.model_dump()
    with atomic_dir(out_dir) as tmp:
        for name in SPLITS:
            write_split(prepared.splits[name], tmp / f"{name}.parquet")
        write_json(tmp / "labels.json", {"names": prepared.label_names})
        write_json(tmp / "data_card.json", card)
    rows = card["rows"]
    metrics = {f"rows_{name}": float(rows[name]) for name in SPLITS}
    metrics["num_classes"] = float(len(prepared.label_names))
    metrics["train_repeated_rows"] = float(card["duplicates"]["train_repeated_rows"])
    summary = (
        f"{rows['train']:,} / {rows['validation']:,} / {rows['test']:,} rows, "
        f"{len(prepared.label_names)} classes, hash {card['content_hash'][:12]}"
    )
    return StepResult(
        "ingest", out_dir, metrics, [out_dir / "data_card.json", out_dir / "labels.json"], summary
    )


def write_split(split: Split, path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({
        "text": pa.array(split.texts, pa.string()),
        "label": pa.array(split.labels, pa.int64()),
    })
    pq.write_table(table, path)


def token_lengths(prepared: Prepared, tokenizer: Any, cfg: Config) -> dict[str, Any]:
    """Token-count percentiles per split with the teacher tokenizer (special tokens included)."""
    stats: dict[str, Any] = {
        "tokenizer": f"{cfg.teacher.checkpoint} ({type(tokenizer).__name__})",
        "max_length": cfg.ingest.max_length,
    }
    for name in SPLITS:
        texts = [t[:_STATS_CHAR_CAP] for t in prepared.splits[name].texts]
        encoded = tokenizer(texts, truncation=True, max_length=STATS_TOKEN_CAP)
        lengths = np.array([len(ids) for ids in encoded["input_ids"]])
        stats[name] = {
            **{f"p{q}": round(float(np.percentile(lengths, q)), 2) for q in (50, 90, 95, 99)},
            "max": int(lengths.max()),
            "mean": round(float(lengths.mean()), 2),
            "truncated_fraction": round(float((lengths > cfg.ingest.max_length).mean()), 6),
        }
    return stats


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
