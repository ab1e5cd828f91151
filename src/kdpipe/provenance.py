"""What made each step's output in a work_dir, and whether the outputs still fit together.

After each step, ``<work_dir>/provenance/<step>.json`` records the content hash of the
step's output folder, the content hashes of the folders it read, its settings, the kdpipe
version and the run (command, MLflow run, host and process) that made it. While a step
runs, ``<step>.running`` says so; a step that fails or is killed before its record leaves
the marker behind.

From these records:

- ``kdpipe run`` re-runs only what is stale (``stale``): a step with no record, an
  interrupted one, one whose settings or kdpipe version changed, or one that read a folder
  since re-made with other content. The rest is kept, as ``dvc repro`` keeps it. A re-run
  step whose output comes out byte-identical leaves its dependents up to date.
- ``kdpipe predict`` and ``kdpipe register`` refuse a folder made from a mix of runs
  (``check_consistent``): e.g. a quantized model from an old student whose teacher, soft
  labels and fractions were re-made by a later, interrupted run.

The records live beside the outputs, not in them, so a model folder's size and bytes are
the step's alone. DVC and Kubeflow keep their own lineage; these records are kdpipe's, for a
work_dir that several ``kdpipe`` commands write into. Written by hand because DVC's lock file
describes only what ``dvc repro`` ran, and a work_dir is also written by ``kdpipe run``.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdpipe import __version__, owner
from kdpipe.atomic import read_json, write_json
from kdpipe.config import Config, Layout
from kdpipe.errors import KdpipeError
from kdpipe.pipeline import STEPS, Step
from kdpipe.step_settings import subset

FOLDER = "provenance"
# register writes to the MLflow registry, not only its folder: a run that re-made anything
# registers (or finds) its candidate and records the outcome on its own MLflow run, so it
# runs whenever a step before it ran.
ALWAYS = ("register",)


def records(root: Path) -> Path:
    return Path(root) / FOLDER


def _record_path(root: Path, step: str) -> Path:
    return records(root) / f"{step}.json"


def _marker(root: Path, step: str) -> Path:
    return records(root) / f"{step}.running"


def producer(folder: str) -> Step:
    """The step that writes the ``Layout`` folder ``folder``."""
    return next(step for step in STEPS if step.output == folder)


def folder_hash(path: Path, only: Iterable[str] | None = None) -> str:
    """SHA-256 over every file under ``path`` (or the ``only`` ones, relative names):
    relative name, size and bytes, in name order."""
    return combined_hash(file_hashes(path, only))


def file_hashes(path: Path, only: Iterable[str] | None = None) -> dict[str, tuple[int, str]]:
    """Every file under ``path`` (or the ``only`` ones, relative names): relative name ->
    (size, SHA-256 of its bytes). Files not asked for are not read."""
    path = Path(path)
    keep = None if only is None else set(only)
    out = {}
    for file in _files(path):
        if keep is not None and file.relative_to(path).as_posix() not in keep:
            continue
        with open(file, "rb") as handle:
            out[file.relative_to(path).as_posix()] = (
                file.stat().st_size, hashlib.file_digest(handle, "sha256").hexdigest())
    return out


def combined_hash(files: dict[str, Any], only: Iterable[str] | None = None) -> str:
    """``folder_hash`` from ``file_hashes`` (as recorded: lists or tuples), restricted to
    ``only`` when given."""
    keep = None if only is None else set(only)
    digest = hashlib.sha256()
    for name in sorted(files, key=lambda n: n.split("/")):  # _files' order: part by part
        if keep is None or name in keep:
            size, sha = files[name]
            digest.update(f"{name}\0{size}\0".encode())
            digest.update(bytes.fromhex(sha))
    return digest.hexdigest()


def folder_stat(path: Path) -> str:
    """SHA-256 over every file's relative name, size and modification time under ``path``:
    cheap, and unchanged while nothing touched the folder (``stale`` hashes the content only
    when this differs)."""
    digest = hashlib.sha256()
    path = Path(path)
    for file in _files(path):
        stat = file.stat()
        digest.update(f"{file.relative_to(path).as_posix()}\0{stat.st_size}\0"
                      f"{stat.st_mtime_ns}\0".encode())
    return digest.hexdigest()


def _files(path: Path) -> list[Path]:
    """Every file under ``path``, in name order (none when it is not a folder)."""
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []


def read(root: Path, step: str) -> dict[str, Any] | None:
    # A damaged record is as good as none, so the step re-runs.
    return read_json(_record_path(root, step))


def _settings(cfg: Config, step: Step) -> dict[str, Any]:
    return json.loads(json.dumps(subset(cfg, step.settings)))


def source_fingerprint(cfg: Config) -> str | None:
    """What ingest reads, when it can be checked cheaply: the demo of this kdpipe version, or
    a local file or folder (names, sizes, modification times), and the same of
    ``data.unlabeled`` when set. None for a DVC repo, a URI or a Hugging Face data set:
    ingest then always re-runs (its output, if unchanged, keeps every later step up to
    date)."""
    if cfg.data.repo:
        return None
    labelled = (f"demo {__version__}" if cfg.data.source == "demo"
                else _files_fingerprint(cfg.data.source))
    if cfg.data.unlabeled is None or labelled is None:
        return labelled
    unlabeled = _files_fingerprint(cfg.data.unlabeled)
    return None if unlabeled is None else hashlib.sha256(
        f"{labelled}\0{unlabeled}".encode()).hexdigest()


def _files_fingerprint(where: str) -> str | None:
    """Names, sizes and modification times of a local file or folder's files; None for a
    URI or a path that does not exist."""
    path = Path(where).expanduser()
    if "://" in where or not path.exists():
        return None
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        stat = file.stat()
        digest.update(f"{file.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    return digest.hexdigest()


def current_hash(paths: Layout, folder: str, only: Iterable[str] | None = None) -> str | None:
    """The content hash of ``folder`` (of its ``only`` files, when given) as its producer
    recorded it, or computed now when it has no record; None when the folder is missing."""
    record = read(paths.root, producer(folder).name)
    if record is not None and not _marker(paths.root, producer(folder).name).exists():
        if only is None:
            return record.get("content_hash")
        if "files" in record:
            return combined_hash(record["files"], only)
    path = getattr(paths, folder)
    return folder_hash(path, only) if path.is_dir() else None


def input_hashes(paths: Layout, step: Step) -> dict[str, str | None]:
    """What ``step`` reads of each input folder, hashed: the files it declares it reads
    (``Step.reads``), or the whole folder."""
    return {folder: current_hash(paths, folder, step.reads.get(folder))
            for folder in step.folders}


@dataclass(frozen=True)
class RunInfo:
    """Who is running a step: the command, and the MLflow run when tracked."""

    command: str
    mlflow_run_id: str | None = None
    pipeline_run_id: str | None = None


def started(cfg: Config, step: Step, run: RunInfo) -> None:
    """Mark ``step`` as running; a kill before ``finished`` leaves the mark."""
    write_json(_marker(cfg.paths.root, step.name),
               {"holder": owner.me(), "command": run.command, "since": _now()})


def finished(cfg: Config, step: Step, run: RunInfo) -> dict[str, Any]:
    """Record what made ``step``'s output, then lift its running mark."""
    paths = cfg.paths
    files = file_hashes(getattr(paths, step.output))
    record = {
        "step": step.name,
        "output": step.output,
        "content_hash": combined_hash(files),
        "files": files,
        "output_stat": folder_stat(getattr(paths, step.output)),
        "inputs": input_hashes(paths, step),
        "source": source_fingerprint(cfg) if not step.inputs else None,
        "settings": _settings(cfg, step),
        "kdpipe_version": __version__,
        "command": run.command,
        "mlflow_run_id": run.mlflow_run_id,
        "pipeline_run_id": run.pipeline_run_id,
        "made_by": owner.me(),
        "finished_at": _now(),
    }
    write_json(_record_path(paths.root, step.name), record)
    _marker(paths.root, step.name).unlink(missing_ok=True)
    return record


def clear(root: Path) -> None:
    """Forget every record: outputs were put in place by something that keeps none (a
    Kubeflow run's collected outputs)."""
    folder = records(root)
    if folder.is_dir():
        for path in folder.iterdir():
            path.unlink(missing_ok=True)


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())


def _made_by(record: dict[str, Any]) -> str:
    run = record.get("pipeline_run_id") or record.get("mlflow_run_id")
    where = f", MLflow run {run[:8]}" if run else ""
    return f"`{record.get('command', 'kdpipe')}` at {record.get('finished_at', '?')}{where}"


def _changed(before: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[str]:
    keys = sorted(set(before) | set(now))
    found: list[str] = []
    for key in keys:
        a, b = before.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found += _changed(a, b, f"{prefix}{key}.")
        elif a != b:
            found.append(f"{prefix}{key} {json.dumps(a)} → {json.dumps(b)}")
    return found


def stale(cfg: Config, step: Step) -> str | None:
    """Why ``step`` must run now, or None when its output is up to date."""
    paths = cfg.paths
    marker = _marker(paths.root, step.name)
    if marker.exists():
        holder = read_json(marker, {}, {})
        return f"its last run did not finish ({holder.get('command', 'kdpipe')} at " \
               f"{holder.get('since', '?')})"
    record = read(paths.root, step.name)
    if record is None:
        return "no record of a finished run in this work_dir"
    output = getattr(paths, step.output)
    if not output.is_dir():
        return f"its output {output} is missing"
    if record.get("kdpipe_version") != __version__:
        return f"made by kdpipe {record.get('kdpipe_version')}, this is {__version__}"
    changed = _changed(record.get("settings") or {}, _settings(cfg, step))
    if changed:
        more = f" (+{len(changed) - 2} more)" if len(changed) > 2 else ""
        return f"settings changed: {'; '.join(changed[:2])}{more}"
    if not step.inputs:
        source = source_fingerprint(cfg)
        if source is None:
            return f"it reads {cfg.data.repo or cfg.data.source}, which may have changed"
        if source != record.get("source"):
            also = f" or {cfg.data.unlabeled}" if cfg.data.unlabeled else ""
            return f"{cfg.data.source}{also} changed"
    recorded = record.get("inputs") or {}
    for folder, now in input_hashes(paths, step).items():
        if now != recorded.get(folder):
            return f"{getattr(paths, folder)} has changed since it ran"
    # Last, as it may hash the output: the output may have been replaced since its run
    # (`dvc checkout`, or `dvc repro` restoring from its run cache, writes no record).
    if folder_stat(output) != record.get("output_stat") and \
            folder_hash(output) != record.get("content_hash"):
        return f"its output {output} is not what it made (changed since, e.g. by DVC)"
    return None


def up_to_date_text(cfg: Config, step: Step) -> str:
    record = read(cfg.paths.root, step.name) or {}
    return f"up to date (made by {_made_by(record)})"


def upstream(step: Step) -> list[Step]:
    """``step`` and every step it depends on, nearest first."""
    seen: dict[str, Step] = {}
    todo = [step]
    while todo:
        current = todo.pop(0)
        if current.name in seen:
            continue
        seen[current.name] = current
        todo += [producer(folder) for folder in current.folders]
    return list(seen.values())


def check_consistent(paths: Layout, steps: Iterable[Step], what: str) -> None:
    """Raise a one-line ``KdpipeError`` when the outputs ``steps`` read were made from a mix
    of runs: a step interrupted or still running, or a folder made from an input that has
    since been re-made. Folders without records (made by Kubeflow, copied in) are taken as
    they are."""
    for step in {s.name: s for top in steps for s in upstream(top)}.values():
        marker = _marker(paths.root, step.name)
        if marker.exists():
            holder = read_json(marker, {}, {})
            doing = ("is being re-made now" if not owner.gone(holder.get("holder", ""))
                     else "was left unfinished by a run that failed or was interrupted")
            raise KdpipeError(
                f"{what}: {getattr(paths, step.output)} {doing} "
                f"({holder.get('command', 'kdpipe')}, {holder.get('holder', '?')}, since "
                f"{holder.get('since', '?')}); finish it with `kdpipe run`")
        record = read(paths.root, step.name)
        if record is None:
            continue
        for folder in step.folders:
            made_from = (record.get("inputs") or {}).get(folder)
            source = read(paths.root, producer(folder).name)
            only = step.reads.get(folder)
            if source is not None and made_from != (
                    source.get("content_hash") if only is None
                    else combined_hash(source.get("files") or {}, only)):
                raise KdpipeError(
                    f"{what}: {getattr(paths, step.output)} was made from an earlier "
                    f"{getattr(paths, folder)} (re-made since by {_made_by(source)}), so "
                    "the work_dir holds a mix of runs; `kdpipe run` re-makes what is stale")


def owning_step(model_dir: Path) -> tuple[Layout, Step] | None:
    """The work_dir and step whose output ``model_dir`` is, when it sits in a work_dir with
    records; None for a folder anywhere else."""
    model_dir = Path(model_dir).resolve()
    paths = Layout(model_dir.parent)
    if not records(paths.root).is_dir():
        return None
    for step in STEPS:
        if getattr(paths, step.output).resolve() == model_dir:
            return paths, step
    return None


def checkpoint_text(paths: Layout, step: Step) -> str | None:
    """Where a resumable step's checkpoint stands, e.g. "step 12" or "epoch 2", if it has
    one."""
    if not step.resumable:
        return None
    state = read_json(paths.checkpoints / step.name / "state.json", {}, {}).get("state") or {}
    # The teacher saves every few optimizer steps, distill after each epoch.
    if step.name == "distill" and "epoch" in state:
        return f"epoch {int(state['epoch']) + 1} done"
    if "step" in state:
        return f"step {state['step']}"
    return None
