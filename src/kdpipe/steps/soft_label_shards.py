"""Soft labels in parallel: the Kubeflow DAG labels shards of every split in separate tasks
and merges them into the folder ``kdpipe.steps.soft_labels.run`` writes, byte for byte.

A shard is every ``num_shards``-th length-sorted batch (``shard_rows``), so each row is
labelled in exactly the batch it would have in one run: padding, and so every float, match.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kdpipe.atomic import atomic_dir, write_json
from kdpipe.config import Config
from kdpipe.data.prepare import read_labels
from kdpipe.errors import KdpipeError
from kdpipe.models.teacher import load_tokenizer
from kdpipe.serving.padding import length_sorted_batches, token_counts
from kdpipe.step_result import StepResult
from kdpipe.steps.soft_labels import (
    AUGMENT,
    MANIFEST,
    Labelled,
    _summary,
    cached,
    key_parts,
    label_with_teachers,
    texts_to_label,
    validation_accuracy,
)
from kdpipe.training import softcache


def shard_rows(lengths: np.ndarray, batch_size: int, shard: int, num_shards: int) -> np.ndarray:
    """Row indices, int64, that shard ``shard`` of ``num_shards`` labels: every
    ``num_shards``-th of the length-sorted batches one unsharded run makes, in run order.

    Whole batches rather than a range of rows: each row is then computed in the very batch
    (same neighbours, same padding) it has in the unsharded run, which is what makes the
    merged arrays equal bit for bit. Dealing batches out in turn gives every shard a similar
    mix of short and long texts.
    """
    batches = length_sorted_batches(lengths, batch_size)[shard::num_shards]
    return np.concatenate(batches).astype(np.int64) if batches else np.zeros(0, np.int64)


def run_shard(cfg: Config, teacher_dir: Path, prepared_dir: Path, out_dir: Path, shard: int,
              num_shards: int) -> StepResult:
    """Label shard ``shard`` (0-based) of ``num_shards`` of every split into ``out_dir``.

    Writes, per split (and ``augment``), the shard's ``{name}_logits.npy`` (and
    ``{name}_features.npy``) and ``{name}_rows.npy`` (int64: which rows of the split they
    are, see ``shard_rows``); with augmentation also the whole ``augment_source.npy`` and
    ``augment_texts.parquet`` (every shard makes the same augmented set); and
    ``manifest.json`` (the unsharded cache key and its parts, shard, num_shards, rows per
    split, timings). A shard is cached like a whole run, under a key that adds the shard,
    the shard count and the batch size (which decides the batches).

    Metrics: ``cache_hit`` (0/1), ``seconds``, ``texts`` (rows this shard labelled).
    """
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise KdpipeError(f"soft-label shard {shard} of {num_shards}: "
                          "need num_shards >= 1 and 0 <= shard < num_shards")
    start = time.perf_counter()
    teacher_dir, prepared_dir = Path(teacher_dir), Path(prepared_dir)
    parts = key_parts(cfg, teacher_dir, prepared_dir)
    key = softcache.cache_key(parts)
    shard_key = softcache.cache_key({"soft_labels": key, "shard": shard, "num_shards": num_shards,
                                     "batch_size": cfg.soft_labels.batch_size})
    hit, meta, seconds = cached(
        cfg, key, shard_key, parts,
        lambda: label_shard(cfg, teacher_dir, prepared_dir, shard, num_shards), out_dir, start,
        {"shard": shard, "num_shards": num_shards, "rows": None})
    texts = sum(meta["texts"].values())
    summary = f"shard {shard + 1}/{num_shards}: " + (
        f"cache hit {shard_key[:8]}…" if hit else f"labelled {texts:,} texts")
    return StepResult("soft_labels_shard", out_dir,
                      {"cache_hit": float(hit), "seconds": seconds, "texts": float(texts)},
                      [out_dir / MANIFEST], summary)


def label_shard(cfg: Config, teacher_dir: Path, prepared_dir: Path, shard: int,
                num_shards: int) -> Labelled:
    """``label_all`` for one shard: the shard's arrays (with ``{name}_rows``), the augmented
    set's files, and stats (texts labelled and rows in the whole split, per name)."""
    tokenizer = load_tokenizer(str(teacher_dir))
    texts, arrays, files = texts_to_label(cfg, teacher_dir, prepared_dir, tokenizer)
    max_length, batch_size = cfg.ingest.max_length, cfg.soft_labels.batch_size
    rows = {name: shard_rows(token_counts(tokenizer, items, max_length) if items
                             else np.zeros(0, np.int64), batch_size, shard, num_shards)
            for name, items in texts.items()}
    started = time.perf_counter()
    # predict() re-sorts these texts by length (stably: they are sorted already) and cuts
    # them into batch_size chunks: every batch but a split's last is full, so the chunks are
    # exactly this shard's batches of the unsharded run.
    label_names = read_labels(prepared_dir)
    labelled, _ = label_with_teachers(
        cfg, teacher_dir, label_names, tokenizer,
        {name: [texts[name][i] for i in index] for name, index in rows.items() if index.size})
    label_seconds = time.perf_counter() - started
    for name in rows:  # in run()'s order; a shard may get no batch of a small split
        arrays[f"{name}_logits"] = labelled.get(
            f"{name}_logits", np.zeros((0, len(label_names)), np.float32))
        if cfg.soft_labels.features:
            arrays[f"{name}_features"] = labelled.get(
                f"{name}_features", np.zeros((0, _hidden_size(teacher_dir)), np.float32))
    arrays |= {f"{name}_rows": index for name, index in rows.items()}
    stats = {
        "texts": {name: len(index) for name, index in rows.items()},
        "rows": {name: len(items) for name, items in texts.items()},
        "label_seconds": round(label_seconds, 3),
        "shapes": {name: list(a.shape) for name, a in arrays.items()},
    }
    return arrays, files, stats


def _hidden_size(teacher_dir: Path) -> int:
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(teacher_dir).hidden_size)


def merge(shard_dirs: Sequence[Path], out_dir: Path,
          prepared_dir: Path | None = None) -> StepResult:
    """Put the folders written by ``run_shard`` (every shard of one run, any order) together
    into ``out_dir``: the folder ``run`` writes for the same inputs, arrays byte for byte,
    and a manifest with the same fields (``label_seconds`` summed over shards, ``seconds``
    the slowest shard plus the merge, ``cache_hit`` true when every shard was a hit).

    Metrics as ``run``'s (``teacher_val_accuracy`` only with ``prepared_dir``), plus
    ``shards``. Shards of different runs, a missing or repeated shard, or rows not covered
    exactly once are a ``KdpipeError``.
    """
    start = time.perf_counter()
    shards = _read_shards([Path(d) for d in shard_dirs])
    first_dir, first = shards[0]
    merged_shapes: dict[str, list[int]] = {}
    with atomic_dir(out_dir) as tmp:
        if f"{AUGMENT}_source" in first["shapes"]:
            _copy_augment_set(shards, tmp)
            merged_shapes[f"{AUGMENT}_source"] = first["shapes"][f"{AUGMENT}_source"]
        for name, total in first["rows"].items():
            index = [np.load(d / f"{name}_rows.npy", allow_pickle=False) for d, _ in shards]
            _check_cover(name, index, total)
            for kind in ("logits", "features"):
                array = f"{name}_{kind}"
                if array not in first["shapes"]:
                    continue
                parts = [np.load(d / f"{array}.npy", allow_pickle=False) for d, _ in shards]
                full = np.empty((total, *parts[0].shape[1:]), dtype=parts[0].dtype)
                for rows, part in zip(index, parts, strict=True):
                    full[rows] = part
                # Saved as softcache.store saves, so the files match run()'s byte for byte.
                np.save(tmp / f"{array}.npy", np.ascontiguousarray(full), allow_pickle=False)
                merged_shapes[array] = list(full.shape)
        hit = all(m["cache_hit"] for _, m in shards)
        label_seconds = sum(m["label_seconds"] for _, m in shards)
        texts = dict(first["rows"])
        meta = {"texts": texts, "label_seconds": round(label_seconds, 3),
                "texts_per_second": round(sum(texts.values()) / max(label_seconds, 1e-9), 1)}
        seconds = max(m["seconds"] for _, m in shards) + time.perf_counter() - start
        write_json(tmp / MANIFEST, {
            "key": first["key"],
            "parts": first["parts"],
            "cache_hit": hit,
            "seconds": round(seconds, 3),
            "label_seconds": meta["label_seconds"],
            "texts_per_second": meta["texts_per_second"],
            "texts": texts,
            "shapes": merged_shapes,
        })
    metrics = {"cache_hit": float(hit), "seconds": seconds,
               "texts_per_second": float(meta["texts_per_second"]), "shards": float(len(shards))}
    if prepared_dir is not None:
        metrics["teacher_val_accuracy"] = validation_accuracy(Path(out_dir), Path(prepared_dir))
    summary = f"{_summary(hit, first['key'], meta)} in {len(shards)} shards"
    return StepResult("soft_labels", Path(out_dir), metrics, [Path(out_dir) / MANIFEST], summary)


def _read_shards(shard_dirs: list[Path]) -> list[tuple[Path, dict[str, Any]]]:
    """(folder, manifest) per shard, sorted by shard index, after checking they belong
    together: one cache key, one shard count, every index exactly once."""
    if not shard_dirs:
        raise KdpipeError("soft-label merge: no shard folders given")
    shards = []
    for folder in shard_dirs:
        try:
            manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            manifest = None
        if not isinstance(manifest, dict) or not {"shard", "num_shards"} <= manifest.keys():
            raise KdpipeError(f"{folder}: not a soft-label shard (no shard in its "
                              f"{MANIFEST}); make it with soft_labels.run_shard")
        shards.append((folder, manifest))
    shards.sort(key=lambda item: item[1]["shard"])
    keys = {m["key"] for _, m in shards}
    if len(keys) > 1:
        raise KdpipeError(f"soft-label merge: the shards come from {len(keys)} different runs "
                          "(teacher, data or settings differ)")
    counts = {m["num_shards"] for _, m in shards}
    indices = [m["shard"] for _, m in shards]
    if len(counts) > 1 or indices != list(range(counts.pop())):
        raise KdpipeError(f"soft-label merge: got shards {indices} of "
                          f"{sorted({m['num_shards'] for _, m in shards})}; need each of "
                          "0..num_shards-1 exactly once")
    return shards


def _check_cover(name: str, index: list[np.ndarray], total: int) -> None:
    seen = np.zeros(total, dtype=np.int64)
    for rows in index:
        if rows.size and (rows.min() < 0 or rows.max() >= total):
            raise KdpipeError(f"soft-label merge: {name} rows outside 0..{total - 1}")
        np.add.at(seen, rows, 1)
    if not (seen == 1).all():
        raise KdpipeError(f"soft-label merge: {int((seen != 1).sum())} {name} rows are "
                          "covered by no shard or by several")


def _copy_augment_set(shards: list[tuple[Path, dict[str, Any]]], out_dir: Path) -> None:
    # Every shard made the whole augmented set; they must agree, or rows would mismatch.
    for name in (f"{AUGMENT}_source.npy", f"{AUGMENT}_texts.parquet"):
        digests = {softcache.file_sha256(folder / name) for folder, _ in shards}
        if len(digests) > 1:
            raise KdpipeError(f"soft-label merge: the shards' {name} differ")
        shutil.copyfile(shards[0][0] / name, out_dir / name)
