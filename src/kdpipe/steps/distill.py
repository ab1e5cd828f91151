"""distill: train the configured student on the selected transfer set with the configured
losses, and keep the best one.

Reads ``prepared_dir`` (ingest), ``soft_labels_dir`` (teacher logits and [CLS] features, plus
the augmented transfer set when made), ``fractions_dir`` (rows and weights per epoch) and
``teacher_dir`` (its tokenizer; its weights for initialisation and, for hidden-state
matching, run alongside). Writes ``out_dir`` atomically: the student (``model.safetensors`` +
``student.json``, see ``kdpipe.models.students``), the teacher's tokenizer, and
``distill.json`` (loss terms per logging interval, evaluations, the chosen model).

The loss is a weighted sum of terms chosen in params.yaml, each a ``LossTerm`` of
``kdpipe.training.loss_terms`` (which owns its settings, heads and computation). With
``distill.ema.weight > 0`` an exponential moving average of the student gives extra soft
targets, and with ``distill.mutual.weight > 0`` a peer student learns beside it; they are
evaluated too, and whichever scores best on validation is saved.
"""

from __future__ import annotations

import copy
import shutil
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from kdpipe.atomic import atomic_dir, write_json
from kdpipe.config import Config
from kdpipe.data.prepare import read_labels, read_split
from kdpipe.errors import KdpipeError
from kdpipe.evaluation.metrics import accuracy_and_f1
from kdpipe.models.students import build_student, count_parameters, save_student
from kdpipe.models.teacher import load_tokenizer
from kdpipe.progress import progress_bar
from kdpipe.serving.padding import pad_ids
from kdpipe.step_result import StepResult
from kdpipe.steps import fractionate, soft_labels
from kdpipe.threads import torch_threads
from kdpipe.training import distill_checkpoint, trained_rows
from kdpipe.training.batching import bucketed_batches
from kdpipe.training.loss_terms import CRD, Batch, LossTerm, LossTerms, build_terms
from kdpipe.training.optim import adamw

LogMetric = Callable[[str, float, int], None]
LOG_EVERY = 50  # optimizer steps per point on the loss curves


@dataclass
class TransferData:
    """Token ids of every transfer row (train, then augmented) with its targets."""

    ids: list[list[int]]
    lengths: np.ndarray
    labels: np.ndarray  # gold label, or -1 for augmented rows
    teacher_logits: np.ndarray  # (n, C) float32
    teacher_features: np.ndarray | None  # (n, H) float32
    val_ids: list[list[int]]
    val_labels: np.ndarray
    label_names: list[str]
    pad_id: int
    parts: dict[str, int] = field(default_factory=dict)  # rows per part, in order


@dataclass
class Trainer:
    cfg: Config
    data: TransferData
    student: nn.Module
    terms: dict[str, LossTerm]  # every term some epoch uses, built
    optimizer: torch.optim.Optimizer
    scheduler: Any
    step: int = 0
    pending: list[dict[str, float]] = field(default_factory=list)  # losses not yet averaged
    history: dict[str, list[dict[str, Any]]] = field(
        default_factory=lambda: {"loss": [], "evaluations": []})
    resumed_at: int | None = None  # the epoch a resumed run went on from

    def __post_init__(self) -> None:
        # Every term's heads in one module: optimised, clipped and checkpointed with the student.
        self.heads = nn.ModuleDict({name: head for term in self.terms.values()
                                    for name, head in term.heads.items()})

    @property
    def models(self) -> dict[str, nn.Module]:
        """The student, and what terms train beside it (EMA copy, peer), by name."""
        return {"student": self.student,
                **{name: model for term in self.terms.values()
                   for name, model in term.models().items()}}

    @property
    def bank(self) -> Any:
        """CRD's memory bank, when it uses one."""
        term = self.terms.get(CRD.name)
        return term.bank if term is not None else None


def run(cfg: Config, prepared_dir: Path, soft_labels_dir: Path, fractions_dir: Path,
        teacher_dir: Path, out_dir: Path, log_metric: LogMetric | None = None,
        checkpoint_dir: Path | None = None) -> StepResult:
    """Distil ``cfg.student`` from the cached teacher outputs into ``out_dir``.

    With ``checkpoint_dir`` the state is saved after every epoch and a rerun resumes after
    the last finished one (``kdpipe.training.distill_checkpoint``); it is deleted once ``out_dir``
    is written.

    Metrics: ``val_accuracy``/``val_macro_f1`` of the saved model, ``epochs_run``,
    ``train_seconds``, ``params`` (student parameters), ``from_ema`` / ``from_peer`` (1 if the
    EMA copy / the mutual-learning peer won).
    """
    start = time.perf_counter()
    tokenizer = load_tokenizer(str(teacher_dir))
    data = load_transfer(cfg, Path(prepared_dir), Path(soft_labels_dir), tokenizer)
    epochs, steps = plan_epochs(cfg, Path(fractions_dir))
    cfg = cfg.model_copy(update={"distill": cfg.distill.model_copy(update={"epochs": epochs})})
    with torch_threads(cfg.distill.num_threads):
        torch.manual_seed(cfg.seed)
        t = make_trainer(cfg, data, Path(teacher_dir), tokenizer, steps)
        resumable = None
        if checkpoint_dir is not None:
            resumable = (Path(checkpoint_dir),
                         distill_checkpoint.fingerprint(cfg, Path(soft_labels_dir)))
        best = train(t, Path(fractions_dir), log_metric, resumable)
    best["model"] = trained_rows.merge(best["model"])
    seconds = time.perf_counter() - start
    with atomic_dir(out_dir) as tmp:
        save_student(best["model"], tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "distill.json", {
            "best": {k: v for k, v in best.items() if k != "model"},
            "params": count_parameters(best["model"]),
            "seconds": round(seconds, 1), "resumed_at_epoch": t.resumed_at,
            "planned": {"epochs": epochs, "steps": steps}, **t.history})
    if checkpoint_dir is not None:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    metrics = {"val_accuracy": best["accuracy"], "val_macro_f1": best["macro_f1"],
               "epochs_run": float(len({e["epoch"] for e in t.history["evaluations"]})),
               "train_seconds": seconds,
               "params": float(count_parameters(best["model"])),
               "from_ema": float(best["which"] == "ema"),
               "from_peer": float(best["which"] == "peer")}
    kept = {"ema": " (EMA)", "peer": " (mutual-learning peer)"}.get(best["which"], "")
    summary = (f"{cfg.student.arch}: val acc {best['accuracy']:.3f}, F1 {best['macro_f1']:.3f}, "
               f"epoch {best['epoch'] + 1}{kept}, "
               f"{metrics['params']:,.0f} params, {seconds:.0f} s")
    return StepResult("distill", Path(out_dir), metrics, [Path(out_dir) / "distill.json"],
                      summary)


def load_transfer(cfg: Config, prepared_dir: Path, soft_labels_dir: Path,
                  tokenizer: Any, only: Collection[str] | None = None) -> TransferData:
    """Texts of the transfer set (``soft_labels.transfer_parts``: train, then augmented and
    unlabeled where made and included; ``only``: train and just these of them), gold labels
    (-1 for the texts that have none), teacher outputs, tokenized."""
    arrays = soft_labels.load(soft_labels_dir)
    train = read_split(prepared_dir / "train.parquet")
    texts, labels = list(train.texts), list(train.labels)
    logits, feats = [arrays["train_logits"]], [arrays.get("train_features")]
    parts = [name for name in soft_labels.transfer_parts(cfg, arrays)[1:]
             if only is None or name in only]
    rows = {"train": len(texts)}
    for name in parts:
        extra = (soft_labels.load_augment_texts(soft_labels_dir) if name == soft_labels.AUGMENT
                 else soft_labels.read_unlabeled(prepared_dir))
        if len(extra) != len(arrays[f"{name}_logits"]):
            raise KdpipeError(f"{soft_labels_dir}: {name} soft labels do not match "
                              f"{prepared_dir}; run `kdpipe soft-labels` again")
        texts += extra
        labels += [-1] * len(extra)
        rows[name] = len(extra)
        logits.append(arrays[f"{name}_logits"])
        feats.append(arrays.get(f"{name}_features"))
    if len(arrays["train_logits"]) != len(train.texts):
        raise KdpipeError(f"{soft_labels_dir}: soft labels do not match {prepared_dir}; "
                          "run `kdpipe soft-labels` again")
    validation = read_split(prepared_dir / "validation.parquet")
    max_length = cfg.ingest.max_length
    ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    val_ids = tokenizer(validation.texts, truncation=True, max_length=max_length)["input_ids"]
    features = None if any(f is None for f in feats) else np.concatenate(feats)
    return TransferData(ids, np.array([len(x) for x in ids]), np.array(labels, np.int64),
                        np.concatenate(logits).astype(np.float32), features, val_ids,
                        np.array(validation.labels, np.int64), read_labels(prepared_dir),
                        tokenizer.pad_token_id, rows)


def plan_epochs(cfg: Config, fractions_dir: Path) -> tuple[int, int]:
    """(epochs, optimizer steps): ``distill.epochs``, or more epochs when those would take
    fewer than ``distill.min_steps`` steps (a small data set gets as many updates as a
    larger one would in its first epochs)."""
    d = cfg.distill
    per_epoch = [max(1, -(-rows // d.batch_size))
                 for rows in fractionate.epoch_sizes(fractions_dir)]
    epochs = steps = 0
    while epochs < d.epochs or steps < d.min_steps:
        steps += per_epoch[min(epochs, len(per_epoch) - 1)]
        epochs += 1
    return epochs, steps


def make_trainer(cfg: Config, data: TransferData, teacher_dir: Path, tokenizer: Any,
                 steps: int) -> Trainer:
    """The student, the loss terms its epochs use (with their heads, EMA copy, memory bank
    or frozen teacher), the optimizer over the student and the heads, and the schedule."""
    from transformers import get_linear_schedule_with_warmup

    d = cfg.distill
    student = build_student(cfg.student, len(data.label_names), teacher_dir, data.pad_id,
                            len(tokenizer))
    if d.weight_decay == 0:  # see kdpipe.training.trained_rows for why not with decay
        trained_rows.restrict(student, data.ids)
    used = {*LossTerms.for_epoch(d, 0).weights, *LossTerms.for_epoch(d, d.epochs - 1).weights}
    width = data.teacher_features.shape[1] if data.teacher_features is not None else 0
    terms = build_terms(used, d, student, width, teacher_dir)
    heads = [p for term in terms.values() for head in term.heads.values()
             for p in head.parameters()]
    optimizer = adamw(list(student.parameters()) + heads, d.lr, d.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(d.warmup_ratio * steps),
                                                max(steps, 1))
    return Trainer(cfg, data, student, terms, optimizer, scheduler)


def train(t: Trainer, fractions_dir: Path, log_metric: LogMetric | None,
          resumable: tuple[Path, str] | None = None) -> dict[str, Any]:
    """Epochs with early stopping; returns the best model and its scores. ``resumable``:
    (checkpoint folder, fingerprint) to resume from and save into after each epoch."""
    d = t.cfg.distill
    best: dict[str, Any] = {"accuracy": -1.0}
    stale, first = 0, 0
    if resumable is not None:
        restored = distill_checkpoint.resume(t, *resumable)
        if restored is not None:
            first, best, stale = restored
            t.resumed_at = first
    with progress_bar() as bar:
        task = bar.add_task("distill", total=None)
        for epoch in range(first, d.epochs):
            indices, weights = fractionate.load(fractions_dir, epoch)
            terms = LossTerms.for_epoch(d, epoch)
            batches = epoch_batches(t, indices, weights, epoch)
            bar.update(task, description=f"distill epoch {epoch + 1}/{d.epochs}",
                       total=len(batches), completed=0)
            for batch in batches:
                t.pending.append(train_step(t, terms, batch))
                if len(t.pending) == LOG_EVERY:
                    flush_loss(t, log_metric)
                bar.advance(task)
            flush_loss(t, log_metric)
            scores = evaluate_epoch(t, epoch, log_metric)
            top = max(scores, key=lambda s: s["accuracy"])
            if top["accuracy"] > best["accuracy"]:
                best, stale = top, 0
            else:
                stale += 1
                if d.early_stopping_patience and stale >= d.early_stopping_patience:
                    break
            if resumable is not None and epoch < d.epochs - 1:
                distill_checkpoint.save(t, *resumable, epoch, best, stale)
    return best


def epoch_batches(t: Trainer, indices: np.ndarray, weights: np.ndarray,
                  epoch: int) -> list[Batch]:
    rng = np.random.default_rng([t.cfg.seed, epoch])
    groups = bucketed_batches(t.data.lengths[indices], t.cfg.distill.batch_size, rng)
    return [make_batch(t.data, indices[g], weights[g]) for g in groups]


def make_batch(data: TransferData, rows: np.ndarray, weights: np.ndarray) -> Batch:
    input_ids, mask = pad([data.ids[i] for i in rows], data.pad_id)
    features = (torch.from_numpy(np.asarray(data.teacher_features[rows]))
                if data.teacher_features is not None else None)
    return Batch(input_ids, mask, torch.from_numpy(data.labels[rows]),
                 torch.from_numpy(np.asarray(data.teacher_logits[rows])), features,
                 torch.from_numpy(np.asarray(weights, dtype=np.float32)))


def pad(rows: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-pad token id lists to the longest: (input_ids, attention_mask), both (B, L)."""
    ids, mask = pad_ids(rows, pad_id)
    return torch.from_numpy(ids), torch.from_numpy(mask.astype(np.int64))


def train_step(t: Trainer, terms: LossTerms, batch: Batch) -> dict[str, float]:
    t.student.train()
    out = t.student(batch.input_ids, batch.attention_mask)
    values = {name: t.terms[name](batch, out, terms) for name in terms.weights}
    total, logged = terms.combine(values)
    t.optimizer.zero_grad(set_to_none=True)
    total.backward()
    if t.cfg.distill.max_grad_norm:
        nn.utils.clip_grad_norm_(
            list(t.student.parameters()) + list(t.heads.parameters()),
            t.cfg.distill.max_grad_norm)
    lr = t.optimizer.param_groups[0]["lr"]  # the rate this step used
    t.optimizer.step()
    t.scheduler.step()
    for term in t.terms.values():
        term.after_step(t.student, lr)
    t.step += 1
    return logged


def flush_loss(t: Trainer, log_metric: LogMetric | None) -> None:
    """Average each term over the pending steps into the history (and MLflow)."""
    if not t.pending:
        return
    means = {k: float(np.mean([p[k] for p in t.pending])) for k in t.pending[0]}
    t.pending.clear()
    t.history["loss"].append({"step": t.step, **means})
    if log_metric:
        for name, value in means.items():
            log_metric(f"loss/{name}", value, t.step)


def evaluate_epoch(t: Trainer, epoch: int, log_metric: LogMetric | None) -> list[dict[str, Any]]:
    """Validation scores of the student (and its EMA copy or peer), each with a frozen
    copy."""
    scores = []
    for which, model in t.models.items():
        accuracy, macro_f1 = accuracy_and_f1(t.data.val_labels, predict(model, t.data))
        entry = {"epoch": epoch, "which": which, "accuracy": accuracy, "macro_f1": macro_f1}
        t.history["evaluations"].append(dict(entry))
        if log_metric:
            log_metric(f"eval/{which}_accuracy", accuracy, t.step)
        scores.append({**entry, "model": copy.deepcopy(model).eval()})
    return scores


def predict(model: nn.Module, data: TransferData, batch_size: int = 256) -> np.ndarray:
    """Argmax labels for the validation rows."""
    was_training = model.training
    model.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(data.val_ids), batch_size):
            ids, mask = pad(data.val_ids[i: i + batch_size], data.pad_id)
            out.append(model(ids, mask).logits.argmax(dim=1).numpy())
    model.train(was_training)
    return np.concatenate(out)
