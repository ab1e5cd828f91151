"""Turn raw splits into clean, labeled, split data: normalise, check, map labels to ids,
make missing splits (stratified), and find duplicates.

Each check raises ``DataError`` naming the origin (file or split) and row, because a user with
a 67k-row file needs to know exactly which line to fix.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdpipe.config import IngestConfig, NormalizeConfig
from kdpipe.data.readers import RawSplit
from kdpipe.errors import DataError

SPLITS = ("train", "validation", "test")
UNLABELED = "unlabeled"  # prepared/unlabeled.parquet: data.unlabeled's texts, label -1
_MISSING_LABELS = {"", "nan", "none", "null", "na", "n/a"}
_INTEGER = re.compile(r"-?\d+")


@dataclass
class Split:
    """One clean split: texts and integer label ids."""

    texts: list[str]
    labels: list[int]


@dataclass
class Prepared:
    splits: dict[str, Split]
    label_names: list[str]
    report: dict[str, Any] = field(default_factory=dict)
    unlabeled: list[str] = field(default_factory=list)  # data.unlabeled, checked and deduplicated

    def content_hash(self) -> str:
        """sha256 of the label names, every (split, text, label) and the unlabeled texts:
        independent of how the files are encoded, so the same data always gets the same hash
        (and data without unlabeled texts the hash it had before they existed)."""
        digest = hashlib.sha256(json.dumps(self.label_names).encode())
        for name in SPLITS:
            split = self.splits[name]
            digest.update(f"\x00{name}\x00{len(split.texts)}".encode())
            for text, label in zip(split.texts, split.labels, strict=True):
                digest.update(json.dumps([text, label], ensure_ascii=False).encode())
        if self.unlabeled:
            digest.update(f"\x00{UNLABELED}\x00{len(self.unlabeled)}".encode())
            for text in self.unlabeled:
                digest.update(json.dumps(text, ensure_ascii=False).encode())
        return digest.hexdigest()


def prepare(raw: dict[str, RawSplit], cfg: IngestConfig, seed: int,
            label_names: list[str] | None = None) -> Prepared:
    """Check and convert ``raw`` (train, optional validation/test) into a ``Prepared``."""
    texts = {name: clean_texts(split, cfg.normalize) for name, split in raw.items()}
    labels = {name: canonical_labels(split) for name, split in raw.items()}
    given = label_names or raw["train"].label_names
    lookup = label_vocabulary(labels["train"], raw["train"].origin, given)
    vocabulary = list(given) if given else list(lookup)
    splits = {name: Split(texts[name], label_ids(labels[name], raw[name], lookup)) for name in raw}
    created = [name for name in SPLITS if name not in splits]
    splits = make_missing_splits(splits, cfg, seed, vocabulary)
    report = {"created_splits": created, "duplicates": find_duplicates(splits)}
    if cfg.drop_duplicates:
        report["dropped_from_train"] = drop_train_duplicates(splits)
    for name in SPLITS:
        if not splits[name].texts:
            origin = raw[name].origin if name in raw else f"{name} split"
            raise DataError(f"{origin}: no rows left in the {name} split")
    return Prepared(splits, vocabulary, report)


def prepare_unlabeled(raw: RawSplit, cfg: NormalizeConfig,
                      splits: dict[str, Split]) -> tuple[list[str], dict[str, Any]]:
    """``raw``'s texts checked and normalised as the labelled ones are, without repeats and
    without any text of train, validation or test: a text under evaluation must not reach
    the student through the back door, and one in train has its gold label already. Returns
    the texts kept (first occurrence order) and how many went for each reason."""
    texts = clean_texts(raw, cfg)
    held = {name: set(splits[name].texts) for name in SPLITS}
    seen: set[str] = set()
    kept: list[str] = []
    dropped = {"repeated": 0, **{f"in_{name}": 0 for name in SPLITS}}
    for text in texts:
        where = next((name for name in ("validation", "test", "train") if text in held[name]),
                     None)
        if where is not None:
            dropped[f"in_{where}"] += 1
        elif text in seen:
            dropped["repeated"] += 1
        else:
            seen.add(text)
            kept.append(text)
    if not kept:
        raise DataError(f"{raw.origin}: no unlabeled text left after dropping repeats and "
                        f"texts of train/validation/test ({dropped}) (data.unlabeled)")
    return kept, {"rows_read": len(texts), "rows": len(kept), "dropped": dropped}


def normalize(text: str, cfg: NormalizeConfig) -> str:
    if cfg.unicode_form:
        text = unicodedata.normalize(cfg.unicode_form, text)
    if cfg.collapse_whitespace:
        text = re.sub(r"\s+", " ", text)
    if cfg.strip:
        text = text.strip()
    if cfg.lowercase:
        text = text.lower()
    return text


def clean_texts(split: RawSplit, cfg: NormalizeConfig) -> list[str]:
    if not split.texts:
        raise DataError(f"{split.origin}: no rows")
    out = []
    for row, text in zip(split.rows, split.texts, strict=True):
        if text is None or (isinstance(text, float) and math.isnan(text)):
            raise DataError(f"{split.origin}: row {row}: text is missing")
        if not isinstance(text, str):
            raise DataError(f"{split.origin}: row {row}: text is not a string ({text!r})")
        if not text.strip():
            raise DataError(f"{split.origin}: row {row}: text is empty or whitespace only")
        out.append(normalize(text, cfg))
    return out


def canonical_labels(split: RawSplit) -> list[str]:
    """Labels as strings; integral floats (1.0, from a column with gaps) become '1'."""
    out = []
    for row, label in zip(split.rows, split.labels, strict=True):
        if isinstance(label, bool):
            label = int(label)
        if isinstance(label, float):
            if math.isnan(label):
                raise DataError(f"{split.origin}: row {row}: label is missing (NaN)")
            label = int(label) if label.is_integer() else label
        text = str(label).strip() if label is not None else ""
        if text.lower() in _MISSING_LABELS:
            raise DataError(f"{split.origin}: row {row}: label is missing ({label!r})")
        out.append(text)
    return out


def label_vocabulary(train: list[str], origin: str, names: list[str] | None) -> dict[str, int]:
    """Map each canonical train label to its id; the dict's order is id order.

    Integer labels keep their numeric order (and with ``names``, label i is names[i]); string
    labels are sorted, or ordered as ``names`` lists them.
    """
    seen = sorted(set(train))
    if len(seen) < 2:
        only = seen[0] if seen else "none"
        raise DataError(f"{origin}: only one class ({only!r}) in train; need at least two")
    if all(_INTEGER.fullmatch(label) for label in seen):
        values = sorted(int(label) for label in seen)
        if names is None:
            return {str(v): i for i, v in enumerate(values)}
        bad = [v for v in values if not 0 <= v < len(names)]
        if bad:
            raise DataError(
                f"{origin}: label {bad[0]} has no entry in data.label_names ({len(names)} names)"
            )
        return {str(v): v for v in range(len(names))}
    if names is None:
        return {label: i for i, label in enumerate(seen)}
    missing = [label for label in seen if label not in names]
    if missing:
        raise DataError(f"{origin}: label {missing[0]!r} is not in data.label_names")
    return {label: i for i, label in enumerate(names)}


def label_ids(labels: list[str], split: RawSplit, lookup: dict[str, int]) -> list[int]:
    out = []
    for row, label in zip(split.rows, labels, strict=True):
        if label not in lookup:
            raise DataError(f"{split.origin}: row {row}: label {label!r} never seen in train")
        out.append(lookup[label])
    return out


def make_missing_splits(splits: dict[str, Split], cfg: IngestConfig, seed: int,
                        names: list[str]) -> dict[str, Split]:
    """Carve validation and/or test out of train, stratified by label, when absent.

    Kept rows stay in source order, so the result does not depend on the shuffle.
    """
    from sklearn.model_selection import train_test_split

    out = dict(splits)
    for name, fraction in (("test", cfg.test_fraction), ("validation", cfg.validation_fraction)):
        if name in out:
            continue
        train = out["train"]
        counts = Counter(train.labels)
        rare = min(counts, key=counts.__getitem__)
        if counts[rare] < 2:
            raise DataError(
                f"cannot make a stratified {name} split: class {names[rare]!r} has "
                f"{counts[rare]} example in train; add data or provide a {name} file"
            )
        # Fractions are of the original train size, so carving test first does not shrink
        # the validation share.
        size = max(len(counts), round(fraction * len(splits["train"].texts)))
        try:
            keep, held = train_test_split(
                range(len(train.texts)), test_size=size, stratify=train.labels, random_state=seed
            )
        except ValueError as exc:
            raise DataError(f"cannot make a stratified {name} split: {exc}") from None
        out[name] = _subset(train, sorted(held))
        out["train"] = _subset(train, sorted(keep))
    return out


def _subset(split: Split, index: list[int]) -> Split:
    return Split([split.texts[i] for i in index], [split.labels[i] for i in index])


def find_duplicates(splits: dict[str, Split], examples: int = 5) -> dict[str, Any]:
    """Exact duplicate texts within train (and with conflicting labels) and across splits."""
    train = splits["train"]
    counts = Counter(train.texts)
    repeated = [t for t, c in counts.items() if c > 1]
    labels_of: dict[str, set[int]] = {}
    for text, label in zip(train.texts, train.labels, strict=True):
        labels_of.setdefault(text, set()).add(label)
    conflicting = [t for t in repeated if len(labels_of[t]) > 1]
    report: dict[str, Any] = {
        "train_repeated_rows": sum(counts[t] - 1 for t in repeated),
        "train_conflicting_labels": len(conflicting),
        "examples": repeated[:examples],
    }
    seen = set(train.texts)
    for other in ("validation", "test"):
        report[f"train_{other}_overlap"] = len(seen.intersection(splits[other].texts))
    report["validation_test_overlap"] = len(
        set(splits["validation"].texts).intersection(splits["test"].texts)
    )
    return report


def drop_train_duplicates(splits: dict[str, Split]) -> int:
    """Keep the first of repeated train texts and drop train texts found in validation/test
    (they would leak evaluation data into training). Returns the number of rows dropped."""
    train = splits["train"]
    held_out = set(splits["validation"].texts) | set(splits["test"].texts)
    seen: set[str] = set()
    keep = []
    for i, text in enumerate(train.texts):
        if text not in seen and text not in held_out:
            keep.append(i)
        seen.add(text)
    splits["train"] = _subset(train, keep)
    return len(train.texts) - len(keep)


# Readers of what ingest writes, here rather than in steps/ingest.py so that the steps which
# read prepared data do not import (and, for DVC, depend on) the data sources.
def read_split(path: Path) -> Split:
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["text", "label"])
    return Split(table.column("text").to_pylist(), table.column("label").to_pylist())


def read_labels(prepared_dir: Path) -> list[str]:
    return json.loads((prepared_dir / "labels.json").read_text(encoding="utf-8"))["names"]
