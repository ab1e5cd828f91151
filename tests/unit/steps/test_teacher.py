"""teacher step: it learns, resumes exactly where it stopped, refuses a checkpoint of other
settings or a damaged one, and writes a folder Hugging Face loads."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import separable_rows, write_csv
from safetensors.torch import load_file

from kdpipe.config import TeacherConfig
from kdpipe.data.prepare import read_labels, read_split
from kdpipe.errors import KdpipeError
from kdpipe.models.teacher import load_teacher, no_decay_param_groups, predict_logits
from kdpipe.steps import ingest, teacher

ROWS = 300  # 60 validation rows, 210 train rows: 14 batches of 16 per epoch


class Interrupted(Exception):
    """Stands in for a crash or Ctrl-C in the middle of training."""


@pytest.fixture
def teacher_config(make_config, tmp_path):
    """Config for the tiny teacher on a separable set, with prepared data already ingested."""
    csv = write_csv(tmp_path / "data" / "reviews.csv", separable_rows(ROWS))

    def build(**overrides: object):
        settings = {
            "data.source": str(csv), "ingest.validation_fraction": 0.2, "ingest.max_length": 32,
            "teacher.lr": 3e-3, "teacher.epochs": 6, "teacher.batch_size": 16,
            # One thread: faster for a model this small, and the same sums in the same order.
            "teacher.num_threads": 1, "teacher.early_stopping_patience": None,
        }
        cfg = make_config(**{**settings, **overrides})
        if not (cfg.paths.prepared / "data_card.json").exists():
            ingest.run(cfg, cfg.paths.prepared)
        return cfg

    return build


def train(cfg, out: Path, checkpoints: Path, **kwargs):
    return teacher.run(cfg, cfg.paths.prepared, out, checkpoints, **kwargs)


def stop_at(step: int):
    def progress(done: int, total: int, metrics: dict[str, float]) -> None:
        if done == step:
            raise Interrupted

    return progress


def report(out: Path) -> dict:
    return json.loads((out / "training.json").read_text(encoding="utf-8"))


def accuracy(model, tokenizer, cfg) -> float:
    val = read_split(cfg.paths.prepared / "validation.parquet")
    logits = predict_logits(model, tokenizer, val.texts, batch_size=32, max_length=32)
    return float((logits.argmax(axis=1) == np.array(val.labels)).mean())


def assert_same_weights(a: Path, b: Path) -> None:
    left, right = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert left.keys() == right.keys()
    for name in left:
        assert torch.equal(left[name], right[name]), name


def test_training_beats_the_untrained_model(teacher_config, tmp_path):
    from transformers import AutoTokenizer

    cfg = teacher_config()
    tokenizer = AutoTokenizer.from_pretrained(cfg.teacher.checkpoint)
    torch.manual_seed(cfg.seed)
    untrained, _ = load_teacher(cfg.teacher.checkpoint, read_labels(cfg.paths.prepared))
    before = accuracy(untrained, tokenizer, cfg)
    logged: list[tuple[str, float, int]] = []

    result = train(cfg, tmp_path / "out", tmp_path / "ckpt",
                   log_metric=lambda name, value, step: logged.append((name, value, step)))

    assert before < 0.75
    assert result.metrics["val_accuracy"] > 0.85
    assert result.metrics["val_accuracy"] >= before + 0.2
    assert result.metrics["steps"] == 6 * 14
    assert result.summary.startswith(f"val acc {result.metrics['val_accuracy']:.3f}, F1 ")
    names = [name for name, _, _ in logged]
    assert names.count("train/loss") == 84  # a point per step: 84 < teacher.LOSS_POINTS
    assert names.count("eval/accuracy") == 6  # once per epoch
    losses = [value for name, value, _ in logged if name == "train/loss"]
    assert np.mean(losses[-14:]) < 0.5 * np.mean(losses[:14])
    assert not (tmp_path / "ckpt").exists()


def test_output_folder_loads_with_labels_and_no_pickles(teacher_config, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    cfg = teacher_config(**{"teacher.epochs": 2})
    out = tmp_path / "out"
    result = train(cfg, out, tmp_path / "ckpt")

    model = AutoModelForSequenceClassification.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    names = json.loads((cfg.paths.prepared / "labels.json").read_text())["names"]
    assert model.config.id2label == dict(enumerate(names))
    assert model.config.label2id == {name: i for i, name in enumerate(names)}
    assert (out / "model.safetensors").is_file()
    assert not [p.name for p in out.rglob("*")
                if p.suffix in {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}]
    # What is saved is the model that scored the reported accuracy.
    assert accuracy(model, tokenizer, cfg) == result.metrics["val_accuracy"]
    info = report(out)
    assert info["best"]["accuracy"] == result.metrics["val_accuracy"]
    assert info["resumed"] is False and info["steps"] == 28
    assert info["texts_seen"] == 2 * 210 and info["texts_per_second"] > 0


def test_resume_ends_with_the_uninterrupted_weights(teacher_config, tmp_path):
    cfg = teacher_config(**{"teacher.checkpoint_every_steps": 4, "teacher.eval_every_steps": 7,
                            "teacher.epochs": 3})
    train(cfg, tmp_path / "reference", tmp_path / "ckpt-reference")
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"

    # First stop before any evaluation, so every best-weights decision happens after a
    # resume; the second after evaluations, so best weights and history come from the
    # checkpoint. Checkpoints: steps 4, 8, 12, 14 (epoch end), 16, 20, ...
    with pytest.raises(Interrupted):
        train(cfg, out, ckpt, progress=stop_at(6))
    assert json.loads((ckpt / "state.json").read_text())["state"]["step"] == 4
    with pytest.raises(Interrupted):
        train(cfg, out, ckpt, progress=stop_at(23))
    assert not out.exists()
    train(cfg, out, ckpt)

    resumed, reference = report(out), report(tmp_path / "reference")
    assert resumed["resumed"] is True and resumed["resumed_from_steps"] == [4, 20]
    assert resumed["loss"] == reference["loss"]  # every step's loss, bit for bit
    assert resumed["evaluations"] == reference["evaluations"]
    assert resumed["texts_seen"] == reference["texts_seen"] == 3 * 210
    assert_same_weights(out, tmp_path / "reference")
    assert not ckpt.exists()


def test_changed_settings_do_not_resume(teacher_config, tmp_path, caplog):
    cfg = teacher_config(**{"teacher.checkpoint_every_steps": 4, "teacher.epochs": 1})
    with pytest.raises(Interrupted):
        train(cfg, tmp_path / "out", tmp_path / "ckpt", progress=stop_at(6))

    changed = teacher_config(**{"teacher.checkpoint_every_steps": 4, "teacher.epochs": 1,
                                "teacher.lr": 2e-3})
    with caplog.at_level(logging.INFO, logger="kdpipe"):
        train(changed, tmp_path / "out", tmp_path / "ckpt")

    assert "made from other data or settings" in caplog.text
    info = report(tmp_path / "out")
    assert info["resumed"] is False and info["steps"] == 14
    assert info["loss"][0]["step"] == 1  # trained from the first step


def test_fingerprint_ignores_only_how_a_run_is_carried_out(teacher_config):
    cfg = teacher_config()
    data = "a" * 64
    base = teacher.fingerprint(cfg, data)
    assert teacher.fingerprint(teacher_config(**{"teacher.num_threads": 2,
                                                 "teacher.checkpoint_every_steps": 7}),
                               data) == base
    for key, value in {"teacher.lr": 1e-3, "seed": 1, "ingest.max_length": 64,
                       "teacher.grad_accum": 2, "teacher.epochs": 2}.items():
        assert teacher.fingerprint(teacher_config(**{key: value}), data) != base, key
    assert teacher.fingerprint(cfg, "b" * 64) != base


@pytest.mark.parametrize("damage", ["truncated weights", "no optimizer state", "bad state.json"])
def test_damaged_checkpoint_is_reported_and_not_used(teacher_config, tmp_path, caplog, damage):
    cfg = teacher_config(**{"teacher.checkpoint_every_steps": 4, "teacher.epochs": 1})
    ckpt = tmp_path / "ckpt"
    with pytest.raises(Interrupted):
        train(cfg, tmp_path / "out", ckpt, progress=stop_at(6))
    if damage == "truncated weights":
        weights = ckpt / "model" / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "no optimizer state":
        (ckpt / "optimizer.pt").unlink()
    else:
        (ckpt / "state.json").write_text("{\"format\": 1, \"fingerp")

    with caplog.at_level(logging.WARNING, logger="kdpipe"):
        train(cfg, tmp_path / "out", ckpt)
    train(cfg, tmp_path / "reference", tmp_path / "ckpt-reference")

    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "checkpoint damaged" in warnings[0].getMessage()
    assert str(ckpt) in warnings[0].getMessage()
    info = report(tmp_path / "out")
    assert info["resumed"] is False
    assert info["loss"] == report(tmp_path / "reference")["loss"]  # a clean restart
    assert_same_weights(tmp_path / "out", tmp_path / "reference")


def test_early_stopping_after_patience_evaluations_without_gain(teacher_config, tmp_path):
    # At this learning rate predictions cannot change: every evaluation ties the first.
    cfg = teacher_config(**{"teacher.lr": 1e-12, "teacher.eval_every_steps": 2,
                            "teacher.early_stopping_patience": 2})
    result = train(cfg, tmp_path / "out", tmp_path / "ckpt")
    info = report(tmp_path / "out")
    assert info["stopped_early"] is True
    assert [e["step"] for e in info["evaluations"]] == [2, 4, 6]
    assert info["best"]["step"] == 2 and result.metrics["steps"] == 6
    assert result.summary.endswith("stopped early")


def test_gradient_accumulation_and_fractional_epochs_set_the_step_count(teacher_config,
                                                                         tmp_path):
    cfg = teacher_config(**{"teacher.grad_accum": 3, "teacher.epochs": 1.5})
    result = train(cfg, tmp_path / "out", tmp_path / "ckpt")
    # 14 micro-batches per epoch in groups of 3: 5 steps per epoch, 1.5 epochs: 8 steps.
    info = report(tmp_path / "out")
    assert (info["steps_per_epoch"], info["steps"], info["epochs_run"]) == (5, 8, 1.6)
    assert result.metrics["steps"] == 8


def test_plan_budget_warmup_and_loss_points():
    plan = teacher.make_plan(TeacherConfig(epochs=2.5, warmup_ratio=0.1), steps_per_epoch=14)
    assert (plan.total_steps, plan.warmup_steps, plan.log_every) == (35, 4, 1)
    plan = teacher.make_plan(TeacherConfig(epochs=1, max_steps=1000), steps_per_epoch=14)
    assert (plan.total_steps, plan.warmup_steps, plan.log_every) == (1000, 100, 5)
    assert math.ceil(1000 / plan.log_every) == teacher.LOSS_POINTS


def test_no_weight_decay_on_biases_and_layer_norms(tiny_bert):
    model, _ = load_teacher(str(tiny_bert), ["neg", "pos"])
    decay, no_decay = no_decay_param_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert all(names[id(p)].endswith("bias") or "LayerNorm" in names[id(p)]
               for p in no_decay["params"])
    assert all("LayerNorm" not in names[id(p)] and not names[id(p)].endswith("bias")
               for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(names)


def test_missing_prepared_data_names_the_file(make_config, tmp_path):
    cfg = make_config()
    with pytest.raises(KdpipeError, match=r"train\.parquet: not found; run `kdpipe ingest`"):
        teacher.run(cfg, tmp_path / "nowhere", tmp_path / "out", tmp_path / "ckpt")
