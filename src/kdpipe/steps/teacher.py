"""teacher: fine-tune a sequence classifier on the prepared data and keep its best weights.

Reads ``prepared_dir`` (``train``/``validation`` Parquet, ``labels.json``, ``data_card.json``
from ingest). Writes ``out_dir``, replaced atomically: the model with the best validation
accuracy (``save_pretrained``, safetensors), its tokenizer, and ``training.json`` (loss curve,
evaluations, throughput, fingerprint, resumes).

Training is resumable. ``checkpoint_dir`` holds the latest state, keyed by a fingerprint of
the data, the teacher settings and the seed: a rerun with the same fingerprint goes on from
there and ends with the weights an uninterrupted run would have (bit for bit on a CPU); a
different fingerprint or a damaged checkpoint starts over. Nothing in it is unpickled: weights
and RNG state are safetensors, optimizer state is read with ``torch.load(weights_only=True)``,
counters are JSON. The checkpoint is deleted once the output is written.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from kdpipe.atomic import atomic_dir, write_json
from kdpipe.config import Config, TeacherConfig
from kdpipe.data.prepare import Split, read_labels, read_split
from kdpipe.errors import KdpipeError
from kdpipe.evaluation.metrics import accuracy_and_f1
from kdpipe.models.teacher import (
    encode,
    load_teacher,
    load_tokenizer,
    no_decay_param_groups,
    predict_logits,
    quiet_transformers,
)
from kdpipe.progress import progress_bar
from kdpipe.serving.padding import token_counts
from kdpipe.step_result import StepResult
from kdpipe.threads import torch_threads
from kdpipe.training import checkpoints
from kdpipe.training.batching import bucketed_batches
from kdpipe.training.optim import adamw

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
# About this many points on the loss curve whatever the run length: each is the mean loss
# of the steps since the previous one, so the curve stays readable and MLflow stays fast.
LOSS_POINTS = 200
# Settings that change how a run is carried out but not what it computes: a resumed run may
# change them (another machine, a different save interval) and still continue.
RUN_ONLY_SETTINGS = ("checkpoint_every_steps", "num_threads")

Progress = Callable[[int, int, dict[str, float]], None]
LogMetric = Callable[[str, float, int], None]


@dataclass
class TeacherData:
    train: Split
    validation: Split
    labels: list[str]
    content_hash: str


@dataclass
class Plan:
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    log_every: int


@dataclass
class TrainState:
    """Where training stands. Saved as JSON in the checkpoint, so plain values only."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # the epoch under way (0-based)
    epoch_step: int = 0  # optimizer steps done within it
    best_accuracy: float = -1.0
    best_macro_f1: float = 0.0
    best_step: int = 0
    best_epoch: float = 0.0
    evals_since_best: int = 0
    last_eval_step: int = -1
    loss_sum: float = 0.0  # losses of the steps since the last point on the loss curve
    loss_steps: int = 0
    texts: int = 0  # training texts seen
    compute_seconds: float = 0.0  # forward, backward and optimizer time
    seconds: float = 0.0  # training-loop wall time, evaluation and checkpoints included
    resumed_from: list[int] = field(default_factory=list)
    load_report: dict[str, list[str]] = field(default_factory=dict)
    loss_history: list[dict[str, float]] = field(default_factory=list)
    eval_history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class Training:
    """Everything one training run holds; the model half is built fresh or from a checkpoint."""

    cfg: Config
    data: TeacherData
    tokenizer: Any
    lengths: np.ndarray  # train token counts, for length-bucketed batches
    train_labels: np.ndarray
    plan: Plan
    fingerprint: str
    checkpoint_dir: Path
    device: torch.device
    autocast_dtype: torch.dtype | None
    log_metric: LogMetric | None = None
    model: Any = None
    optimizer: Any = None
    scheduler: Any = None
    scaler: Any = None
    state: TrainState = field(default_factory=TrainState)
    best_weights: dict[str, torch.Tensor] | None = None
    mark: float = 0.0  # perf_counter at the last update of state.seconds


def run(cfg: Config, prepared_dir: Path, out_dir: Path, checkpoint_dir: Path,
        progress: Progress | None = None, log_metric: LogMetric | None = None) -> StepResult:
    """Fine-tune ``cfg.teacher.checkpoint`` on ``prepared_dir`` into ``out_dir``, keeping
    resumable state in ``checkpoint_dir`` meanwhile.

    ``progress(step, total_steps, {"loss", "lr"})`` is called after every optimizer step;
    without it a rich progress bar is drawn on stderr. ``log_metric(name, value, step)``
    receives the curves ``train/loss``, ``train/lr``, ``eval/accuracy`` and
    ``eval/macro_f1``. An exception from either stops training and leaves the checkpoint
    for a rerun to resume from.

    Metrics: ``val_accuracy`` and ``val_macro_f1`` of the saved (best) model,
    ``train_seconds`` (training-loop wall time over all attempts, evaluation included),
    ``texts_per_second`` (training texts per second of forward/backward/optimizer time),
    ``steps`` (optimizer steps) and ``epochs_run`` (steps / steps per epoch).
    """
    prepared_dir, out_dir, checkpoint_dir = Path(prepared_dir), Path(out_dir), Path(checkpoint_dir)
    data = load_data(prepared_dir)
    with torch_threads(cfg.teacher.num_threads):
        t = setup(cfg, data, checkpoint_dir, log_metric)
        if not resume(t):
            start_fresh(t)
        with step_reporter(t, progress) as on_step:
            train(t, on_step)
        if t.state.loss_steps:
            add_loss_point(t)
        if t.state.last_eval_step != t.state.step:
            evaluate(t)
        tick(t)
        write_output(t, out_dir)
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return result(t, out_dir)


def load_data(prepared_dir: Path) -> TeacherData:
    """Train and validation splits, label names and content hash written by ingest."""
    for name in ("train.parquet", "validation.parquet", "labels.json", "data_card.json"):
        if not (prepared_dir / name).is_file():
            raise KdpipeError(f"{prepared_dir / name}: not found; run `kdpipe ingest` first")
    card = json.loads((prepared_dir / "data_card.json").read_text(encoding="utf-8"))
    if "content_hash" not in card:
        raise KdpipeError(f"{prepared_dir / 'data_card.json'}: no content_hash; rerun ingest")
    return TeacherData(read_split(prepared_dir / "train.parquet"),
                       read_split(prepared_dir / "validation.parquet"),
                       read_labels(prepared_dir), card["content_hash"])


def fingerprint(cfg: Config, content_hash: str) -> str:
    """sha256 of what training computes from: data, token limit, teacher settings, seed."""
    settings = cfg.teacher.model_dump(mode="json", exclude=set(RUN_ONLY_SETTINGS))
    return checkpoints.fingerprint({"data": content_hash, "max_length": cfg.ingest.max_length,
                                    "teacher": settings, "seed": cfg.seed})


def make_plan(cfg: TeacherConfig, steps_per_epoch: int) -> Plan:
    """Step budget: ``max_steps`` when set, else ``epochs`` (fractions allowed) rounded up."""
    total = cfg.max_steps or math.ceil(cfg.epochs * steps_per_epoch)
    return Plan(steps_per_epoch, total, math.ceil(cfg.warmup_ratio * total),
                max(1, total // LOSS_POINTS))


def setup(cfg: Config, data: TeacherData, checkpoint_dir: Path,
          log_metric: LogMetric | None) -> Training:
    """The parts of a run that do not depend on the weights: tokenizer, lengths, plan, device."""
    tokenizer = load_tokenizer(cfg.teacher.checkpoint)
    lengths = token_counts(tokenizer, data.train.texts, cfg.ingest.max_length)
    plan = make_plan(cfg.teacher, len(epoch_groups(cfg, lengths, 0)))
    device, dtype = device_and_dtype(cfg.teacher.precision)
    return Training(cfg, data, tokenizer, lengths, np.asarray(data.train.labels), plan,
                    fingerprint(cfg, data.content_hash), checkpoint_dir, device, dtype,
                    log_metric)


def device_and_dtype(precision: str) -> tuple[torch.device, torch.dtype | None]:
    """The device and autocast dtype (None: fp32) for ``teacher.precision``."""
    if not torch.cuda.is_available():
        if precision in ("bf16", "fp16"):
            log.warning("teacher.precision %s needs a CUDA GPU; training in fp32 on the CPU",
                        precision)
        return torch.device("cpu"), None
    cuda = torch.device("cuda")
    if precision == "fp32":
        return cuda, None
    if precision == "bf16" or (precision == "auto" and torch.cuda.is_bf16_supported()):
        return cuda, torch.bfloat16
    return cuda, torch.float16


def epoch_groups(cfg: Config, lengths: np.ndarray, epoch: int) -> list[list[np.ndarray]]:
    """The train index micro-batches of ``epoch``, grouped per optimizer step (``grad_accum``
    each), length-bucketed.

    The order depends only on (seed, epoch), so a resumed run replays it and skips the groups
    already done.
    """
    teacher = cfg.teacher
    rng = np.random.default_rng([cfg.seed % 2**63, epoch])
    batches = bucketed_batches(lengths, teacher.batch_size, rng, teacher.bucket_size)
    step = teacher.grad_accum
    return [batches[i : i + step] for i in range(0, len(batches), step)]


def attach_model(t: Training, model: Any) -> None:
    """Put ``model`` on the device and build its AdamW, schedule and loss scaler."""
    from transformers import get_linear_schedule_with_warmup

    cfg = t.cfg.teacher
    t.model = model.to(t.device)
    t.model.train()
    t.optimizer = adamw(no_decay_param_groups(t.model, cfg.weight_decay), cfg.lr, 0.0)
    t.scheduler = get_linear_schedule_with_warmup(t.optimizer, t.plan.warmup_steps,
                                                  t.plan.total_steps)
    # Only fp16 needs loss scaling: bf16 has fp32's range.
    t.scaler = torch.amp.GradScaler(t.device.type, enabled=t.autocast_dtype == torch.float16)


def start_fresh(t: Training) -> None:
    """Seed torch and load the pretrained checkpoint with a new head."""
    torch.manual_seed(t.cfg.seed)  # the new head's initialisation, then dropout
    model, report = load_teacher(t.cfg.teacher.checkpoint, t.data.labels)
    new = report["missing"] + report["mismatched"]
    if new:
        log.info("teacher: newly initialised %s", ", ".join(new))
    t.state = TrainState(load_report=report)
    t.best_weights = None
    attach_model(t, model)
    t.mark = time.perf_counter()


def resume(t: Training) -> bool:
    """Load ``t.checkpoint_dir`` if it was made with the same fingerprint; True if resumed.

    A checkpoint of another fingerprint is deleted; a damaged one is reported with a
    warning, deleted and not used.
    """
    saved = checkpoints.read_state(t.checkpoint_dir, CHECKPOINT_FORMAT, t.fingerprint,
                                   "training")
    if saved is None:
        return False
    try:
        load_checkpoint(t, saved)
    except checkpoints.CHECKPOINT_ERRORS as exc:
        return checkpoints.discard(t.checkpoint_dir, f"damaged ({checkpoints.describe(exc)})")
    t.state.resumed_from.append(t.state.step)
    log.info("teacher: resuming from step %d of %d", t.state.step, t.plan.total_steps)
    return True


def load_checkpoint(t: Training, saved_state: dict[str, Any]) -> None:
    """Restore weights, best weights, optimizer, schedule, scaler, RNG and counters."""
    folder = t.checkpoint_dir
    state = TrainState(**saved_state)
    model, report = load_teacher(str(folder / "model"), t.data.labels)
    if any(report.values()):
        raise ValueError(f"model weights do not match: {report}")
    attach_model(t, model)
    best = None
    if state.best_accuracy >= 0:
        best = load_file(folder / "best.safetensors")
        expected = {k: v.shape for k, v in t.model.state_dict().items()}
        if {k: v.shape for k, v in best.items()} != expected:
            raise ValueError("best.safetensors does not match the model")
    trainer = torch.load(folder / "optimizer.pt", map_location=t.device, weights_only=True)
    t.optimizer.load_state_dict(trainer["optimizer"])
    t.scheduler.load_state_dict(trainer["scheduler"])
    t.scaler.load_state_dict(trainer["scaler"])
    checkpoints.set_rng_state(load_file(folder / "rng.safetensors"))
    t.state, t.best_weights, t.mark = state, best, time.perf_counter()


def save_checkpoint(t: Training) -> None:
    """Write the resumable state into ``t.checkpoint_dir``, replacing it atomically."""
    tick(t)
    with atomic_dir(t.checkpoint_dir) as tmp, quiet_transformers():
        t.model.save_pretrained(tmp / "model")
        if t.best_weights is not None:
            save_file(t.best_weights, tmp / "best.safetensors")
        torch.save({"optimizer": t.optimizer.state_dict(), "scheduler": t.scheduler.state_dict(),
                    "scaler": t.scaler.state_dict()}, tmp / "optimizer.pt")
        save_file(checkpoints.rng_state(), tmp / "rng.safetensors")
        write_json(tmp / checkpoints.STATE_FILE,
                   checkpoints.state_record(CHECKPOINT_FORMAT, t.fingerprint, asdict(t.state)))


def tick(t: Training) -> None:
    """Add the wall time since the last tick to ``state.seconds``."""
    now = time.perf_counter()
    t.state.seconds += now - t.mark
    t.mark = now


def stopped_early(t: Training) -> bool:
    patience = t.cfg.teacher.early_stopping_patience
    return patience is not None and t.state.evals_since_best >= patience


def train(t: Training, on_step: Callable[[float], None]) -> None:
    """Optimizer steps until the budget is spent or early stopping fires, from wherever
    ``t.state`` stands; evaluates and checkpoints on schedule."""
    s = t.state
    while s.step < t.plan.total_steps and not stopped_early(t):
        groups = epoch_groups(t.cfg, t.lengths, s.epoch)
        for group in groups[s.epoch_step :]:
            loss = optimizer_step(t, group)
            s.step, s.epoch_step = s.step + 1, s.epoch_step + 1
            epoch_done = s.epoch_step == len(groups)
            if epoch_done:
                s.epoch, s.epoch_step = s.epoch + 1, 0
            after_step(t, loss, epoch_done)
            on_step(loss)
            if s.step >= t.plan.total_steps or stopped_early(t):
                break


def optimizer_step(t: Training, group: list[np.ndarray]) -> float:
    """Accumulate gradients over ``group``'s micro-batches, clip, step; return the mean loss
    per text. Each text weighs the same, however the group is cut into micro-batches."""
    cfg = t.cfg.teacher
    start = time.perf_counter()
    count = sum(len(index) for index in group)
    total = 0.0
    for index in group:
        batch = encode(t.tokenizer, [t.data.train.texts[i] for i in index],
                       t.cfg.ingest.max_length).to(t.device)
        target = torch.as_tensor(t.train_labels[index], device=t.device)
        with autocast(t):
            logits = t.model(**batch).logits
        loss = F.cross_entropy(logits.float(), target, reduction="sum") / count
        t.scaler.scale(loss).backward()
        total += loss.item()
    if cfg.max_grad_norm is not None:
        t.scaler.unscale_(t.optimizer)  # clip the true gradients, not the fp16-scaled ones
        torch.nn.utils.clip_grad_norm_(t.model.parameters(), cfg.max_grad_norm)
    t.scaler.step(t.optimizer)
    t.scaler.update()
    t.optimizer.zero_grad(set_to_none=True)
    t.scheduler.step()
    t.state.texts += count
    t.state.compute_seconds += time.perf_counter() - start
    return total


def autocast(t: Training) -> contextlib.AbstractContextManager[Any]:
    if t.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(t.device.type, dtype=t.autocast_dtype)


def after_step(t: Training, loss: float, epoch_done: bool) -> None:
    """Loss curve, then evaluation (each epoch end and every ``eval_every_steps``), then a
    checkpoint (each epoch end and every ``checkpoint_every_steps``), in that order so the
    checkpoint holds the evaluation's outcome."""
    cfg, s = t.cfg.teacher, t.state
    record_loss(t, loss)
    if epoch_done or (cfg.eval_every_steps and s.step % cfg.eval_every_steps == 0):
        evaluate(t)
    finished = s.step >= t.plan.total_steps or stopped_early(t)
    if not finished and (epoch_done or s.step % cfg.checkpoint_every_steps == 0):
        save_checkpoint(t)


def record_loss(t: Training, loss: float) -> None:
    s = t.state
    s.loss_sum, s.loss_steps = s.loss_sum + loss, s.loss_steps + 1
    if s.step % t.plan.log_every == 0 or s.step >= t.plan.total_steps:
        add_loss_point(t)


def add_loss_point(t: Training) -> None:
    """A point on the loss curve: the mean loss of the steps since the previous point."""
    s = t.state
    lr = t.scheduler.get_last_lr()[0]
    mean = s.loss_sum / s.loss_steps
    s.loss_history.append({"step": s.step, "epoch": epochs_done(t), "loss": round(mean, 6),
                           "lr": lr})
    s.loss_sum, s.loss_steps = 0.0, 0
    if t.log_metric:
        t.log_metric("train/loss", mean, s.step)
        t.log_metric("train/lr", lr, s.step)


def epochs_done(t: Training) -> float:
    return round(t.state.step / t.plan.steps_per_epoch, 4)


def evaluate(t: Training) -> None:
    """Validation accuracy and macro-F1; keep the weights if accuracy is the best so far."""
    s, val = t.state, t.data.validation
    logits = predict_logits(t.model, t.tokenizer, val.texts, batch_size=t.cfg.teacher.batch_size,
                            max_length=t.cfg.ingest.max_length, autocast_dtype=t.autocast_dtype)
    accuracy, macro_f1 = accuracy_and_f1(np.asarray(val.labels), logits.argmax(axis=1))
    s.eval_history.append({"step": s.step, "epoch": epochs_done(t), "accuracy": accuracy,
                           "macro_f1": macro_f1})
    s.last_eval_step = s.step
    if accuracy > s.best_accuracy:  # ties keep the earlier, shorter-trained model
        s.best_accuracy, s.best_macro_f1 = accuracy, macro_f1
        s.best_step, s.best_epoch, s.evals_since_best = s.step, epochs_done(t), 0
        t.best_weights = {k: v.detach().to("cpu", copy=True)
                          for k, v in t.model.state_dict().items()}
    else:
        s.evals_since_best += 1
    if t.log_metric:
        t.log_metric("eval/accuracy", accuracy, s.step)
        t.log_metric("eval/macro_f1", macro_f1, s.step)


@contextlib.contextmanager
def step_reporter(t: Training, progress: Progress | None) -> Iterator[Callable[[float], None]]:
    """Yield ``on_step(loss)``: calls ``progress`` if given, else advances a rich bar on
    stderr (``kdpipe.progress``) over optimizer steps, showing loss and learning rate."""
    total = t.plan.total_steps
    if progress is not None:
        yield lambda loss: progress(t.state.step, total,
                                    {"loss": loss, "lr": t.scheduler.get_last_lr()[0]})
        return
    from rich.progress import TextColumn

    bar = progress_bar(TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}"))
    task = bar.add_task("teacher", total=total, completed=t.state.step, loss=float("nan"),
                        lr=0.0)
    with bar:
        yield lambda loss: bar.update(task, completed=t.state.step, loss=loss,
                                      lr=t.scheduler.get_last_lr()[0])


def write_output(t: Training, out_dir: Path) -> None:
    """The best weights (``save_pretrained``), the tokenizer and training.json, atomically."""
    t.model.load_state_dict(t.best_weights)
    with atomic_dir(out_dir) as tmp, quiet_transformers():
        t.model.save_pretrained(tmp)
        t.tokenizer.save_pretrained(tmp)
        write_json(tmp / "training.json", training_report(t))


def training_report(t: Training) -> dict[str, Any]:
    s = t.state
    return {
        "fingerprint": t.fingerprint,
        "teacher_checkpoint": t.cfg.teacher.checkpoint,
        "settings": t.cfg.teacher.model_dump(mode="json"),
        "seed": t.cfg.seed,
        "max_length": t.cfg.ingest.max_length,
        "device": t.device.type,
        "precision": str(t.autocast_dtype or torch.float32).removeprefix("torch."),
        "load_report": s.load_report,
        "resumed": bool(s.resumed_from),
        "resumed_from_steps": s.resumed_from,
        "steps": s.step,
        "planned_steps": t.plan.total_steps,
        "steps_per_epoch": t.plan.steps_per_epoch,
        "epochs_run": epochs_done(t),
        "stopped_early": stopped_early(t),
        "best": {"step": s.best_step, "epoch": s.best_epoch, "accuracy": s.best_accuracy,
                 "macro_f1": s.best_macro_f1},
        "seconds": round(s.seconds, 3),
        "compute_seconds": round(s.compute_seconds, 3),
        "texts_seen": s.texts,
        "texts_per_second": round(throughput(s), 2),
        "loss": s.loss_history,
        "evaluations": s.eval_history,
    }


def throughput(s: TrainState) -> float:
    """Training texts per second of forward, backward and optimizer time."""
    return s.texts / s.compute_seconds if s.compute_seconds > 0 else 0.0


def result(t: Training, out_dir: Path) -> StepResult:
    s = t.state
    metrics = {
        "val_accuracy": s.best_accuracy,
        "val_macro_f1": s.best_macro_f1,
        "train_seconds": round(s.seconds, 3),
        "texts_per_second": round(throughput(s), 2),
        "steps": float(s.step),
        "epochs_run": epochs_done(t),
    }
    epochs = epochs_done(t)
    summary = (f"val acc {s.best_accuracy:.3f}, F1 {s.best_macro_f1:.3f}, "
               f"{epochs:g} epoch{'' if epochs == 1 else 's'}, {s.seconds:.0f} s")
    if s.resumed_from:
        summary += f", resumed from step {s.resumed_from[-1]}"
    if stopped_early(t):
        summary += ", stopped early"
    return StepResult("teacher", out_dir, metrics, [out_dir / "training.json"], summary)
