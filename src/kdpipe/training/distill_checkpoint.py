"""Distillation resumes after its last finished epoch (``kdpipe.training.checkpoints`` conventions).

Saved at the end of every epoch but the last: the student, its projection heads, the models
trained beside it (EMA copy, mutual-learning peer) and their terms' state (the peer's
optimizer), the best model so far, optimizer and schedule, torch's RNG, the CRD memory bank,
and the counters and history. Epoch batches are drawn from ``(seed, epoch)``, so a resumed run
trains exactly as an uninterrupted one would (bit for bit on a CPU).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from kdpipe.atomic import atomic_dir, write_json
from kdpipe.config import Config
from kdpipe.training import checkpoints

# The distill step's ``Trainer`` (kdpipe.steps.distill): not imported, as training code sits
# below the steps; what is read and written of it is listed in the module docstring.
Trainer = Any

FORMAT = 1
RUN_ONLY_SETTINGS = {"num_threads"}
BEST_SCORES = ("accuracy", "macro_f1", "epoch", "which")


def fingerprint(cfg: Config, soft_labels_dir: Path) -> str:
    """What distillation computes from: the soft labels (their cache key covers the teacher
    and the data), the student, distill and fractionate settings, token limit and seed."""
    manifest = json.loads((Path(soft_labels_dir) / "manifest.json").read_text(encoding="utf-8"))
    return checkpoints.fingerprint({
        "soft_labels": manifest["key"], "student": cfg.student.model_dump(mode="json"),
        "distill": cfg.distill.model_dump(mode="json", exclude=RUN_ONLY_SETTINGS),
        "fractionate": cfg.fractionate.model_dump(mode="json"),
        "max_length": cfg.ingest.max_length, "seed": cfg.seed})


def save(t: Trainer, folder: Path, expected: str, epoch: int, best: dict[str, Any],
         stale: int) -> None:
    """Write the state after ``epoch`` finished into ``folder``, replacing it atomically."""
    with atomic_dir(folder) as tmp:
        save_model(t.student, str(tmp / "student.safetensors"))
        save_model(best["model"], str(tmp / "best.safetensors"))
        if len(t.heads):
            save_model(t.heads, str(tmp / "heads.safetensors"))
        for name, model in _beside(t).items():
            save_model(model, str(tmp / f"{name}.safetensors"))
        if t.bank is not None and t.bank.get() is not None:
            save_file({"rows": t.bank.get()}, tmp / "bank.safetensors")
        torch.save({"optimizer": t.optimizer.state_dict(),
                    "scheduler": t.scheduler.state_dict(),
                    "terms": {name: term.state() for name, term in t.terms.items()}},
                   tmp / "optimizer.pt")
        save_file(checkpoints.rng_state(), tmp / "rng.safetensors")
        state = {"epoch": epoch, "step": t.step, "stale": stale, "history": t.history,
                 "best": {k: best[k] for k in BEST_SCORES}}
        write_json(tmp / checkpoints.STATE_FILE,
                   checkpoints.state_record(FORMAT, expected, state))


def resume(t: Trainer, folder: Path, expected: str) -> tuple[int, dict[str, Any], int] | None:
    """Restore ``t`` from ``folder``; returns (first epoch to run, best so far, stale
    epochs), or None to start from scratch (no checkpoint, another fingerprint, damaged)."""
    state = checkpoints.read_state(folder, FORMAT, expected, "distillation")
    if state is None:
        return None
    try:
        return _restore(t, folder, state)
    except checkpoints.CHECKPOINT_ERRORS as exc:
        checkpoints.discard(folder, f"damaged ({checkpoints.describe(exc)})")
        return None


def _restore(t: Trainer, folder: Path, state: dict[str, Any]) -> tuple[int, dict[str, Any], int]:
    best_model = copy.deepcopy(t.student)
    # Loaded into copies first: a damaged file must leave the fresh trainer untouched.
    student = copy.deepcopy(t.student)
    _load(student, folder / "student.safetensors")
    _load(best_model, folder / "best.safetensors")
    heads = copy.deepcopy(t.heads)
    if len(heads):
        _load(heads, folder / "heads.safetensors")
    beside = {name: copy.deepcopy(model) for name, model in _beside(t).items()}
    for name, model in beside.items():
        _load(model, folder / f"{name}.safetensors")
    bank_file = folder / "bank.safetensors"
    bank = load_file(bank_file)["rows"] if t.bank is not None and bank_file.exists() else None
    trainer = torch.load(folder / "optimizer.pt", weights_only=True)
    rng = load_file(folder / "rng.safetensors")
    best = {**{k: state["best"][k] for k in BEST_SCORES}, "model": best_model.eval()}
    history, step, epoch, stale = (state["history"], int(state["step"]), int(state["epoch"]),
                                   int(state["stale"]))
    # Everything read: now swap it in (parameters in place, so the optimizer's refer to them).
    t.student.load_state_dict(student.state_dict())
    t.heads.load_state_dict(heads.state_dict())
    for name, model in _beside(t).items():
        model.load_state_dict(beside[name].state_dict())
    if bank is not None:
        t.bank.push(bank)
    t.optimizer.load_state_dict(trainer["optimizer"])
    t.scheduler.load_state_dict(trainer["scheduler"])
    for name, term in t.terms.items():
        term.load_state(trainer.get("terms", {}).get(name, {}))
    checkpoints.set_rng_state(rng)
    t.history, t.step = history, step
    return epoch + 1, best, stale


def _beside(t: Trainer) -> dict[str, torch.nn.Module]:
    """The models trained beside the student (EMA copy, mutual-learning peer)."""
    return {name: model for name, model in t.models.items() if name != "student"}


def _load(module: torch.nn.Module, path: Path) -> None:
    missing, unexpected = load_model(module, str(path), strict=True)
    if missing or unexpected:
        raise ValueError(f"{path.name} does not match the model")
