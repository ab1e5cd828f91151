"""A content-addressed cache of arrays, shared by runs: an entry is computed once per key.

Layout: ``<cache_dir>/<key>/`` holds the entry's files (``.npy`` arrays, optionally other
files) and ``manifest.json``::

    {"format": 1, "key": "<key>", "meta": {...caller's, e.g. the key parts...},
     "files": {"<name>": {"sha256": "...", "size": 123}, ...}}

``key`` is the sha256 of the canonical JSON of the parts that determine the content
(``cache_key``). An entry is published by one atomic rename, so it is either whole or
absent; ``lookup`` re-checks every file against the manifest, so a damaged entry (a bad
disk, a hand edit, a writer to a hard-linked copy) is found, removed and recomputed
instead of silently feeding wrong numbers downstream.
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from kdpipe.atomic import atomic_dir
from kdpipe.errors import KdpipeError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = 1
# Files that decide what a Hugging Face checkpoint computes: weights, configs (model,
# tokenizer, special tokens) and vocabularies. READMEs, licences and the like are left out.
CHECKPOINT_PATTERNS = ("*.safetensors", "*.json", "vocab.txt", "merges.txt", "*.model",
                       "*.tiktoken")
_KEY = re.compile(r"[0-9a-f]{64}")
# Hidden leftovers (a staging folder of a writer that crashed, an entry moved aside for
# deletion) older than this are swept by the next store.
_STALE_SECONDS = 24 * 3600


def cache_key(parts: Mapping[str, Any]) -> str:
    """sha256 (hex) of ``parts`` as canonical JSON: sorted keys, no whitespace, UTF-8.

    Equal parts give equal keys whatever the dict order; values must be JSON types.
    """
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def file_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def file_tree_hash(folder: Path, patterns: Iterable[str] = CHECKPOINT_PATTERNS,
                   exclude: Iterable[str] = ()) -> str:
    """sha256 (hex) over the files under ``folder`` whose name matches one of ``patterns``.

    Each file counts by its path relative to ``folder`` and the sha256 of its bytes, so the
    hash follows the content and not where the folder lives (a copy, a moved folder and a
    Hugging Face snapshot of symlinks hash alike). Hidden files and folders are skipped.
    Names matching ``exclude`` (reports such as ``training.json``) are skipped.
    Raises ``KdpipeError`` if ``folder`` is not a folder or no file matches.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise KdpipeError(f"{folder}: not a folder")
    patterns = tuple(patterns)
    exclude = tuple(exclude)
    files = sorted(
        path.relative_to(folder).as_posix() for path in folder.rglob("*")
        if path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
        and any(fnmatch.fnmatchcase(path.name, p) for p in patterns)
        and not any(fnmatch.fnmatchcase(path.name, p) for p in exclude)
    )
    if not files:
        raise KdpipeError(f"{folder}: no files matching {', '.join(patterns)}")
    digest = hashlib.sha256()
    for name in files:
        digest.update(f"{name}\x00{file_sha256(folder / name)}\x00".encode())
    return digest.hexdigest()


def lookup(cache_dir: Path, key: str) -> Path | None:
    """The entry folder for ``key`` if it exists and every file matches its manifest.

    A corrupted entry (unreadable manifest, a file missing, a size or sha256 mismatch) is
    logged as a warning and deleted, and ``None`` is returned, as for a missing one.
    """
    entry = Path(cache_dir) / _checked(key)
    if not entry.is_dir():
        return None
    problem = _verify(entry, key)
    if problem is None:
        return entry
    log.warning("soft-label cache entry %s is corrupted (%s); removing it", entry, problem)
    _remove(entry)
    return None


def store(cache_dir: Path, key: str, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any],
          files: Mapping[str, bytes] | None = None) -> Path:
    """Write an entry for ``key`` and return its folder.

    ``arrays`` are saved as ``<name>.npy`` (``np.save``, no pickled objects); ``files`` are
    extra files written as given bytes (e.g. a Parquet table); ``meta`` (JSON) goes into
    the manifest with each file's sha256 and size. The entry is built in a hidden folder
    (``atomic_dir``, so a crash mid-write leaves no entry) and published by one rename. If
    another writer published the same key first, its entry is kept and this one dropped:
    an entry that exists is never replaced, so readers never see it vanish.
    """
    cache_dir = Path(cache_dir)
    target = cache_dir / _checked(key)
    staged = cache_dir / f".{key}.staged-{os.getpid()}-{time.monotonic_ns()}"
    _sweep_stale(cache_dir)
    for name in [*arrays, *(files or {})]:
        if Path(name).name != name or name.startswith(".") or name == MANIFEST:
            raise ValueError(f"not a plain file name for a cache entry: {name!r}")
    with atomic_dir(staged) as tmp:
        listing = {}
        for name, array in arrays.items():
            path = tmp / f"{name}.npy"
            np.save(path, np.ascontiguousarray(array), allow_pickle=False)
            listing[path.name] = _describe(path)
        for name, blob in (files or {}).items():
            path = tmp / name
            path.write_bytes(blob)
            listing[name] = _describe(path)
        manifest = {"format": FORMAT, "key": key, "meta": dict(meta), "files": listing}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n",
                                    encoding="utf-8")
    try:
        # rename(2) onto a non-empty folder fails, so of two writers exactly one wins.
        os.rename(staged, target)
    except OSError as exc:
        shutil.rmtree(staged, ignore_errors=True)
        if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not target.is_dir():
            raise
        log.info("cache entry %s was stored concurrently; keeping the existing one", key[:12])
    return target


def read_manifest(entry: Path) -> dict[str, Any]:
    """The manifest of an entry folder (``format``, ``key``, ``meta``, ``files``)."""
    return json.loads((Path(entry) / MANIFEST).read_text(encoding="utf-8"))


def materialize(entry: Path, out_dir: Path) -> list[str]:
    """Put the entry's files (not its manifest) into ``out_dir``: hard links where the file
    system allows (no second copy on disk), copies otherwise (e.g. across devices).

    Returns the file names. Readers must not write to the files: a hard link shares the
    bytes with the cache (a change would be caught as corruption by the next lookup).
    """
    names = sorted(read_manifest(entry)["files"])
    for name in names:
        try:
            os.link(entry / name, out_dir / name)
        except OSError:
            shutil.copyfile(entry / name, out_dir / name)
    return names


def _checked(key: str) -> str:
    # The key names a folder: anything but a sha256 hex digest could escape cache_dir.
    if not _KEY.fullmatch(key):
        raise ValueError(f"not a cache key (64 lowercase hex digits): {key!r}")
    return key


def _describe(path: Path) -> dict[str, Any]:
    return {"sha256": file_sha256(path), "size": path.stat().st_size}


def _verify(entry: Path, key: str) -> str | None:
    """Why the entry is not intact, or None when it is."""
    try:
        manifest = read_manifest(entry)
        listing = manifest["files"]
        if manifest.get("key") != key:
            return f"manifest is for key {manifest.get('key')!r}"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unreadable {MANIFEST}: {exc}"
    for name, expected in listing.items():
        if Path(name).name != name or name.startswith("."):
            return f"bad file name {name!r} in {MANIFEST}"
        path = entry / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != expected["size"]:
            return f"{name} has {size} bytes, expected {expected['size']}"
        if file_sha256(path) != expected["sha256"]:
            return f"{name} checksum mismatch"
    return None


def _remove(entry: Path) -> None:
    # Move aside first (atomic), so a concurrent reader sees the entry whole or not at all.
    aside = entry.with_name(f".{entry.name}.corrupt-{os.getpid()}-{time.monotonic_ns()}")
    try:
        os.rename(entry, aside)
    except FileNotFoundError:
        return  # someone else removed it
    shutil.rmtree(aside, ignore_errors=True)


def _sweep_stale(cache_dir: Path) -> None:
    if not cache_dir.is_dir():
        return
    cutoff = time.time() - _STALE_SECONDS
    for path in cache_dir.glob(".*"):
        try:
            if path.is_dir() and path.stat().st_mtime < cutoff:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            continue
