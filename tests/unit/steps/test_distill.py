"""The distill step on a tiny fixture: it learns, every loss term runs, the saved student
reloads, and impossible loss settings are refused with a clear message."""

import json

import numpy as np
import pytest
import torch
from conftest import separable_rows, write_csv

from kdpipe.config import validate
from kdpipe.data.prepare import read_split
from kdpipe.errors import KdpipeError
from kdpipe.models.students import build_student, load_student
from kdpipe.steps import distill, fractionate, ingest, soft_labels, teacher
from kdpipe.training import loss_terms

SMALL_STUDENT = {"embedding_dim": 16, "textcnn": {"num_filters": 8},
                 "bilstm": {"hidden_size": 8}}


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory, tiny_bert):
    """Prepared data, a trained tiny teacher, soft labels (with augmentation)."""
    root = tmp_path_factory.mktemp("distill")
    source = write_csv(root / "d.csv", separable_rows(240))
    raw = {"work_dir": str(root / "work"), "tracking": {"enabled": False},
           "data": {"source": str(source)}, "soft_labels": {"cache_dir": str(root / "cache"),
           "augment": {"enabled": True, "variants": 1}},
           "teacher": {"checkpoint": str(tiny_bert), "epochs": 8, "lr": 3e-3,
                       "early_stopping_patience": None}}
    cfg = validate(raw, "test")
    p = cfg.paths
    torch.set_num_threads(1)
    ingest.run(cfg, p.prepared)
    taught = teacher.run(cfg, p.prepared, p.teacher, p.teacher_checkpoints,
                         progress=lambda *a: None)
    assert taught.metrics["val_accuracy"] > 0.85
    soft_labels.run(cfg, p.teacher, p.prepared, p.soft_labels)
    return raw


def _config(raw, tmp_path, **distill_settings):
    raw = json.loads(json.dumps(raw))
    raw["student"] = {**SMALL_STUDENT, **distill_settings.pop("student", {})}
    raw["fractionate"] = distill_settings.pop("fractionate", {})
    raw["distill"] = {"epochs": 4, "min_steps": 0, "lr": 1e-2, "batch_size": 32,
                      **distill_settings}
    cfg = validate(raw, "test")
    fractions = tmp_path / "fractions"
    fractionate.run(cfg, cfg.paths.soft_labels, cfg.paths.prepared, fractions)
    return cfg, fractions


def _distill(cfg, fractions, out, log=None):
    p = cfg.paths
    return distill.run(cfg, p.prepared, p.soft_labels, fractions, p.teacher, out, log_metric=log)


def _accuracy(model, cfg):
    tokenizer_out = read_split(cfg.paths.prepared / "validation.parquet")
    from kdpipe.models.teacher import load_tokenizer

    tok = load_tokenizer(str(cfg.paths.teacher))
    enc = tok(tokenizer_out.texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        predicted = model(enc["input_ids"], enc["attention_mask"]).logits.argmax(1).numpy()
    return float((predicted == np.array(tokenizer_out.labels)).mean())


def test_distillation_improves_on_the_initial_student_and_reloads(pipeline_dir, tmp_path):
    cfg, fractions = _config(pipeline_dir, tmp_path)
    torch.manual_seed(cfg.seed)
    from kdpipe.models.teacher import load_tokenizer

    tok = load_tokenizer(str(cfg.paths.teacher))
    initial = build_student(cfg.student, 2, cfg.paths.teacher, tok.pad_token_id, len(tok)).eval()
    logged = []
    result = _distill(cfg, fractions, tmp_path / "student",
                      log=lambda name, value, step: logged.append(name))
    assert result.metrics["val_accuracy"] >= _accuracy(initial, cfg) + 0.2
    assert result.metrics["val_accuracy"] > 0.85
    student = load_student(tmp_path / "student")
    assert _accuracy(student, cfg) == pytest.approx(result.metrics["val_accuracy"])
    assert {"loss/kd", "loss/total", "eval/student_accuracy"} <= set(logged)
    report = json.loads((tmp_path / "student" / "distill.json").read_text())
    assert report["best"]["accuracy"] == result.metrics["val_accuracy"]
    assert (tmp_path / "student" / "tokenizer.json").exists()
    assert not list((tmp_path / "student").glob("*.bin"))


@pytest.mark.parametrize("strategy", ["all", "dynamic"])
def test_a_small_transfer_set_gets_epochs_until_min_steps(pipeline_dir, tmp_path, strategy):
    cfg, fractions = _config(pipeline_dir, tmp_path, epochs=1, min_steps=25,
                             early_stopping_patience=None,
                             fractionate={"strategy": strategy, "schedule": [0.5, 1.0]})
    per_epoch = [-(-len(fractionate.load(fractions, e)[0]) // 32) for e in range(9)]
    epochs = next(e for e in range(1, 10) if sum(per_epoch[:e]) >= 25)
    assert epochs > 1
    _distill(cfg, fractions, tmp_path / "s")
    report = json.loads((tmp_path / "s" / "distill.json").read_text())
    assert report["planned"] == {"epochs": epochs, "steps": sum(per_epoch[:epochs])}
    assert sorted({e["epoch"] for e in report["evaluations"]}) == list(range(epochs))
    # A set already large enough keeps distill.epochs.
    assert distill.plan_epochs(cfg.model_copy(update={"distill": cfg.distill.model_copy(
        update={"epochs": 3, "min_steps": 2})}), fractions) == (3, sum(per_epoch[:3]))


@pytest.mark.parametrize("settings,terms", [
    ({"alpha": 0.0}, {"kd"}),
    ({"logit_mse": 1.0}, {"kd", "logit_mse"}),
    ({"feature": {"weight": 0.5, "kind": "cosine"}}, {"kd", "feature"}),
    ({"crd": {"weight": 0.2}}, {"kd", "crd"}),
    ({"crd": {"weight": 0.2, "negatives": "memory_bank", "bank_size": 64}}, {"kd", "crd"}),
    ({"ema": {"weight": 0.5, "momentum": 0.9}}, {"kd", "ema"}),
    ({"mutual": {"weight": 0.5}}, {"kd", "mutual"}),
    ({"hard_label_epochs": 1, "temperature_end": 1.0}, {"hard_ce", "kd"}),
    ({"student": {"arch": "bilstm"}, "fractionate": {"strategy": "dynamic"}}, {"kd"}),
    ({"student": {"arch": "transformer"}, "hidden": {"weight": 1.0}}, {"kd", "hidden"}),
    ({"student": {"arch": "transformer"}, "attention": {"weight": 1.0},
      "hidden": {"weight": 0.5}}, {"kd", "attention", "hidden"}),
    ({"srrd": {"weight": 0.5, "projection": "mlp"}}, {"kd", "srrd"}),
    ({"student": {"arch": "bilstm"}, "feature": {"weight": 0.5, "projection": "mlp"}},
     {"kd", "feature"}),
    ({"student": {"arch": "fast"}, "feature": {"weight": 0.5}}, {"kd", "feature"}),
])
def test_every_loss_term_and_student_trains(pipeline_dir, tmp_path, settings, terms):
    cfg, fractions = _config(pipeline_dir, tmp_path, epochs=2, **settings)
    result = _distill(cfg, fractions, tmp_path / "s")
    report = json.loads((tmp_path / "s" / "distill.json").read_text())
    seen = set().union(*(set(p) - {"step", "total"} for p in report["loss"]))
    assert seen == terms
    assert all(np.isfinite(p["total"]) for p in report["loss"])
    assert result.metrics["val_accuracy"] > 0.4
    if "ema" in terms:
        assert {e["which"] for e in report["evaluations"]} == {"student", "ema"}
    if "mutual" in terms:
        assert {e["which"] for e in report["evaluations"]} == {"student", "peer"}
        assert result.metrics["from_peer"] == float(report["best"]["which"] == "peer")


def test_a_new_loss_term_is_one_registered_class(pipeline_dir, tmp_path, monkeypatch):
    """A term registered by name is built, weighted, summed, logged and its head trained,
    with no change to the distill step (here it reuses logit_mse's weight as its setting)."""
    heads_seen = []

    class Centered(loss_terms.LossTerm):
        name = "centered"

        @classmethod
        def weight(cls, d):
            return d.logit_mse

        def __init__(self, d, student, teacher_width, teacher_dir):
            super().__init__(d, student, teacher_width, teacher_dir)
            self.heads = {"centered_scale": torch.nn.Linear(1, 1)}
            heads_seen.append(self.heads["centered_scale"])

        def __call__(self, b, out, terms):
            scale = self.heads["centered_scale"].weight.squeeze()
            logits = out.logits - out.logits.mean(1, keepdim=True)
            target = b.teacher_logits - b.teacher_logits.mean(1, keepdim=True)
            return ((scale * logits - target) ** 2).mean()

    monkeypatch.setattr(loss_terms, "TERMS", dict(loss_terms.TERMS))
    loss_terms.term(Centered)
    with pytest.raises(ValueError, match="registered twice"):
        loss_terms.term(Centered)
    cfg, fractions = _config(pipeline_dir, tmp_path, epochs=2, logit_mse=0.5)
    assert dict(loss_terms.LossTerms.for_epoch(cfg.distill, 1).weights) == {
        "kd": 1.0, "logit_mse": 0.5, "centered": 0.5}
    _distill(cfg, fractions, tmp_path / "s")
    report = json.loads((tmp_path / "s" / "distill.json").read_text())
    assert all({"kd", "logit_mse", "centered"} <= set(p) for p in report["loss"])
    assert heads_seen and float(heads_seen[0].weight.grad.abs().sum()) > 0


def test_feature_losses_need_cached_teacher_features(pipeline_dir, tmp_path):
    raw = json.loads(json.dumps(pipeline_dir))
    raw["soft_labels"]["features"] = False
    raw["work_dir"] = str(tmp_path / "w")
    cfg = validate(raw, "test")
    ingest.run(cfg, cfg.paths.prepared)
    import shutil

    shutil.copytree(validate(pipeline_dir, "t").paths.teacher, cfg.paths.teacher)
    soft_labels.run(cfg, cfg.paths.teacher, cfg.paths.prepared, cfg.paths.soft_labels)
    raw["distill"] = {"feature": {"weight": 1.0}}
    cfg = validate(raw, "test")
    fractionate.run(cfg, cfg.paths.soft_labels, cfg.paths.prepared, tmp_path / "f")
    with pytest.raises(KdpipeError, match="feature loss needs the teacher's features"):
        _distill(cfg, tmp_path / "f", tmp_path / "s")


def test_hidden_matching_needs_the_transformer_student(pipeline_dir, tmp_path):
    cfg, fractions = _config(pipeline_dir, tmp_path, hidden={"weight": 1.0})
    with pytest.raises(KdpipeError, match="needs student.arch=transformer"):
        _distill(cfg, fractions, tmp_path / "s")
    assert not (tmp_path / "s").exists()


class Interrupted(Exception):
    pass


def _stop_at_evaluation(n):
    """A log_metric that raises at the n-th student evaluation (0-based epoch n)."""
    seen = []

    def log(name, value, step):
        if name == "eval/student_accuracy":
            seen.append(step)
            if len(seen) == n + 1:
                raise Interrupted
    return log


@pytest.mark.parametrize("settings", [
    {"student": {"arch": "textcnn"}, "ema": {"weight": 0.5}, "feature": {"weight": 0.5}},
    {"student": {"arch": "bilstm"}, "crd": {"weight": 0.1, "negatives": "memory_bank"},
     "early_stopping_patience": 1},
    {"student": {"arch": "fast", "fast": {"buckets": 256}}},
    {"srrd": {"weight": 0.5, "projection": "mlp"}},
    {"mutual": {"weight": 0.5}, "ema": {"weight": 0.3}},
], ids=["textcnn+ema+feature", "bilstm+crd-bank", "fast", "srrd-mlp", "mutual+ema"])
def test_interrupted_distillation_resumes_to_the_same_student(pipeline_dir, tmp_path, settings):
    cfg, fractions = _config(pipeline_dir, tmp_path, **json.loads(json.dumps(settings)))
    p = cfg.paths
    whole = distill.run(cfg, p.prepared, p.soft_labels, fractions, p.teacher, tmp_path / "whole")

    ckpt = tmp_path / "ckpt"
    with pytest.raises(Interrupted):  # dies while evaluating epoch 3: epochs 1-2 are saved
        distill.run(cfg, p.prepared, p.soft_labels, fractions, p.teacher, tmp_path / "out",
                    log_metric=_stop_at_evaluation(2), checkpoint_dir=ckpt)
    assert (ckpt / "state.json").is_file() and not (tmp_path / "out").exists()
    resumed = distill.run(cfg, p.prepared, p.soft_labels, fractions, p.teacher,
                          tmp_path / "out", checkpoint_dir=ckpt)

    record = json.loads((tmp_path / "out" / "distill.json").read_text())
    assert record["resumed_at_epoch"] == 2
    assert not ckpt.exists()
    assert resumed.metrics["val_accuracy"] == whole.metrics["val_accuracy"]
    reference = json.loads((tmp_path / "whole" / "distill.json").read_text())
    assert record["evaluations"] == reference["evaluations"]
    assert record["loss"] == reference["loss"]
    assert ((tmp_path / "out" / "model.safetensors").read_bytes()
            == (tmp_path / "whole" / "model.safetensors").read_bytes())


def test_damaged_or_foreign_distill_checkpoint_is_not_used(pipeline_dir, tmp_path, caplog):
    import logging

    cfg, fractions = _config(pipeline_dir, tmp_path)
    p = cfg.paths
    ckpt = tmp_path / "ckpt"
    with pytest.raises(Interrupted):
        distill.run(cfg, p.prepared, p.soft_labels, fractions, p.teacher, tmp_path / "out",
                    log_metric=_stop_at_evaluation(1), checkpoint_dir=ckpt)
    weights = ckpt / "student.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    with caplog.at_level(logging.WARNING, logger="kdpipe"):
        distill.run(cfg, p.prepared, p.soft_labels, fractions, p.teacher, tmp_path / "out",
                    checkpoint_dir=ckpt)
    assert "checkpoint damaged" in caplog.text
    assert json.loads((tmp_path / "out" / "distill.json").read_text())["resumed_at_epoch"] is None

    with pytest.raises(Interrupted):
        distill.run(cfg, p.prepared, p.soft_labels, fractions, p.teacher, tmp_path / "o2",
                    log_metric=_stop_at_evaluation(1), checkpoint_dir=ckpt)
    other, _ = _config(pipeline_dir, tmp_path, lr=5e-3)
    distill.run(other, p.prepared, p.soft_labels, fractions, p.teacher, tmp_path / "o2",
                checkpoint_dir=ckpt)
    assert json.loads((tmp_path / "o2" / "distill.json").read_text())["resumed_at_epoch"] is None
