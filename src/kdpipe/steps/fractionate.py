"""fractionate: choose which rows of the transfer set the student learns from, and with what
weight, per epoch.

The transfer set is the train split (ids ``0 .. N-1``, in the prepared order) followed, when
``soft_labels`` made an augmented set and ``fractionate.include_augmented``, by the augmented
texts (ids ``N .. N+M-1``; id ``N + k`` is row k of ``augment_logits.npy``), and then, when
ingest kept texts of ``data.unlabeled`` and ``fractionate.include_unlabeled``, by those
(``unlabeled_logits.npy``'s rows); see ``soft_labels.transfer_parts``.

Strategies (``fractionate.strategy``), all driven by the teacher's cached outputs:

- ``all``: every row, weight 1;
- ``random``: a uniform ``fraction`` (seeded by ``seed``);
- ``entropy``: the ``fraction`` whose teacher distribution has the highest entropy (the texts
  the teacher is least sure of carry the most information about its decision boundary);
- ``margin``: the ``fraction`` with the smallest top-1 minus top-2 teacher probability;
- ``domain``: the ``fraction`` closest to a target domain (``domain_target``: the validation
  texts, or the unlabeled ones) by the teacher's cached [CLS] features: cosine to the
  target's mean direction, or the mean cosine to the ``domain_k`` nearest target texts
  (``domain_score``); by default the closest ``fraction`` of each class
  (``domain_per_class``); the target's labels are never read;
- ``class_balanced``: every row, weighted by the inverse frequency of its class;
- ``dynamic``: per epoch e, the top ``schedule[e]`` of one ranking (``schedule_by``), so the
  epochs' selections are nested prefixes of the same order; the last entry repeats.

A row's class is its gold label for train rows and the teacher's argmax for augmented and
unlabeled rows, which have no gold label (the teacher's answer is the best label they have).

Ties in a ranking go to the lower id (stable sort by score, then id); a kept count is
``max(1, ceil(fraction * n))``; indices are written in ascending order.

Outputs in ``out_dir`` (replaced atomically): for each epoch ``e < E`` (``E = len(schedule)``
for ``dynamic``, else 1) ``epoch_{e:03d}_indices.npy`` (int64 ids) and
``epoch_{e:03d}_weights.npy`` (float32, one per index), and ``report.json``. Read them with
``load(out_dir, epoch)``, which maps epochs past ``E - 1`` to the last one.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kdpipe.atomic import atomic_dir, write_json
from kdpipe.config import Config, FractionateConfig
from kdpipe.data.prepare import read_labels, read_split
from kdpipe.errors import KdpipeError
from kdpipe.step_result import StepResult
from kdpipe.steps import soft_labels

REPORT = "report.json"
# Scores equal up to float rounding are ties (a row and its mirror image, [a, b] and [b, a],
# can differ in the last bit), so they are ordered by id as promised.
_SCORE_DECIMALS = 12


# ---------------------------------------------------------------- scores and rankings


def teacher_entropy(logits: np.ndarray) -> np.ndarray:
    """Entropy (nats) of ``softmax(logits)`` per row: (n, C) -> (n,) float64, in [0, log C]."""
    log_p = _log_softmax(logits)
    return -(np.exp(log_p) * log_p).sum(axis=1)


def teacher_margin(logits: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 probability of ``softmax(logits)`` per row: (n, C) -> (n,) float64,
    in [0, 1]; 1 when C = 1."""
    p = np.exp(_log_softmax(logits))
    if p.shape[1] < 2:
        return np.ones(p.shape[0])
    top2 = np.partition(p, p.shape[1] - 2, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def rank_entropy(logits: np.ndarray) -> np.ndarray:
    """All row ids, highest teacher entropy first (ties: lower id first)."""
    return _rank(-teacher_entropy(logits))


def rank_margin(logits: np.ndarray) -> np.ndarray:
    """All row ids, smallest teacher margin first (ties: lower id first)."""
    return _rank(teacher_margin(logits))


def rank_random(n: int, rng: np.random.Generator) -> np.ndarray:
    """All row ids in a random order drawn from ``rng``."""
    return rng.permutation(n).astype(np.int64)


def domain_similarity(features: np.ndarray, target: np.ndarray, score: str = "centroid",
                      k: int = 10, chunk: int = 4096) -> np.ndarray:
    """How close each row is to the target domain, by the teacher's [CLS] features.

    features: (n, H), target: (m, H); both L2-normalised per row first. ``score="centroid"``:
    the cosine of each row to the target's mean direction (the normalised mean of the
    normalised target rows). ``"knn"``: the mean cosine to its ``min(k, m)`` most similar
    target rows, a density that also favours rows near a small cluster of the target. (n,)
    float64; rows are scored ``chunk`` at a time so memory stays ``chunk * m``.
    """
    rows, goal = _unit(np.asarray(features, np.float64)), _unit(np.asarray(target, np.float64))
    if not len(goal):
        raise ValueError("target: no rows")
    if score == "centroid":
        return rows @ _unit(goal.mean(axis=0, keepdims=True))[0]
    if score != "knn":
        raise ValueError(f"score: expected 'centroid' or 'knn', got {score!r}")
    k = min(k, len(goal))
    out = np.empty(len(rows))
    for start in range(0, len(rows), chunk):
        sims = rows[start:start + chunk] @ goal.T
        out[start:start + chunk] = np.partition(sims, -k, axis=1)[:, -k:].mean(axis=1)
    return out


def rank_domain(similarity: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
    """All row ids, closest to the target domain first (ties: lower id first). With
    ``labels``, by closeness within the row's class: a row's score is the share of its class
    closer than it, so any prefix keeps about that share of every class (the classes' balance
    stays as it was)."""
    similarity = np.asarray(similarity, dtype=np.float64)
    if labels is None:
        return _rank(-similarity)
    labels = np.asarray(labels)
    score = np.empty(len(similarity))
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        order = rows[_rank(-similarity[rows])]
        score[order] = np.arange(len(rows)) / len(rows)
    return _rank(score)


# ---------------------------------------------------------------- selections


def keep_count(n: int, fraction: float) -> int:
    """Rows kept of ``n``: ``ceil(fraction * n)``, at least 1, at most n."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction: expected in (0, 1], got {fraction}")
    # round first: 0.07 * 100 is 7.000000000000001 in floating point, and must keep 7
    return min(n, max(1, math.ceil(round(fraction * n, 9))))


def top(order: np.ndarray, fraction: float) -> np.ndarray:
    """The first ``keep_count(len(order), fraction)`` ids of ``order``, sorted ascending."""
    return np.sort(np.asarray(order, dtype=np.int64)[:keep_count(len(order), fraction)])


def select_all(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.int64)


def select_random(n: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    return top(rank_random(n, rng), fraction)


def select_entropy(logits: np.ndarray, fraction: float) -> np.ndarray:
    """The ``fraction`` of rows with the highest teacher entropy (most uncertain)."""
    return top(rank_entropy(logits), fraction)


def select_margin(logits: np.ndarray, fraction: float) -> np.ndarray:
    """The ``fraction`` of rows with the smallest teacher margin (closest to a tie)."""
    return top(rank_margin(logits), fraction)


def class_balanced_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Per-row weight ``∝ 1 / count(class of the row)``, scaled to mean 1: (n,) float32.

    With K classes present, row i of class c gets ``n / (K * count_c)``, so every present
    class carries the same total weight ``n / K``.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels: expected ids in 0..{num_classes - 1}")
    counts = np.bincount(labels, minlength=num_classes)
    raw = 1.0 / counts[labels]
    return (raw * (len(labels) / raw.sum())).astype(np.float32)


def dynamic(schedule: Sequence[float], order: np.ndarray) -> list[np.ndarray]:
    """Per epoch e, the top ``schedule[e]`` of ``order`` (a ranking, best first), sorted."""
    return [top(order, fraction) for fraction in schedule]


Ranking = Callable[[np.ndarray, np.random.Generator, "np.ndarray | None",
                     "np.ndarray | None"], np.ndarray]
RANKINGS: dict[str, Ranking] = {
    "entropy": lambda logits, rng, domain, labels: rank_entropy(logits),
    "margin": lambda logits, rng, domain, labels: rank_margin(logits),
    "random": lambda logits, rng, domain, labels: rank_random(len(logits), rng),
    "domain": lambda logits, rng, domain, labels: rank_domain(_needed(domain), labels),
}


def plan(cfg: FractionateConfig, logits: np.ndarray, labels: np.ndarray, num_classes: int,
         seed: int, domain: np.ndarray | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(indices, weights)`` per epoch for ``cfg.strategy`` over the transfer set.

    logits: (n, C) teacher logits; labels: (n,) the rows' classes (see the module docstring);
    domain: (n,) ``domain_similarity`` of the rows, for the ``domain`` ranking.
    """
    n = len(logits)
    rng = np.random.default_rng(seed)
    if cfg.strategy == "all":
        return [(select_all(n), np.ones(n, dtype=np.float32))]
    if cfg.strategy == "class_balanced":
        return [(select_all(n), class_balanced_weights(labels, num_classes))]
    by_class = labels if cfg.domain_per_class else None
    if cfg.strategy == "dynamic":
        chosen = dynamic(cfg.schedule, RANKINGS[cfg.schedule_by](logits, rng, domain, by_class))
    else:
        chosen = [top(RANKINGS[cfg.strategy](logits, rng, domain, by_class), cfg.fraction)]
    return [(idx, np.ones(len(idx), dtype=np.float32)) for idx in chosen]


def uses_domain(cfg: FractionateConfig) -> bool:
    return cfg.strategy == "domain" or (cfg.strategy == "dynamic" and cfg.schedule_by == "domain")


def _needed(domain: np.ndarray | None) -> np.ndarray:
    if domain is None:
        raise ValueError("the domain ranking needs the rows' domain_similarity")
    return domain


# ---------------------------------------------------------------- the step


@dataclass
class TransferSet:
    """The rows to select from: train, then (optionally) augmented, then unlabeled."""

    logits: np.ndarray  # (n, C) float32
    labels: np.ndarray  # (n,) int64: gold for train rows, else the teacher's argmax
    rows: dict[str, int]  # rows per part, in order (soft_labels.transfer_parts)
    label_names: list[str]

    @property
    def train_rows(self) -> int:
        return self.rows["train"]


def transfer_set(cfg: Config, soft_labels_dir: Path, prepared_dir: Path) -> TransferSet:
    """Read the teacher's logits and the gold labels into one ``TransferSet``."""
    arrays = soft_labels.load(soft_labels_dir)
    names = read_labels(prepared_dir)
    gold = np.asarray(read_split(prepared_dir / "train.parquet").labels, dtype=np.int64)
    train = np.asarray(arrays["train_logits"], dtype=np.float32)
    if train.shape != (len(gold), len(names)):
        raise KdpipeError(
            f"{soft_labels_dir}: train logits {train.shape} do not fit the prepared data "
            f"({len(gold)} rows, {len(names)} classes); run `kdpipe soft-labels` again")
    parts, labels, rows = [train], [gold], {"train": len(train)}
    for name in soft_labels.transfer_parts(cfg, arrays)[1:]:
        extra = np.asarray(arrays[f"{name}_logits"], dtype=np.float32)
        parts.append(extra)
        labels.append(np.argmax(extra, axis=1).astype(np.int64))
        rows[name] = len(extra)
    logits = np.concatenate(parts)
    if not np.isfinite(logits).all():
        raise KdpipeError(f"{soft_labels_dir}: the teacher's logits hold NaN or inf; "
                          "check the teacher and run `kdpipe soft-labels` again")
    return TransferSet(logits, np.concatenate(labels), rows, names)


def domain_scores(cfg: Config, soft_labels_dir: Path, data: TransferSet) -> np.ndarray:
    """``domain_similarity`` of every transfer row (in ``data``'s order) to
    ``fractionate.domain_target``, from the teacher's cached [CLS] features."""
    settings = cfg.fractionate
    arrays = soft_labels.load(soft_labels_dir)
    target = f"{settings.domain_target}_features"
    parts = [f"{name}_features" for name in data.rows]
    missing = [name for name in (target, *parts) if name not in arrays]
    if missing:
        if settings.domain_target == "unlabeled" and "unlabeled_logits" not in arrays:
            raise KdpipeError("fractionate.domain_target=unlabeled: there are no unlabeled "
                              "texts; set data.unlabeled")
        raise KdpipeError(f"fractionate: the domain ranking needs the teacher's features "
                          f"({', '.join(missing)} missing in {soft_labels_dir}); set "
                          "soft_labels.features=true")
    features = np.concatenate([np.asarray(arrays[name]) for name in parts])
    return domain_similarity(features, np.asarray(arrays[target]), settings.domain_score,
                             settings.domain_k)


def run(cfg: Config, soft_labels_dir: Path, prepared_dir: Path, out_dir: Path) -> StepResult:
    """Select rows of the transfer set from ``soft_labels_dir`` + ``prepared_dir`` into
    ``out_dir``. Metrics (epoch 0): ``kept_fraction``, ``kept_rows``, ``mean_entropy_kept``
    (and ``mean_domain_similarity_kept`` when the domain ranking is used)."""
    data = transfer_set(cfg, Path(soft_labels_dir), Path(prepared_dir))
    domain = (domain_scores(cfg, Path(soft_labels_dir), data) if uses_domain(cfg.fractionate)
              else None)
    epochs = plan(cfg.fractionate, data.logits, data.labels, len(data.label_names), cfg.seed,
                  domain)
    report = make_report(cfg, data, epochs, _soft_labels_key(Path(soft_labels_dir)), domain)
    with atomic_dir(out_dir) as tmp:
        for e, (indices, weights) in enumerate(epochs):
            np.save(tmp / f"epoch_{e:03d}_indices.npy", indices.astype(np.int64))
            np.save(tmp / f"epoch_{e:03d}_weights.npy", weights.astype(np.float32))
        write_json(tmp / REPORT, report)
    first = report["per_epoch"][0]
    metrics = {
        "kept_fraction": float(first["kept_fraction"]),
        "kept_rows": float(first["count"]),
        "mean_entropy_kept": float(first["mean_entropy_after"]),
    }
    if domain is not None:
        metrics["mean_domain_similarity_kept"] = float(first["mean_domain_similarity_after"])
    return StepResult("fractionate", Path(out_dir), metrics, [Path(out_dir) / REPORT],
                      _summary(cfg.fractionate, report))


def make_report(cfg: Config, data: TransferSet, epochs: list[tuple[np.ndarray, np.ndarray]],
                soft_labels_key: str | None,
                domain: np.ndarray | None = None) -> dict[str, Any]:
    settings = cfg.fractionate
    entropy = teacher_entropy(data.logits)
    before = _histogram(data.labels, data.label_names)
    per_epoch = []
    ranges = _part_ranges(data.rows)
    for e, (indices, weights) in enumerate(epochs):
        per_epoch.append({
            "epoch": e,
            "kept_fraction": round(len(indices) / len(data.logits), 6),
            "count": len(indices),
            **{f"{what}_kept": _kept(indices, ranges.get(name)) for name, what in _EXTRA},
            "class_histogram_before": before,
            "class_histogram_after": _histogram(data.labels[indices], data.label_names),
            "mean_entropy_before": round(float(entropy.mean()), 6),
            "mean_entropy_after": round(float(entropy[indices].mean()), 6),
            "weights": {"min": round(float(weights.min()), 6),
                        "max": round(float(weights.max()), 6)},
            **({} if domain is None else {
                "mean_domain_similarity_before": round(float(domain.mean()), 6),
                "mean_domain_similarity_after": round(float(domain[indices].mean()), 6)}),
        })
    return {
        "strategy": settings.strategy,
        "settings": settings.model_dump(mode="json"),
        "seed": cfg.seed,
        "rows": {"train": data.train_rows,
                 **{what: data.rows.get(name, 0) for name, what in _EXTRA},
                 "total": len(data.logits)},
        "class_source": "gold label for train rows, teacher argmax for augmented and "
                        "unlabeled rows",
        "soft_labels_key": soft_labels_key,
        "epochs": len(epochs),
        "per_epoch": per_epoch,
    }


# The parts after train, as the report names them (0 rows when absent).
_EXTRA = ((soft_labels.AUGMENT, "augmented"), (soft_labels.UNLABELED, "unlabeled"))


def _part_ranges(rows: dict[str, int]) -> dict[str, tuple[int, int]]:
    """Each part's ids, [start, end), in the transfer set's order."""
    out, start = {}, 0
    for name, n in rows.items():
        out[name] = (start, start + n)
        start += n
    return out


def _kept(indices: np.ndarray, ids: tuple[int, int] | None) -> int:
    """How many of ``indices`` fall in ``ids`` ([start, end); None: the part is absent)."""
    return 0 if ids is None else int(((indices >= ids[0]) & (indices < ids[1])).sum())


def epoch_sizes(out_dir: Path) -> list[int]:
    """Rows of each epoch written (the last repeats past the end, as in ``load``), read from
    the index files' headers only."""
    out_dir = Path(out_dir)
    return [len(np.load(out_dir / f"epoch_{e:03d}_indices.npy", mmap_mode="r",
                        allow_pickle=False)) for e in range(_epochs_written(out_dir))]


def _epochs_written(out_dir: Path) -> int:
    try:
        return json.loads((out_dir / REPORT).read_text(encoding="utf-8"))["epochs"]
    except FileNotFoundError:
        raise KdpipeError(f"{out_dir}: no {REPORT}; run `kdpipe fractionate` first") from None


def load(out_dir: Path, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """``(indices int64, weights float32)`` for ``epoch`` (0-based); epochs past the last one
    written reuse the last, as a dynamic schedule's last entry repeats."""
    if epoch < 0:
        raise ValueError(f"epoch: expected >= 0, got {epoch}")
    out_dir = Path(out_dir)
    e = min(epoch, _epochs_written(out_dir) - 1)
    indices = np.load(out_dir / f"epoch_{e:03d}_indices.npy", allow_pickle=False)
    weights = np.load(out_dir / f"epoch_{e:03d}_weights.npy", allow_pickle=False)
    if indices.shape != weights.shape:
        raise KdpipeError(f"{out_dir}: epoch {e} has {len(indices)} indices but "
                          f"{len(weights)} weights; run `kdpipe fractionate` again")
    return indices, weights


# ---------------------------------------------------------------- helpers


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] < 1:
        raise ValueError(f"logits: expected (n, C), got shape {z.shape}")
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _unit(rows: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 (a zero row stays zero)."""
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.where(norms > 0, norms, 1.0)


def _rank(score: np.ndarray) -> np.ndarray:
    """Ids by ascending score; a stable sort, so equal scores keep ascending id order."""
    return np.argsort(np.round(score, _SCORE_DECIMALS), kind="stable").astype(np.int64)


def _histogram(labels: np.ndarray, names: list[str]) -> dict[str, int]:
    counts = np.bincount(labels, minlength=len(names))
    return {name: int(counts[i]) for i, name in enumerate(names)}


def _soft_labels_key(soft_labels_dir: Path) -> str | None:
    # Recorded so the distill step can tell a selection made from other soft labels.
    try:
        return json.loads((soft_labels_dir / soft_labels.MANIFEST).read_text("utf-8"))["key"]
    except (FileNotFoundError, KeyError, ValueError):
        return None


def _summary(settings: FractionateConfig, report: dict[str, Any]) -> str:
    first, total = report["per_epoch"][0], report["rows"]["total"]
    name = settings.strategy
    if name == "dynamic":
        name = f"dynamic by {settings.schedule_by}"
    line = f"{name}: kept {first['count']:,} of {total:,} ({first['kept_fraction']:.0%})"
    if name.startswith("dynamic"):
        line += " in epoch 0; schedule " + " → ".join(f"{f:.0%}" for f in settings.schedule)
    elif name == "class_balanced":
        line += f", weights {first['weights']['min']:.3g}..{first['weights']['max']:.3g}"
    if "mean_domain_similarity_after" in first:
        line += (f", similarity to {settings.domain_target} "
                 f"{first['mean_domain_similarity_after']:.3f} "
                 f"(all {first['mean_domain_similarity_before']:.3f})")
    return line
