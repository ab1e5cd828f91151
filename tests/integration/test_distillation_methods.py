"""`kdpipe run` on the fixture with the distillation methods that need more than the cached
logits all on at once (unlabeled in-domain texts as transfer data; attention transfer,
hidden-state matching, SRRD and feature alignment, both through the adaptive MLP
projection): the texts are labelled and learned, each term is trained and logged, and the
student they made goes through prune, export, quantize and evaluate like any other."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import build_tiny_bert, separable_rows, write_csv


def environment():
    return {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"},
            "COLUMNS": "200"}


def kdpipe_run(tmp_path, settings, *options):
    return subprocess.run(
        [sys.executable, "-m", "kdpipe", "run", *options,
         *[w for s in settings for w in ("-S", s)]],
        cwd=tmp_path, env=environment(), capture_output=True, text=True, timeout=600)


def test_unlabeled_texts_attention_srrd_and_mlp_projections_run_through_every_step(
        tmp_path, tiny_bert, separable_csv):
    work = tmp_path / "work"
    # New texts (other seed and numbering), one repeated and one that is also a train text.
    fresh = [(text.replace(" ", " really ", 1),) for text, _ in separable_rows(60, seed=7)]
    unlabeled = write_csv(tmp_path / "unlabeled.csv", fresh + [fresh[0], (
        separable_rows(200)[0][0],)], header="text")
    settings = [f"teacher.checkpoint={tiny_bert}", f"work_dir={work}",
                f"data.source={separable_csv}", f"data.unlabeled={unlabeled}",
                f"soft_labels.cache_dir={tmp_path / 'cache'}",
                "tracking.enabled=false", "teacher.epochs=8", "teacher.lr=3e-3",
                "teacher.early_stopping_patience=null", "student.arch=transformer",
                "student.transformer.teacher_layers=[1]", "distill.min_steps=0",
                "distill.attention.weight=1.0", "distill.hidden.weight=0.5",
                "distill.srrd.weight=0.5", "distill.srrd.projection=mlp",
                "distill.feature.weight=0.5", "distill.feature.projection=mlp",
                "evaluate.latency_repeats=2", "evaluate.latency_warmup=0"]
    run = kdpipe_run(tmp_path, settings)
    assert run.returncode == 0, run.stderr[-3000:]

    card = json.loads((work / "prepared" / "data_card.json").read_text())
    dropped = card["unlabeled"]["dropped"]
    assert card["unlabeled"]["rows_read"] == 62 and dropped["repeated"] == 1
    assert dropped["in_train"] + dropped["in_validation"] + dropped["in_test"] == 1
    kept = card["unlabeled"]["rows"]
    assert kept == 60
    assert f"+ {kept} unlabeled" in run.stderr
    fractions = json.loads((work / "fractions" / "report.json").read_text())
    assert fractions["rows"]["unlabeled"] == kept == fractions["per_epoch"][0]["unlabeled_kept"]

    report = json.loads((work / "student" / "distill.json").read_text())
    seen = set().union(*(set(point) - {"step", "total"} for point in report["loss"]))
    assert seen == {"kd", "attention", "hidden", "srrd", "feature"}
    # The terms were trained, not only computed: each is lower at the end than at the start.
    for name in ("attention", "srrd", "feature"):
        assert report["loss"][-1][name] < report["loss"][0][name], name
    export = json.loads((work / "export" / "export.json").read_text())
    assert export["parity"]["max_abs_diff"] <= 1e-4
    models = json.loads((work / "evaluation" / "metrics.json").read_text())["models"]
    assert models["teacher"]["accuracy"] >= 0.85, models  # the label is one word
    assert models["quantized"]["accuracy"] >= 0.8, models


def test_an_assistant_an_ensemble_domain_fractionation_and_a_peer_run_through_every_step(
        tmp_path, tiny_bert, separable_csv):
    common = [f"teacher.checkpoint={tiny_bert}", f"data.source={separable_csv}",
              f"soft_labels.cache_dir={tmp_path / 'cache'}", "tracking.enabled=false",
              "teacher.epochs=8", "teacher.lr=3e-3", "teacher.early_stopping_patience=null",
              "distill.min_steps=0", "evaluate.latency_repeats=2", "evaluate.latency_warmup=0"]
    # The assistant: a transformer student distilled from the teacher, the run stopped there.
    first = kdpipe_run(tmp_path, [*common, f"work_dir={tmp_path / 'work-ta'}",
                                  "student.arch=transformer",
                                  "student.transformer.teacher_layers=[1]"], "--to", "distill")
    assert first.returncode == 0, first.stderr[-3000:]
    assert (tmp_path / "work-ta" / "student" / "student.json").is_file()
    assert not (tmp_path / "work-ta" / "pruned").exists()

    second = build_tiny_bert(tmp_path / "second-teacher", seed=1)  # untrained, but a head
    work = tmp_path / "work"
    run = kdpipe_run(tmp_path, [*common, f"work_dir={work}",
                                f"soft_labels.assistant={tmp_path / 'work-ta' / 'student'}",
                                f"soft_labels.teachers=[{second}]",
                                "soft_labels.ensemble=confidence",
                                "fractionate.strategy=domain", "fractionate.fraction=0.8",
                                "fractionate.domain_score=knn", "distill.mutual.weight=0.5"])
    assert run.returncode == 0, run.stderr[-3000:]
    parts = json.loads((work / "soft_labels" / "manifest.json").read_text())["parts"]
    assert "assistant" in parts and len(parts["teachers"]) == 1
    fractions = json.loads((work / "fractions" / "report.json").read_text())
    epoch = fractions["per_epoch"][0]
    assert fractions["strategy"] == "domain" and epoch["kept_fraction"] < 0.85
    assert epoch["mean_domain_similarity_after"] >= epoch["mean_domain_similarity_before"]
    report = json.loads((work / "student" / "distill.json").read_text())
    assert {e["which"] for e in report["evaluations"]} == {"student", "peer"}
    assert "mutual" in report["loss"][0]
    models = json.loads((work / "evaluation" / "metrics.json").read_text())["models"]
    assert models["quantized"]["accuracy"] >= 0.8, models
