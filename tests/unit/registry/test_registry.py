"""The register step and promotion on a SQLite registry: versions, tags, the model card,
aliases; the gate moves ``champion`` only for a model that is not worse on the same rows;
a worse model leaves it where it was and says why; forced promotion and rollback.

The models are real ONNX folders that ``Predictor`` serves: one from the export step (an
untrained TextCNN) and hand-built keyword classifiers whose accuracy on the separable data
is known exactly (1.0, or 0.0 when flipped).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import NEGATIVE, POSITIVE, prepared_config, save_fresh_student

from kdpipe.errors import KdpipeError

NAME = "tiny-clf"
SMALL_STUDENT = {"arch": "textcnn", "embedding_dim": 16, "textcnn": {"num_filters": 4}}


# --- helpers shared with test_pyfunc_serve.py and test_cli.py ------------------------------

def sqlite_store(db: Path, basetemp: Path) -> str:
    """A SQLite tracking URI at ``db``, copied from a store migrated once per session
    (creating MLflow's schema takes seconds)."""
    template = basetemp / "mlflow-template.db"
    if not template.exists():
        from mlflow import MlflowClient

        scratch = basetemp / "mlflow-template.tmp.db"
        MlflowClient(tracking_uri=f"sqlite:///{scratch}").search_experiments()
        scratch.rename(template)
    db.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, db)
    return f"sqlite:///{db}"


def keyword_model(folder: Path, tokenizer_source: Path, labels: list[str],
                  flip: bool = False, max_length: int = 32) -> Path:
    """An exported folder whose ONNX graph sums, over the unpadded tokens, a one-hot vote per
    sentiment word: accuracy 1.0 on ``separable_rows`` (0.0 when ``flip``)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_source))
    vocab = tokenizer.get_vocab()
    pos, neg = labels.index("pos"), labels.index("neg")
    if flip:
        pos, neg = neg, pos
    weights = np.zeros((len(vocab), len(labels)), np.float32)
    for words, column in ((POSITIVE, pos), (NEGATIVE, neg)):
        for word in words:
            weights[vocab[word], column] = 1.0
    nodes = [helper.make_node("Gather", ["W", "input_ids"], ["votes"]),
             helper.make_node("Cast", ["attention_mask"], ["mask"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["mask", "axis2"], ["mask3"]),
             helper.make_node("Mul", ["votes", "mask3"], ["kept"]),
             helper.make_node("ReduceSum", ["kept", "axis1"], ["logits"], keepdims=0)]
    ints = TensorProto.INT64
    graph = helper.make_graph(
        nodes, "keyword",
        [helper.make_tensor_value_info("input_ids", ints, ["batch", "sequence"]),
         helper.make_tensor_value_info("attention_mask", ints, ["batch", "sequence"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", len(labels)])],
        [numpy_helper.from_array(weights, "W"),
         numpy_helper.from_array(np.array([2], np.int64), "axis2"),
         numpy_helper.from_array(np.array([1], np.int64), "axis1")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(folder / "model.onnx"))
    tokenizer.save_pretrained(folder)
    (folder / "labels.json").write_text(json.dumps({"names": labels}))
    (folder / "export.json").write_text(json.dumps({"format": 1, "arch": "keyword",
                                                    "max_length": max_length}))
    return folder


def metrics_entry(accuracy: float, size_bytes: int = 50_000, latency_ms: float = 0.4,
                  teacher_accuracy: float = 0.9, path: str = "work/quantized") -> dict:
    """One model's metrics.json entry in the evaluate step's format."""
    timing = {"b1": {"p50": latency_ms, "p95": 1.5 * latency_ms},
              "b32": {"p50": 8 * latency_ms, "p95": 10 * latency_ms}}
    return {"kind": "onnx", "path": path, "accuracy": accuracy, "macro_f1": accuracy - 0.01,
            "per_class": {}, "confusion": [[1, 0], [0, 1]], "ece": 0.05,
            "agreement_with_teacher": 0.9, "latency_ms": timing, "tokenize_ms": timing,
            "throughput": {"b1": 1000 / latency_ms, "b32": 32000 / (8 * latency_ms)},
            "size_bytes": size_bytes, "params": 1234,
            "vs_teacher": {"accuracy": accuracy / teacher_accuracy, "speedup_b1_p50": 20.0,
                           "size": 0.05, "params": 0.01}}


def write_metrics(folder: Path, models: dict[str, dict], rows: int = 20) -> Path:
    """evaluation folder with metrics.json holding ``models`` (a teacher entry is added
    unless given)."""
    models = {"teacher": {**metrics_entry(0.9, 4_000_000, 5.0), "kind": "pytorch"}, **models}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps({
        "format": 1, "split": "validation", "rows": rows, "threads": 1,
        "labels": ["neg", "pos"], "reference": "teacher", "models": models}))
    return folder


def registry_config(root: Path, tiny_bert: Path, uri: str, **sections):
    return prepared_config(root, tiny_bert, student=SMALL_STUDENT,
                           tracking={"enabled": True, "uri": uri}, **sections)


def prepared_labels(cfg) -> list[str]:
    return json.loads((cfg.paths.prepared / "labels.json").read_text())["names"]


# --- fixtures --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_bert):
    """(cfg, root, folders): prepared data, a SQLite store, and three real model folders:
    ``textcnn`` (the export step's output), ``good`` (accuracy 1.0), ``bad`` (0.0)."""
    import torch

    from kdpipe.models.teacher import load_tokenizer
    from kdpipe.steps import export

    root = tmp_path_factory.mktemp("registry")
    uri = sqlite_store(root / "mlflow.db", tmp_path_factory.getbasetemp())
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        # The story is about the champion comparison (a 50% student registers first); the
        # retention minimum is test_gate's.
        cfg = registry_config(root, tiny_bert, uri, registry={
            "model_name": NAME, "gate": {"min_teacher_retention": 0.0}})
        labels = prepared_labels(cfg)
        torch.set_num_threads(1)
        save_fresh_student(root / "student", cfg.student, tiny_bert,
                           load_tokenizer(str(tiny_bert)))
        export.run(cfg, root / "student", cfg.paths.prepared, root / "textcnn")
        folders = {"textcnn": root / "textcnn",
                   "good": keyword_model(root / "good", tiny_bert, labels),
                   "bad": keyword_model(root / "bad", tiny_bert, labels, flip=True)}
        yield cfg, root, folders


def register(cfg, root, folder, accuracy, tag, **metric_overrides):
    from kdpipe.steps import register as step

    evaluation = write_metrics(root / f"evaluation-{tag}",
                               {"quantized": metrics_entry(accuracy, **metric_overrides)})
    return step.run(cfg, folder, evaluation, cfg.paths.prepared, root / f"register-{tag}")


def read_record(result) -> dict:
    return json.loads((result.out_dir / "register.json").read_text())


# --- tests -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def story(env):
    """Three versions of NAME registered in order: v1 the export step's TextCNN (no champion
    yet), v2 the perfect keyword model, v3 the always-wrong one."""
    cfg, root, folders = env
    return [register(cfg, root, folders["textcnn"], 0.5, "v1"),
            register(cfg, root, folders["good"], 1.0, "v2"),
            register(cfg, root, folders["bad"], 0.0, "v3")]


def check(record, name):
    return next(c for c in record["gate"]["checks"] if c["name"] == name)


def test_first_version_becomes_champion_with_no_champion_to_beat(story):
    rec = read_record(story[0])
    assert (rec["version"], rec["promoted"], rec["champion_before"], rec["champion_after"]) \
        == (1, True, None, 1)
    assert check(rec, "max_regression")["message"] == "no champion yet"
    assert len(rec["gate"]["checks"]) == 5 and all(c["passed"] for c in rec["gate"]["checks"])
    assert rec["model_uri"] == f"models:/{NAME}/1" and rec["run_id"]
    assert rec["aliases"] == {"challenger": 1, "champion": 1}


def test_better_version_takes_over_measured_on_the_same_rows(story):
    rec = read_record(story[1])
    assert rec["promoted"] and (rec["champion_before"], rec["champion_after"]) == (1, 2)
    regression = check(rec, "max_regression")
    assert regression["passed"] and "champion v1" in regression["message"]
    assert "same 20 validation rows" in regression["message"]
    assert regression["value"] > 0  # 1.0 minus the untrained TextCNN's accuracy


def test_worse_version_leaves_champion_and_says_why(story, env):
    from kdpipe.registry.store import open_registry

    third = story[2]
    rec = read_record(third)
    assert rec["version"] == 3 and not rec["promoted"]
    assert (rec["champion_before"], rec["champion_after"]) == (2, 2)
    failed = [c for c in rec["gate"]["checks"] if not c["passed"]]
    assert [c["name"] for c in failed] == ["max_regression"]
    assert failed[0]["value"] == pytest.approx(-1.0)
    assert "accuracy 0.00% vs champion v2 100.00%" in failed[0]["message"]
    assert rec["summary"] == third.summary.split(": ", 1)[1]
    assert "v3 not promoted, champion stays v2" in third.summary
    assert "-100.00 points" in third.summary
    assert third.metrics["promoted"] == 0.0 and third.metrics["version"] == 3.0
    registry = open_registry(env[0])
    assert registry.aliases(NAME) == {"challenger": 3, "champion": 2}
    assert registry.version(NAME, 3).tags["kdpipe.gate"] == "refused"


def test_forced_promotion_and_rollback(story, env):
    from kdpipe.registry.promotion import list_models, promote
    from kdpipe.registry.store import open_registry

    cfg = env[0]
    registry = open_registry(cfg)
    # The challenger (v3) is refused again: promote defaults to it.
    again = promote(cfg)
    assert again.version == 3 and not again.promoted and again.champion_after == 2

    # Rolling back to v1 through the gate is refused (v1 is worse than v2)...
    refused = promote(cfg, version=1)
    assert not refused.promoted and registry.alias(NAME, "champion") == 2
    assert "v1 not promoted, champion stays v2" in refused.summary()
    # ...forced, it happens, and the version says it was forced, by whom and when.
    forced = promote(cfg, version=1, force=True)
    assert forced.promoted and (forced.champion_before, forced.champion_after) == (2, 1)
    assert forced.summary().startswith("v1 FORCED to champion past the gate")
    assert forced.to_dict()["forced"] and not forced.decision.passed
    tags = registry.version(NAME, 1).tags
    assert tags["kdpipe.forced_promotion"] == "true"
    assert tags["kdpipe.promoted_by"] and tags["kdpipe.promoted_at"].startswith("20")
    assert registry.alias(NAME, "champion") == 1

    # Promoting v2 again passes the gate on its own (it beats v1) and clears the flag.
    back = promote(cfg, version=2)
    assert back.promoted and back.decision.passed and not back.decision.forced
    assert registry.version(NAME, 2).tags["kdpipe.forced_promotion"] == "false"
    assert promote(cfg, version=2).note == "v2 already is the champion"

    versions = list_models(cfg)
    assert [v.version for v in versions] == [1, 2, 3]
    assert versions[1].aliases == ("champion",) and versions[2].aliases == ("challenger",)
    assert versions[2].metrics.accuracy == 0.0 and versions[1].metrics.accuracy == 1.0


def test_version_carries_provenance_tags_and_model_card(env):
    from kdpipe.registry.store import open_registry

    cfg, root, folders = env
    other = cfg.model_copy(update={"registry": cfg.registry.model_copy(
        update={"model_name": "card-check", "auto_promote": False})})
    result = register(other, root, folders["good"], 1.0, "card", size_bytes=12_345,
                      latency_ms=0.25)
    rec = read_record(result)
    assert rec["gate"] is None and not rec["promoted"]
    assert "auto_promote is off" in result.summary
    version = open_registry(cfg).version("card-check", rec["version"])
    data_card = json.loads((cfg.paths.prepared / "data_card.json").read_text())
    tags = version.tags
    assert tags["kdpipe.data_hash"] == data_card["content_hash"]
    assert tags["kdpipe.params_hash"] == other.params_hash()
    assert tags["kdpipe.teacher_checkpoint"] == other.teacher.checkpoint
    assert float(tags["kdpipe.accuracy"]) == 1.0
    assert float(tags["kdpipe.teacher_accuracy"]) == 0.9
    assert float(tags["kdpipe.retention"]) == pytest.approx(1 / 0.9, rel=1e-5)
    assert float(tags["kdpipe.latency_b1_p50_ms"]) == 0.25
    assert tags["kdpipe.size_bytes"] == "12345"
    card = (result.out_dir / "model_card.md").read_text()
    assert version.description == card
    for heading in ("## Data", "## Models", "## Metrics", "## Limits", "## Provenance"):
        assert heading in card
    assert data_card["content_hash"] in card and "| quantized (registered) | 100.00%" in card
    assert "kdpipe.teachers" not in tags

    # Soft labels from an ensemble: the version says which teachers, and how combined.
    ensemble = other.model_copy(update={
        "registry": other.registry.model_copy(update={"model_name": "ensemble-check"}),
        "soft_labels": other.soft_labels.model_copy(update={
            "teachers": ["runs/seed1/teacher", "runs/seed2/teacher"],
            "ensemble": "confidence"})})
    result = register(ensemble, root, folders["good"], 1.0, "ensemble")
    tags = open_registry(cfg).version("ensemble-check", read_record(result)["version"]).tags
    assert json.loads(tags["kdpipe.teachers"]) == [
        other.teacher.checkpoint, "runs/seed1/teacher", "runs/seed2/teacher"]
    assert tags["kdpipe.teacher_ensemble"] == "confidence"
    assert tags["kdpipe.teacher_checkpoint"] == other.teacher.checkpoint
    assert ("with 2 more teachers (confidence of their distributions): runs/seed1/teacher, "
            "runs/seed2/teacher") in (result.out_dir / "model_card.md").read_text()


def test_exported_candidate_without_metrics_entry_is_measured_and_says_so(env):
    from kdpipe.steps import register as step

    cfg, root, folders = env
    registry_cfg = cfg.registry.model_copy(update={"model_name": "exported-check",
                                                   "candidate": "exported"})
    cfg = cfg.model_copy(update={"registry": registry_cfg})
    evaluation = write_metrics(root / "evaluation-exported", {})
    result = step.run(cfg, folders["good"], evaluation, cfg.paths.prepared,
                      root / "register-exported")
    rec = read_record(result)
    assert rec["metrics_source"] == "measured here"
    assert rec["metrics"]["accuracy"] == 1.0 and rec["metrics"]["latency_b1_p50_ms"] is None
    assert any("latency was not measured" in note for note in rec["notes"])
    assert rec["promoted"]  # first version: nothing to regress against, no latency limit
    card = (result.out_dir / "model_card.md").read_text()
    assert "measured at registration" in card


def test_logs_into_the_step_run_the_cli_adapter_opened(env):
    import mlflow

    from kdpipe import tracking

    cfg, root, folders = env
    cfg = cfg.model_copy(update={
        "tracking": cfg.tracking.model_copy(update={"enabled": True}),
        "registry": cfg.registry.model_copy(update={"model_name": "in-step-run"})})
    opened = []

    def call(log_metric):
        opened.append(mlflow.active_run().info.run_id)
        return register(cfg, root, folders["good"], 1.0, "step-run")

    result = tracking.step_run(cfg, "register", call)
    rec = read_record(result)
    assert rec["run_id"] == opened[0]  # logged into the adapter's run, not a run of its own
    run = mlflow.MlflowClient(tracking_uri=cfg.tracking.uri).get_run(rec["run_id"])
    assert run.data.metrics["version"] == 1.0 and run.data.metrics["promoted"] == 1.0
    assert mlflow.active_run() is None
    assert mlflow.MlflowClient(tracking_uri=cfg.tracking.uri).get_model_version(
        "in-step-run", "1").run_id == rec["run_id"]


@pytest.mark.parametrize("problem,message", [
    ("no_metrics", "metrics.json: not found; run `kdpipe evaluate` first"),
    ("no_quantized_entry", "no models.quantized entry"),
    ("bad_json", "metrics.json: not readable JSON"),
    ("no_model", "model.onnx: not found"),
])
def test_bad_inputs_are_one_line_errors_before_anything_is_registered(env, tmp_path,
                                                                      problem, message):
    from kdpipe.steps import register as step

    cfg, root, folders = env
    folder = shutil.copytree(folders["good"], tmp_path / "model")
    evaluation = write_metrics(tmp_path / "evaluation", {"quantized": metrics_entry(1.0)})
    if problem == "no_metrics":
        (evaluation / "metrics.json").unlink()
    elif problem == "no_quantized_entry":
        write_metrics(evaluation, {})
    elif problem == "bad_json":
        (evaluation / "metrics.json").write_text("{not json")
    elif problem == "no_model":
        (folder / "model.onnx").unlink()
    with pytest.raises(KdpipeError, match=message) as caught:
        step.run(cfg, folder, evaluation, cfg.paths.prepared, tmp_path / "out")
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_unknown_model_and_version_are_clear_errors(story, env):
    from kdpipe.registry.promotion import list_models, promote

    cfg = env[0]
    with pytest.raises(KdpipeError, match=r"version 99 of registered model 'tiny-clf'"
                                          r": not found in sqlite:///"):
        promote(cfg, version=99)
    missing = cfg.model_copy(update={"registry": cfg.registry.model_copy(
        update={"model_name": "never-registered"})})
    with pytest.raises(KdpipeError, match="registered model 'never-registered': not found"):
        list_models(missing)
    with pytest.raises(KdpipeError, match="not found"):
        promote(missing)


def test_missing_prepared_data_stops_an_unforced_promotion(story, env, tmp_path):
    from kdpipe.registry.promotion import promote

    cfg = env[0]
    with pytest.raises(KdpipeError, match=r"validation.parquet: not found .*--force"):
        promote(cfg, version=3, prepared_dir=tmp_path / "nowhere")


def test_tracking_off_skips_registration_and_says_so(env, tmp_path):
    from kdpipe.steps import register as register_step

    cfg, root, folders = env
    off = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"enabled": False})})
    evaluation = write_metrics(tmp_path / "evaluation",
                               {"quantized": metrics_entry(1.0, 1000, 1.0)})
    result = register_step.run(off, folders["good"], evaluation, off.paths.prepared,
                               tmp_path / "register")
    record = json.loads((tmp_path / "register" / "register.json").read_text())
    assert record["skipped"].startswith("skipped: tracking.enabled is false")
    assert result.metrics == {"registered": 0.0} and "tracking.enabled" in result.summary


def test_a_champion_whose_files_are_gone_is_refused_then_deleted_is_replaced(env, tmp_path):
    """Corrupt registry state: the champion's artifacts deleted behind MLflow's back make the
    gate refuse (never compare against nothing); once the version itself is deleted (its
    aliases go with it) the next candidate is promoted as the first champion."""
    import mlflow

    from kdpipe.registry.promotion import promote
    from kdpipe.registry.store import open_registry

    cfg, root, folders = env
    cfg = cfg.model_copy(update={"registry": cfg.registry.model_copy(
        update={"model_name": "lost-champion"})})
    first = read_record(register(cfg, root, folders["good"], 1.0, "lost-v1"))
    assert first["champion_after"] == 1
    client = mlflow.MlflowClient(tracking_uri=cfg.tracking.uri)
    source = client.get_model_version("lost-champion", "1").source
    location = client.get_logged_model(source.removeprefix("models:/")).artifact_location
    shutil.rmtree(location.removeprefix("file://"))

    second = read_record(register(cfg, root, folders["textcnn"], 1.0, "lost-v2"))
    assert not second["promoted"] and second["champion_after"] == 1
    regression = check(second, "max_regression")
    assert not regression["passed"] and "v1" in regression["message"]

    client.delete_model_version("lost-champion", "1")
    assert "champion" not in open_registry(cfg).aliases("lost-champion")
    again = promote(cfg, version=2)
    assert again.promoted and again.champion_after == 2


def test_the_same_candidate_registered_again_completes_its_version_instead_of_adding_one(env):
    """A rerun after a failure registers the same files, data and settings: it finds the
    version by its candidate key, rewrites its tags and card, and adds no duplicate."""
    from kdpipe.registry.store import CANDIDATE_KEY, open_registry

    cfg, root, folders = env
    cfg = cfg.model_copy(update={"registry": cfg.registry.model_copy(
        update={"model_name": "rerun"})})
    first = read_record(register(cfg, root, folders["good"], 1.0, "rerun-1"))
    registry = open_registry(cfg)
    registry.set_tags("rerun", 1, {"kdpipe.accuracy": "0.5"})  # as a half-finished run left it
    again = register(cfg, root, folders["good"], 1.0, "rerun-2")
    second = read_record(again)
    assert (first["version"], second["version"]) == (1, 1)
    assert "(already registered)" in again.summary
    # The first attempt promoted it: the rerun reports that promotion, as a run never
    # interrupted would, rather than "already champion".
    assert second["promoted"] and second["gate"] == first["gate"]
    assert (second["champion_before"], second["champion_after"]) == (None, 1)
    assert again.metrics["promoted"] == again.metrics["gate_passed"] == 1.0
    assert any("already held this candidate" in n for n in second["notes"])
    versions = registry.versions("rerun")
    assert [v.version for v in versions] == [1]
    assert versions[0].tags["kdpipe.accuracy"] == "1"
    assert versions[0].tags[CANDIDATE_KEY] and "champion" in versions[0].aliases
    other = read_record(register(cfg, root, folders["textcnn"], 1.0, "rerun-3"))
    assert other["version"] == 2  # other files: another candidate


def test_promotions_take_turns_under_the_registry_lock(env):
    """One promotion at a time: a second waits while the lock is held, says for whom, and
    goes on once it is released; a lock whose holder died is taken over; a lock held past
    the wait is a one-line error."""
    import threading

    from kdpipe.errors import KdpipeError
    from kdpipe.registry.store import open_registry

    cfg, _, _ = env
    registry = open_registry(cfg)
    heard: list[str] = []
    order: list[str] = []
    with registry.locked("turns"):
        def second():
            with registry.locked("turns", waiting=heard.append):
                order.append("second")

        waiter = threading.Thread(target=second)
        waiter.start()
        waiter.join(timeout=2)
        assert waiter.is_alive() and order == []  # still waiting
        order.append("first")
    waiter.join(timeout=30)
    assert order == ["first", "second"]
    assert len(heard) == 1 and "pid" in heard[0]
    assert not registry.exists("turns.promotion-lock")  # released

    registry.client.create_registered_model("stale.promotion-lock")  # a holder that died
    time.sleep(0.05)
    with registry.locked("stale", stale_s=0.01):
        pass
    # A holder on this host whose process has ended is gone at once, whatever the lock's age.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    registry.client.create_registered_model(
        "killed.promotion-lock", description=f"lock, held by {socket.gethostname()} "
        f"pid {dead.pid}; x")
    started = time.monotonic()
    with registry.locked("killed", wait_s=30):
        assert time.monotonic() - started < 5
    registry.client.create_registered_model("held.promotion-lock",
                                            description="lock, held by other-host pid 7; x")
    with pytest.raises(KdpipeError, match=r"another promotion \(other-host pid 7\)"):
        with registry.locked("held", wait_s=0.5):
            pass


def test_an_alias_never_points_at_a_version_still_being_registered(env, monkeypatch):
    from dataclasses import replace

    from kdpipe.errors import KdpipeError
    from kdpipe.registry import promotion
    from kdpipe.registry.store import Registry

    cfg, root, folders = env
    cfg = cfg.model_copy(update={"registry": cfg.registry.model_copy(
        update={"model_name": "pending"})})
    register(cfg, root, folders["good"], 1.0, "pending")
    real = Registry.version
    monkeypatch.setattr(Registry, "version", lambda self, name, version: replace(
        real(self, name, version), status="PENDING_REGISTRATION"))
    with pytest.raises(KdpipeError, match="PENDING_REGISTRATION, not READY"):
        promotion.promote(cfg, version=1)


def test_compare_finds_a_version_by_the_run_that_registered_it(story, env):
    from kdpipe.registry.compare import resolve, rows
    from kdpipe.registry.store import open_registry

    registry = open_registry(env[0])
    record = read_record(story[1])
    assert resolve(registry, NAME, record["run_id"]).version == 2
    assert resolve(registry, NAME, "v3").version == 3
    table = dict(rows([resolve(registry, NAME, "1"), resolve(registry, NAME, "2")]))
    assert table["accuracy"] == ["50.00%", "100.00% *"]
    assert table["student"][0] == "textcnn"
    with pytest.raises(KdpipeError, match="not found in sqlite"):
        resolve(registry, NAME, "ab" * 16)
