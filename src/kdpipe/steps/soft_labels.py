"""soft_labels: the teacher's logits (and [CLS] features) for every split, computed once per
content and cached.

Outputs in ``out_dir`` (replaced atomically), rows in each split's original order:

- ``{train,validation,test}_logits.npy``: float32 ``(rows, num_labels)``;
- ``{train,validation,test}_features.npy``: float32 ``(rows, hidden)``, the last hidden
  layer at position 0 ([CLS]), when ``soft_labels.features``;
- when ``soft_labels.augment.enabled``, the augmented transfer set made from train
  (``kdpipe.training.augment``; no gold labels): ``augment_logits.npy``
  (+ ``augment_features.npy``),
  ``augment_source.npy`` (int64, the train row each variant came from) and
  ``augment_texts.parquet`` (column ``text``);
- when ingest kept texts of ``data.unlabeled``: ``unlabeled_logits.npy`` (+
  ``unlabeled_features.npy``), rows in ``unlabeled.parquet``'s order;
- ``manifest.json``: cache key and its parts, array shapes, cache hit, seconds, texts/s.

The arrays live in a content-addressed cache (``kdpipe.training.softcache``) keyed by the teacher's
weight and tokenizer files, the prepared data's content hash, max_length, the features flag,
the augmentation settings and seed, and ``FORMAT_VERSION``. On a hit no model is loaded;
the arrays are hard-linked (or copied) from the cache into ``out_dir``.

The Kubeflow DAG labels in parallel (``kdpipe.steps.soft_label_shards``): shards of every
split in separate tasks, merged into this same folder, arrays equal byte for byte.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from kdpipe.atomic import atomic_dir, write_json
from kdpipe.config import Config
from kdpipe.data.prepare import SPLITS, UNLABELED, read_labels, read_split
from kdpipe.errors import KdpipeError
from kdpipe.models import teacher as teacher_model
from kdpipe.models.teacher import load_tokenizer
from kdpipe.progress import progress_bar
from kdpipe.step_result import StepResult
from kdpipe.training import softcache
from kdpipe.training.augment import make_variants

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
    hit, meta, seconds = cached(
        cfg, key, key, parts, lambda: label_all(cfg, Path(teacher_dir), Path(prepared_dir)),
        out_dir, start, {"texts_per_second": None})
    accuracy = validation_accuracy(out_dir, Path(prepared_dir))
    metrics = {
        "cache_hit": float(hit),
        "seconds": seconds,
        "texts_per_second": float(meta["texts_per_second"]),
        "teacher_val_accuracy": accuracy,
    }
    return StepResult("soft_labels", out_dir, metrics, [out_dir / MANIFEST],
                      _summary(hit, key, meta))


Labelled = tuple[dict[str, np.ndarray], dict[str, bytes], dict[str, Any]]


def cached(cfg: Config, key: str, entry_key: str, parts: dict[str, Any],
           label: Callable[[], Labelled], out_dir: Path, start: float,
           extra: dict[str, Any]) -> tuple[bool, dict[str, Any], float]:
    """The cache entry ``entry_key`` (made with ``label()`` on a miss) materialised into
    ``out_dir`` with its manifest; ``extra`` adds fields, a None value taken from the
    entry's meta. Returns (cache hit, the entry's meta, seconds since ``start``)."""
    cache_dir = cfg.soft_labels.cache_dir
    entry = softcache.lookup(cache_dir, entry_key)
    hit = entry is not None
    if entry is None:
        arrays, files, stats = label()
        entry = softcache.store(cache_dir, entry_key, arrays, {"parts": parts, **stats}, files)
    meta = softcache.read_manifest(entry)["meta"]
    with atomic_dir(out_dir) as tmp:
        softcache.materialize(entry, tmp)
        seconds = time.perf_counter() - start
        fields = {k: meta[k] if v is None else v for k, v in extra.items()}
        write_json(tmp / MANIFEST, {
            "key": key, "parts": parts, "cache_hit": hit, "seconds": round(seconds, 3),
            "label_seconds": meta["label_seconds"], "texts": meta["texts"],
            "shapes": meta["shapes"], **fields})
    return hit, meta, seconds


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
        # Only when set, so that the keys of single-teacher entries stay what they were.
        **({"assistant": softcache.file_tree_hash(_assistant(cfg.soft_labels.assistant),
                                                  exclude=("distill.json",))}
           if cfg.soft_labels.assistant else {}),
        **({"teachers": [softcache.file_tree_hash(_checkpoint(t), exclude=("training.json",))
                         for t in cfg.soft_labels.teachers],
            "ensemble": cfg.soft_labels.ensemble} if cfg.soft_labels.teachers else {}),
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
    started = time.perf_counter()
    labelled, each = label_with_teachers(cfg, teacher_dir, read_labels(prepared_dir),
                                         tokenizer, texts)
    arrays |= labelled
    label_seconds = time.perf_counter() - started
    total = sum(len(t) for t in texts.values())
    stats = {
        "texts": {name: len(t) for name, t in texts.items()},
        "label_seconds": round(label_seconds, 3),
        "texts_per_second": round(total / max(label_seconds, 1e-9), 1),
        "shapes": {name: list(a.shape) for name, a in arrays.items()},
    }
    if cfg.soft_labels.teachers:
        gold = np.asarray(read_split(prepared_dir / "validation.parquet").labels)
        stats["teachers"] = [
            {"path": path, "val_accuracy": float((np.argmax(
                logits, axis=1) == gold).mean())} for path, logits in each.items()]
    return arrays, files, stats


def label_with_teachers(cfg: Config, teacher_dir: Path, label_names: list[str],
                        tokenizer: Any, texts: dict[str, list[str]],
                        ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``label_texts`` with the teacher (or the assistant that stands in for it) and, when
    ``soft_labels.teachers`` lists more, the ensemble's ``{name}_logits``
    (``ensemble_logits``) in their place; the features stay the first one's. Also each
    teacher's validation logits by path (when validation is labelled and there are several
    teachers), to report how each scores."""
    settings = cfg.soft_labels
    max_length, batch_size = cfg.ingest.max_length, settings.batch_size
    if settings.assistant:
        model, tokenizer = load_assistant(Path(settings.assistant), label_names)
    else:
        model = load_teacher(teacher_dir, label_names, cfg.seed)
    arrays = label_texts(model, tokenizer, texts, max_length, batch_size, settings.features)
    if not settings.teachers:
        return arrays, {}
    del model  # one teacher in memory at a time
    per_teacher = {settings.assistant or str(teacher_dir): arrays}
    for path in settings.teachers:
        other = load_extra_teacher(Path(path), label_names)
        per_teacher[path] = label_texts(other, load_tokenizer(path), texts, max_length,
                                        batch_size, features=False)
    for name in texts:
        arrays[f"{name}_logits"] = ensemble_logits(
            [labelled[f"{name}_logits"] for labelled in per_teacher.values()],
            settings.ensemble)
    each = {path: labelled["validation_logits"] for path, labelled in per_teacher.items()
            if "validation_logits" in labelled}
    return arrays, each


def load_assistant(folder: Path, label_names: list[str]) -> tuple[Any, Any]:
    """The teacher assistant of ``soft_labels.assistant`` (a transformer student folder) as
    a sequence classifier, float32, eval mode, and its tokenizer."""
    import torch

    from kdpipe.models.students import load_student, load_student_tokenizer

    where = f"soft_labels.assistant: {_assistant(str(folder))}"
    student = load_student(folder)
    if student.arch != "transformer":
        raise KdpipeError(f"{where}: a {student.arch} student; an assistant must be a "
                          "transformer student (student.arch=transformer): it is read as a "
                          "teacher, features included")
    model = student.model
    if model.config.num_labels != len(label_names):
        raise KdpipeError(f"{where}: {model.config.num_labels} classes, the data has "
                          f"{len(label_names)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device, dtype=torch.float32).eval(), load_student_tokenizer(folder)


def _assistant(path: str) -> Path:
    """``soft_labels.assistant``, checked to be a saved student's folder."""
    if not (Path(path) / "student.json").is_file():
        raise KdpipeError(f"soft_labels.assistant: {path}: not a student folder (no "
                          "student.json); point it at the student/ of a run with "
                          "student.arch=transformer")
    return Path(path)


def _checkpoint(path: str) -> Path:
    """``path`` of ``soft_labels.teachers``, checked to be a checkpoint folder."""
    if not (Path(path) / "config.json").is_file():
        raise KdpipeError(f"soft_labels.teachers: {path}: not a checkpoint folder (no "
                          "config.json)")
    return Path(path)


def ensemble_logits(logits: list[np.ndarray], how: str = "mean") -> np.ndarray:
    """Several teachers' logits (each (n, C)) as one: the log of the combined distribution,
    float32, so that ``softmax`` of it gives the combination back. ``mean``: the average of
    the teachers' distributions; ``confidence``: each teacher weighted, per row, by its top
    probability (a sure teacher counts more on that text)."""
    probs = []
    for z in logits:
        z = np.asarray(z, np.float64)
        e = np.exp(z - z.max(axis=1, keepdims=True))
        probs.append(e / e.sum(axis=1, keepdims=True))
    stacked = np.stack(probs)  # (T, n, C)
    if how == "mean":
        combined = stacked.mean(axis=0)
    elif how == "confidence":
        weights = stacked.max(axis=2, keepdims=True)  # (T, n, 1)
        combined = (weights * stacked).sum(axis=0) / weights.sum(axis=0)
    else:
        raise ValueError(f"how: expected 'mean' or 'confidence', got {how!r}")
    return np.log(np.maximum(combined, np.finfo(np.float64).tiny)).astype(np.float32)


def load_extra_teacher(path: Path, label_names: list[str]) -> Any:
    """A teacher of ``soft_labels.teachers``: fine-tuned for these labels, in their order
    (its config's label names must match where it names them), float32, eval mode."""
    import torch
    from transformers import AutoConfig

    where = f"soft_labels.teachers: {_checkpoint(str(path))}"
    named = AutoConfig.from_pretrained(path).id2label or {}
    names = [named[i] for i in sorted(named)]
    generic = all(str(n).startswith("LABEL_") for n in names)
    if names and not generic and names != list(label_names):
        raise KdpipeError(f"{where}: its labels {names} are not the data's {label_names} "
                          "(in this order)")
    model, report = teacher_model.load_teacher(str(path), label_names)
    if report["mismatched"] or report["missing"]:
        raise KdpipeError(f"{where}: no fine-tuned head for the {len(label_names)} classes of "
                          "the data (fine-tune it first, e.g. `kdpipe teacher` with another "
                          "seed and work_dir)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device, dtype=torch.float32).eval()


def texts_to_label(cfg: Config, teacher_dir: Path, prepared_dir: Path, tokenizer: Any,
                   ) -> tuple[dict[str, list[str]], dict[str, np.ndarray], dict[str, bytes]]:
    """The texts of every split, the unlabeled ones (when ingest kept any) and, when
    ``soft_labels.augment.enabled``, the augmented set made from train, with the arrays
    (``augment_source``) and files (``augment_texts.parquet``) that describe the augmented
    set."""
    texts = {name: read_split(prepared_dir / f"{name}.parquet").texts for name in SPLITS}
    unlabeled = read_unlabeled(prepared_dir)
    if unlabeled:
        texts[UNLABELED] = unlabeled
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


def read_unlabeled(prepared_dir: Path) -> list[str]:
    """The unlabeled texts ingest kept (none for a folder from before they existed)."""
    path = Path(prepared_dir) / f"{UNLABELED}.parquet"
    return read_split(path).texts if path.exists() else []


def transfer_parts(cfg: Config, arrays: dict[str, np.ndarray]) -> list[str]:
    """The transfer set's parts, in their row order: train, then the augmented texts, then
    the unlabeled ones, each where soft_labels made it and fractionate includes it. The one
    order fractionate's row ids and distill's rows both follow."""
    parts = ["train"]
    if f"{AUGMENT}_logits" in arrays and cfg.fractionate.include_augmented:
        parts.append(AUGMENT)
    if f"{UNLABELED}_logits" in arrays and cfg.fractionate.include_unlabeled:
        parts.append(UNLABELED)
    return parts


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


def _summary(hit: bool, key: str, meta: dict[str, Any]) -> str:
    if hit:
        return f"cache hit {key[:8]}…"
    counts = meta["texts"]
    line = "+".join(f"{counts[name]:,}" for name in SPLITS)
    line = f"labelled {line} texts at {meta['texts_per_second']:,.0f}/s"
    extra = [f"{counts[name]:,} {what}" for name, what in ((AUGMENT, "augmented"),
                                                           (UNLABELED, "unlabeled"))
             if name in counts]
    if extra:
        line += f" (incl. {' and '.join(extra)})"
    return line


def _parquet_bytes(texts: list[str]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"text": pa.array(texts, pa.string())}), sink)
    return sink.getvalue().to_pybytes()
