"""soft_labels: the teacher's logits (and [CLS] features) for every split, computed once per
content and cached.

Outputs in ``out_dir`` (replaced atomically), rows in each split's original order:

- ``{train,validation,test}_logits.npy``: float32 ``(rows, num_labels)``;
- ``{train,validation,test}_features.npy``: float32 ``(rows, hidden)``, the last hidden
  layer at position 0 ([CLS]), when ``soft_labels.features``;
- when ``soft_labels.augment.enabled``, the augmented transfer set made from train
  (``kdpipe.augment``; no gold labels): ``augment_logits.npy`` (+ ``augment_features.npy``),
  ``augment_source.npy`` (int64, the train row each variant came from) and
  ``augment_texts.parquet`` (column ``text``);
- ``manifest.json``: cache key and its parts, array shapes, cache hit, seconds, texts/s.

The arrays live in a content-addressed cache (``kdpipe.softcache``) keyed by the teacher's
weight and tokenizer files, the prepared data's content hash, max_length, the features flag,
the augmentation settings and seed, and ``FORMAT_VERSION``. On a hit no model is loaded;
the arrays are hard-linked (or copied) from the cache into ``out_dir``.

The Kubeflow DAG labels in parallel: ``run_shard`` labels one shard of every split and
``merge`` puts the shards together into this same folder, arrays equal byte for byte.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kdpipe import softcache
from kdpipe.atomic import atomic_dir, write_json
from kdpipe.augment import make_variants
from kdpipe.batching import length_sorted_batches, token_counts
from kdpipe.config import Config
from kdpipe.data.prepare import SPLITS
from kdpipe.errors import KdpipeError
from kdpipe.models import teacher as teacher_model
from kdpipe.models.teacher import load_tokenizer
from kdpipe.progress import progress_bar
from kdpipe.steps import StepResult
from kdpipe.steps.ingest import read_labels, read_split

log = logging.getLogger(__name__)

# Bump when what is stored under a key changes (names, dtypes, what "features" means), so
# old cache entries stop matching instead of being misread.
FORMAT_VERSION = 1
AUGMENT = "augment"
MANIFEST = "manifest.json"


def run(cfg: Config, teacher_dir: Path, prepared_dir: Path, out_dir: Path) -> StepResult:
    """Label ``prepared_dir``'s splits with the teacher in ``teacher_dir`` into ``out_dir``.

    Metrics: ``cache_hit`` (0/1), ``seconds`` (this run, end to end), ``texts_per_second``
    (the teacher's labelling throughput when the entry was computed, so a hit reports the
    throughput of the run that made it) and ``teacher_val_accuracy`` (argmax of the
    validation logits against the gold labels).
    """
    start = time.perf_counter()
    parts = key_parts(cfg, Path(teacher_dir), Path(prepared_dir))
    key = softcache.cache_key(parts)
    cache_dir = cfg.soft_labels.cache_dir
    entry = softcache.lookup(cache_dir, key)
    hit = entry is not None
    if entry is None:
        arrays, files, stats = label_all(cfg, Path(teacher_dir), Path(prepared_dir))
        entry = softcache.store(cache_dir, key, arrays, {"parts": parts, **stats}, files)
    meta = softcache.read_manifest(entry)["meta"]
    with atomic_dir(out_dir) as tmp:
        softcache.materialize(entry, tmp)
        seconds = time.perf_counter() - start
        write_json(tmp / MANIFEST, {
            "key": key,
            "parts": parts,
            "cache_hit": hit,
            "seconds": round(seconds, 3),
            "label_seconds": meta["label_seconds"],
            "texts_per_second": meta["texts_per_second"],
            "texts": meta["texts"],
            "shapes": meta["shapes"],
        })
    accuracy = validation_accuracy(out_dir, Path(prepared_dir))
    metrics = {
        "cache_hit": float(hit),
        "seconds": seconds,
        "texts_per_second": float(meta["texts_per_second"]),
        "teacher_val_accuracy": accuracy,
    }
    return StepResult("soft_labels", out_dir, metrics, [out_dir / MANIFEST],
                      _summary(hit, key, meta))


def key_parts(cfg: Config, teacher_dir: Path, prepared_dir: Path) -> dict[str, Any]:
    """Everything the stored arrays depend on, as JSON values (hashed into the cache key).

    Batch size and device are left out: they change the numbers only by float rounding.
    """
    augment = cfg.soft_labels.augment
    return {
        "format": FORMAT_VERSION,
        # training.json holds timings: a retrain to identical weights must still hit.
        "teacher": softcache.file_tree_hash(teacher_dir, exclude=("training.json",)),
        "data": data_content_hash(prepared_dir),
        "max_length": cfg.ingest.max_length,
        "features": cfg.soft_labels.features,
        "augment": {**augment.model_dump(mode="json"), "seed": cfg.seed}
        if augment.enabled else None,
    }


def data_content_hash(prepared_dir: Path) -> str:
    card = prepared_dir / "data_card.json"
    try:
        return json.loads(card.read_text(encoding="utf-8"))["content_hash"]
    except FileNotFoundError:
        raise KdpipeError(f"{card}: not found; run `kdpipe ingest` first") from None
    except (ValueError, KeyError, TypeError):
        raise KdpipeError(f"{card}: no content_hash; run `kdpipe ingest` again") from None


def label_all(cfg: Config, teacher_dir: Path,
              prepared_dir: Path) -> tuple[dict[str, np.ndarray], dict[str, bytes], dict[str, Any]]:
    """Run the teacher over every split (and the augmented set): the arrays to cache, extra
    files (the augmented texts as Parquet bytes) and stats for the manifest."""
    tokenizer = load_tokenizer(str(teacher_dir))
    texts, arrays, files = texts_to_label(cfg, teacher_dir, prepared_dir, tokenizer)
    model = load_teacher(teacher_dir, read_labels(prepared_dir), cfg.seed)
    started = time.perf_counter()
    arrays |= label_texts(model, tokenizer, texts, cfg.ingest.max_length,
                          cfg.soft_labels.batch_size, cfg.soft_labels.features)
    label_seconds = time.perf_counter() - started
    total = sum(len(t) for t in texts.values())
    stats = {
        "texts": {name: len(t) for name, t in texts.items()},
        "label_seconds": round(label_seconds, 3),
        "texts_per_second": round(total / max(label_seconds, 1e-9), 1),
        "shapes": {name: list(a.shape) for name, a in arrays.items()},
    }
    return arrays, files, stats


def texts_to_label(cfg: Config, teacher_dir: Path, prepared_dir: Path, tokenizer: Any,
                   ) -> tuple[dict[str, list[str]], dict[str, np.ndarray], dict[str, bytes]]:
    """The texts of every split (and, when ``soft_labels.augment.enabled``, the augmented
    set made from train), with the arrays (``augment_source``) and files
    (``augment_texts.parquet``) that describe the augmented set."""
    texts = {name: read_split(prepared_dir / f"{name}.parquet").texts for name in SPLITS}
    arrays: dict[str, np.ndarray] = {}
    files: dict[str, bytes] = {}
    augment = cfg.soft_labels.augment
    if augment.enabled:
        if tokenizer.mask_token is None:
            raise KdpipeError(f"{teacher_dir}: the tokenizer has no mask token, which "
                              "soft_labels.augment needs; set soft_labels.augment.enabled=false")
        texts[AUGMENT], arrays[f"{AUGMENT}_source"] = make_variants(
            texts["train"], augment, cfg.seed, tokenizer.mask_token)
        files[f"{AUGMENT}_texts.parquet"] = _parquet_bytes(texts[AUGMENT])
    return texts, arrays, files


def load_teacher(teacher_dir: Path, label_names: list[str], seed: int) -> Any:
    """The classifier in ``teacher_dir``, float32, eval mode, on the GPU if any.

    A checkpoint without a classification head (the default sentence encoder before the
    teacher step) gets a fresh head, seeded with ``seed`` so reruns agree, and a warning:
    its logits carry no task knowledge. A head for another number of classes is an error.
    """
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, report = teacher_model.load_teacher(str(teacher_dir), label_names)
    if report["mismatched"]:
        raise KdpipeError(f"{teacher_dir}: its classification head does not fit the "
                          f"{len(label_names)} classes of the data; run `kdpipe teacher` first")
    if report["missing"]:
        log.warning("%s: %s not in the checkpoint, initialised at random: its soft labels "
                    "are untrained (fine-tune the teacher first)", teacher_dir,
                    ", ".join(report["missing"]))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device, dtype=torch.float32).eval()


def label_texts(model: Any, tokenizer: Any, texts: dict[str, list[str]], max_length: int,
                batch_size: int, features: bool) -> dict[str, np.ndarray]:
    """``{name}_logits`` float32 ``(n, num_labels)`` and, with ``features``,
    ``{name}_features`` float32 ``(n, hidden)`` for each named list of texts, in order."""
    out: dict[str, np.ndarray] = {}
    batches = sum(-(-len(t) // batch_size) for t in texts.values())
    with progress_bar() as progress:
        task = progress.add_task("soft labels", total=batches)
        for name, items in texts.items():
            progress.update(task, description=f"soft labels: {name}")
            logits, cls = teacher_model.predict(
                model, tokenizer, items, batch_size=batch_size, max_length=max_length,
                features=features, advance=lambda: progress.advance(task))
            out[f"{name}_logits"] = logits
            if cls is not None:
                out[f"{name}_features"] = cls
    return out


def load(out_dir: Path) -> dict[str, np.ndarray]:
    """The arrays of a soft_labels output folder, memory-mapped read-only (never unpickled):
    ``train_logits``, ``train_features``, ..., ``augment_source`` as listed in its manifest."""
    out_dir = Path(out_dir)
    try:
        shapes = json.loads((out_dir / MANIFEST).read_text(encoding="utf-8"))["shapes"]
    except FileNotFoundError:
        raise KdpipeError(f"{out_dir}: no {MANIFEST}; run `kdpipe soft-labels` first") from None
    return {name: np.load(out_dir / f"{name}.npy", mmap_mode="r", allow_pickle=False)
            for name in shapes}


def load_augment_texts(out_dir: Path) -> list[str]:
    """The augmented texts (row i belongs to ``augment_logits[i]``)."""
    import pyarrow.parquet as pq

    return pq.read_table(Path(out_dir) / f"{AUGMENT}_texts.parquet",
                         columns=["text"]).column("text").to_pylist()


def validation_accuracy(out_dir: Path, prepared_dir: Path) -> float:
    logits = np.load(out_dir / "validation_logits.npy", mmap_mode="r", allow_pickle=False)
    gold = np.asarray(read_split(prepared_dir / "validation.parquet").labels)
    return float((np.argmax(logits, axis=1) == gold).mean())


# ---------------------------------------------------------------- shards (the KFP DAG)
#
# The Kubeflow pipeline labels in parallel shards (dsl.ParallelFor) and merges them; the
# merged folder is the one ``run`` writes for the same inputs, arrays byte for byte.


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
    cache_dir = cfg.soft_labels.cache_dir
    entry = softcache.lookup(cache_dir, shard_key)
    hit = entry is not None
    if entry is None:
        arrays, files, stats = label_shard(cfg, teacher_dir, prepared_dir, shard, num_shards)
        entry = softcache.store(cache_dir, shard_key, arrays, {"parts": parts, **stats}, files)
    meta = softcache.read_manifest(entry)["meta"]
    with atomic_dir(out_dir) as tmp:
        softcache.materialize(entry, tmp)
        seconds = time.perf_counter() - start
        write_json(tmp / MANIFEST, {
            "key": key,
            "parts": parts,
            "shard": shard,
            "num_shards": num_shards,
            "cache_hit": hit,
            "seconds": round(seconds, 3),
            "label_seconds": meta["label_seconds"],
            "texts": meta["texts"],
            "rows": meta["rows"],
            "shapes": meta["shapes"],
        })
    texts = sum(meta["texts"].values())
    summary = f"shard {shard + 1}/{num_shards}: " + (
        f"cache hit {shard_key[:8]}…" if hit else f"labelled {texts:,} texts")
    return StepResult("soft_labels_shard", out_dir,
                      {"cache_hit": float(hit), "seconds": seconds, "texts": float(texts)},
                      [out_dir / MANIFEST], summary)


def label_shard(cfg: Config, teacher_dir: Path, prepared_dir: Path, shard: int,
                num_shards: int) -> tuple[dict[str, np.ndarray], dict[str, bytes], dict[str, Any]]:
    """``label_all`` for one shard: the shard's arrays (with ``{name}_rows``), the augmented
    set's files, and stats (texts labelled and rows in the whole split, per name)."""
    tokenizer = load_tokenizer(str(teacher_dir))
    texts, arrays, files = texts_to_label(cfg, teacher_dir, prepared_dir, tokenizer)
    max_length, batch_size = cfg.ingest.max_length, cfg.soft_labels.batch_size
    rows = {name: shard_rows(token_counts(tokenizer, items, max_length) if items
                             else np.zeros(0, np.int64), batch_size, shard, num_shards)
            for name, items in texts.items()}
    model = load_teacher(teacher_dir, read_labels(prepared_dir), cfg.seed)
    started = time.perf_counter()
    # predict() re-sorts these texts by length (stably: they are sorted already) and cuts
    # them into batch_size chunks: every batch but a split's last is full, so the chunks are
    # exactly this shard's batches of the unsharded run.
    labelled = label_texts(model, tokenizer, {name: [texts[name][i] for i in index]
                                              for name, index in rows.items() if index.size},
                           max_length, batch_size, cfg.soft_labels.features)
    label_seconds = time.perf_counter() - started
    for name in rows:  # in run()'s order; a shard may get no batch of a small split
        arrays[f"{name}_logits"] = labelled.get(
            f"{name}_logits", np.zeros((0, model.config.num_labels), np.float32))
        if cfg.soft_labels.features:
            arrays[f"{name}_features"] = labelled.get(
                f"{name}_features", np.zeros((0, model.config.hidden_size), np.float32))
    arrays |= {f"{name}_rows": index for name, index in rows.items()}
    stats = {
        "texts": {name: len(index) for name, index in rows.items()},
        "rows": {name: len(items) for name, items in texts.items()},
        "label_seconds": round(label_seconds, 3),
        "shapes": {name: list(a.shape) for name, a in arrays.items()},
    }
    return arrays, files, stats


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


def _summary(hit: bool, key: str, meta: dict[str, Any]) -> str:
    if hit:
        return f"cache hit {key[:8]}…"
    counts = meta["texts"]
    line = "+".join(f"{counts[name]:,}" for name in SPLITS)
    line = f"labelled {line} texts at {meta['texts_per_second']:,.0f}/s"
    if AUGMENT in counts:
        line += f" (incl. {counts[AUGMENT]:,} augmented)"
    return line


def _parquet_bytes(texts: list[str]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"text": pa.array(texts, pa.string())}), sink)
    return sink.getvalue().to_pybytes()
