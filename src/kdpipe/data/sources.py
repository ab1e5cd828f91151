"""Resolve ``data.source`` into raw splits: the packaged demo, a file, a folder of split files,
a saved or hub Hugging Face dataset, any of these inside a DVC repository at a revision, or a
file or prefix in object storage / on the web (s3://, gs://, https://; see ``remote``)."""

from __future__ import annotations

import re
import subprocess
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

from kdpipe.config import DataConfig
from kdpipe.data import remote
from kdpipe.data.prepare import UNLABELED
from kdpipe.data.readers import FORMATS, RawSplit, Source, read_file
from kdpipe.errors import DataError

DEMO = "demo"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
LOCAL_HINT = (
    "point data.source at local files instead: -S data.source=path/to/file.csv "
    "(CSV, TSV, JSONL or Parquet) or a folder holding train/validation/test files"
)


def demo_path() -> Path:
    return Path(str(resources.files("kdpipe") / "demo"))


def load_source(cfg: DataConfig) -> Source:
    """Read every split that ``cfg.source`` provides, keyed train/validation/test."""
    if cfg.repo:
        return _load_from_dvc(cfg)
    if remote.is_remote(cfg.source):
        return remote.load_remote(cfg, _load_path)
    if cfg.source == DEMO:
        source = _load_path(demo_path(), cfg)
        source.provenance = {"kind": "demo", "path": "kdpipe/demo (packaged demo set)"}
        return source
    path = Path(cfg.source).expanduser()
    if path.exists():
        source = _load_path(path, cfg)
        source.provenance = {"kind": "local", "path": str(path.resolve()), **_git_state(path)}
        return source
    looks_local = path.suffix != "" and "/" not in cfg.source
    if looks_local or ("/" in cfg.source and path.parent.exists()):
        raise DataError(f"{cfg.source}: file not found")
    if _HUB_ID.match(cfg.source):
        return _load_hub(cfg)
    raise DataError(f"{cfg.source}: file not found")


def load_unlabeled(cfg: DataConfig) -> Source | None:
    """The texts of ``data.unlabeled`` (a file, a folder of files, or a URI) as the one
    split ``unlabeled``, labels None; None when it is not set. Read from the local disk or
    object storage even when ``data.repo`` names a DVC repository for the labelled data."""
    if cfg.unlabeled is None:
        return None
    if remote.is_remote(cfg.unlabeled):
        where = cfg.model_copy(update={"source": cfg.unlabeled})
        return remote.load_remote(where, _load_unlabeled_path, every_file=True)
    path = Path(cfg.unlabeled).expanduser()
    if not path.exists():
        raise DataError(f"{cfg.unlabeled}: file not found (data.unlabeled)")
    source = _load_unlabeled_path(path, cfg)
    source.provenance = {"kind": "local", "path": str(path.resolve())}
    return source


def _load_unlabeled_path(path: Path, cfg: DataConfig) -> Source:
    """A file, or every CSV/TSV/JSONL/Parquet file of a folder (and its subfolders, in name
    order) as one list of texts."""
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in FORMATS)
    if not files:
        exts = "/".join(e.lstrip(".") for e in FORMATS)
        raise DataError(f"{path}: no .{{{exts}}} file in this folder (data.unlabeled)")
    parts = [read_file(file, cfg.text_column, None) for file in files]
    if len(parts) == 1:
        return Source({UNLABELED: parts[0]})
    # One split whose rows still point at their own file: origin names the folder, and an
    # error about a row names the file through its row label.
    texts = [text for part in parts for text in part.texts]
    rows = [f"{Path(part.origin).name}:{row}" for part in parts for row in part.rows]
    return Source({UNLABELED: RawSplit(str(path), texts, [None] * len(texts), rows)})


def _load_path(path: Path, cfg: DataConfig) -> Source:
    if path.is_file():
        return Source({"train": read_file(path, cfg.text_column, cfg.label_column)})
    if (path / "dataset_dict.json").exists():
        return _from_hf(_load_from_disk(path), cfg, str(path))
    found: dict[str, RawSplit] = {}
    names = cfg.splits.model_dump()
    for role, name in names.items():
        matches = sorted(p for p in path.glob(f"{name}.*") if p.suffix.lower() in FORMATS)
        if len(matches) > 1:
            listed = ", ".join(p.name for p in matches)
            raise DataError(f"{path}: several files for split {name!r} ({listed}); keep one")
        if matches:
            found[role] = read_file(matches[0], cfg.text_column, cfg.label_column)
    if "train" not in found:
        exts = "/".join(e.lstrip(".") for e in FORMATS)
        raise DataError(f"{path}: no {names['train']}.{{{exts}}} file in this folder")
    return Source(found)


def _load_from_disk(path: Path) -> Any:
    import datasets

    try:
        return datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises several unrelated types here
        raise DataError(f"{path}: not a readable saved Hugging Face dataset ({exc})") from None


def _load_hub(cfg: DataConfig) -> Source:
    import datasets

    try:
        dataset = datasets.load_dataset(cfg.source, cfg.hf_config)
    except Exception as exc:  # offline, unknown id, gated: all end the same way for the user
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"{cfg.source}: not a local path, and loading it from the Hugging Face hub "
            f"failed ({reason[:160]}); {LOCAL_HINT}"
        ) from None
    source = _from_hf(dataset, cfg, f"hf:{cfg.source}")
    source.provenance = {"kind": "huggingface", "id": cfg.source, "config": cfg.hf_config}
    return source


def _from_hf(dataset: Any, cfg: DataConfig, origin: str) -> Source:
    splits: dict[str, RawSplit] = {}
    for role, name in cfg.splits.model_dump().items():
        if name not in dataset:
            continue
        part = dataset[name]
        for column, option in ((cfg.text_column, "text_column"),
                               (cfg.label_column, "label_column")):
            if column not in part.column_names:
                have = ", ".join(part.column_names)
                raise DataError(
                    f"{origin}[{name}]: no column {column!r} (columns: {have}); "
                    f"set -S data.{option}=NAME"
                )
        feature = part.features[cfg.label_column]
        names = list(feature.names) if hasattr(feature, "names") else None
        splits[role] = RawSplit(
            f"{origin}[{name}]", part[cfg.text_column], part[cfg.label_column], label_names=names
        )
    if "train" not in splits:
        raise DataError(f"{origin}: no split named {cfg.splits.train!r} (data.splits.train)")
    return Source(splits)


def _load_from_dvc(cfg: DataConfig) -> Source:
    from dvc.api import DVCFileSystem

    try:
        fs = DVCFileSystem(cfg.repo, rev=cfg.rev)
        if not fs.exists(cfg.source):
            raise DataError(f"{cfg.repo}@{cfg.rev or 'HEAD'}: no {cfg.source!r} in this repository")
        commit = fs.repo.get_rev()
        with tempfile.TemporaryDirectory(prefix="kdpipe-dvc-") as tmp:
            local = Path(tmp) / Path(cfg.source).name
            fs.get(cfg.source, str(local), recursive=fs.isdir(cfg.source))
            source = _load_path(local, cfg)
    except DataError:
        raise
    except Exception as exc:  # dvc/scmrepo raise many types for a bad repo, rev or remote
        raise DataError(f"data.repo {cfg.repo!r} at rev {cfg.rev!r}: {_dvc_failure(exc)}") \
            from None
    source.provenance = {
        "kind": "dvc",
        "repo": cfg.repo,
        "path": cfg.source,
        "rev": cfg.rev,
        "git_commit": commit,
    }
    return source


# Exception class names (matched along the MRO, so no botocore/aiohttp import) that mean the
# DVC remote did not answer, or had no keys to sign with. botocore's EndpointConnectionError
# and ConnectTimeoutError derive from its own ConnectionError.
_UNREACHABLE = {"ConnectionError", "TimeoutError", "ReadTimeoutError"}
_NO_KEYS = {"NoCredentialsError", "PartialCredentialsError"}


def _dvc_failure(exc: Exception) -> str:
    """``exc`` in one line, with what to check for the usual ways a DVC remote fails: the
    bare texts ("Forbidden", "No storage files available") do not say it is the remote."""
    lines = str(exc).strip().splitlines()
    reason = lines[0][:300] if lines else type(exc).__name__
    names = {cls.__name__ for cls in type(exc).__mro__}
    # s3fs/gcsfs turn a 401/403 into a PermissionError without errno; a local one has EACCES.
    if names & _NO_KEYS or (isinstance(exc, PermissionError) and exc.errno is None):
        return (f"no access to the DVC remote ({reason}); check its credentials "
                "(for S3: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in the environment)")
    if names & _UNREACHABLE:
        return (f"cannot reach the DVC remote ({reason}); check its url and endpointurl: "
                "dvc config --list --show-origin")
    if isinstance(exc, FileNotFoundError) and "No storage files available" in reason:
        # DVC's text when the file's md5 is in neither the local cache nor the remote.
        return f"{reason}; not in the DVC cache nor in the remote: was it pushed (dvc push)?"
    return reason


def _git_state(path: Path) -> dict[str, Any]:
    """The git commit of the repo holding ``path`` and the DVC md5 of its .dvc file, if any."""
    state: dict[str, Any] = {}
    folder = path if path.is_dir() else path.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
        state["git_commit"] = commit
    except (OSError, subprocess.SubprocessError):
        pass
    dvc_file = path.with_name(path.name + ".dvc")
    if dvc_file.is_file():
        import yaml

        outs = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs") or [{}]
        state["dvc_md5"] = outs[0].get("md5")
    return state
