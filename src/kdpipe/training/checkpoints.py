"""Resumable training state, shared by the teacher and distill steps.

A checkpoint is a folder replaced atomically, holding ``state.json`` (format, fingerprint,
counters) beside safetensors weights and RNG state; optimizer state goes through
``torch.load(weights_only=True)``, so nothing in it is unpickled. The fingerprint is a hash of
what training computes from (data, settings, seed): a checkpoint of another fingerprint is
deleted, a damaged one is reported with a warning and deleted; neither is ever used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from kdpipe.errors import KdpipeError

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
# What reading a damaged checkpoint can raise: truncated or missing files, a format the
# loaders reject, weights that do not fit the model.
CHECKPOINT_ERRORS = (OSError, EOFError, ValueError, KeyError, TypeError, RuntimeError,
                     pickle.UnpicklingError, SafetensorError, KdpipeError)


def fingerprint(parts: dict[str, Any]) -> str:
    """sha256 of ``parts`` as canonical JSON."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def read_state(folder: Path, fmt: int, expected: str, what: str) -> dict[str, Any] | None:
    """The ``state`` saved in ``folder`` if it is a checkpoint of format ``fmt`` and
    fingerprint ``expected``; None (and the folder deleted) otherwise."""
    if not folder.exists():
        return None
    try:
        saved = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
        same = (saved["format"], saved["fingerprint"]) == (fmt, expected)
        state = saved["state"]
    except CHECKPOINT_ERRORS + (json.JSONDecodeError,) as exc:
        discard(folder, f"damaged ({describe(exc)})")
        return None
    if not same:
        log.info("%s: made from other data or settings; %s from scratch", folder, what)
        shutil.rmtree(folder, ignore_errors=True)
        return None
    return state


def state_record(fmt: int, expected: str, state: dict[str, Any]) -> dict[str, Any]:
    """What ``read_state`` reads back."""
    return {"format": fmt, "fingerprint": expected, "state": state}


def discard(folder: Path, why: str) -> bool:
    log.warning("%s: checkpoint %s; training from scratch", folder, why)
    shutil.rmtree(folder, ignore_errors=True)
    return False


def describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def rng_state() -> dict[str, torch.Tensor]:
    """torch's CPU and CUDA generator states (dropout draws from them)."""
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return states


def set_rng_state(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["cpu"])
    cuda = [states[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in states]
    if cuda:
        torch.cuda.set_rng_state_all(cuda)
