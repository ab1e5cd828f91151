"""bench/run.py end to end on a tiny teacher and a separable fixture: the pipeline through
DVC, every system scored and timed, the re-run, the JSON other scripts read. (A scaling
point is the same pipeline run on ``subset_data``'s output, tested on its own.)"""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import separable_rows, write_csv

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import run as bench  # noqa: E402
from baseline import tfidf_lr  # noqa: E402


def _data(folder: Path) -> Path:
    rows = separable_rows(360)
    write_csv(folder / "train.csv", [(t, int(lab == "pos")) for t, lab in rows[:240]])
    write_csv(folder / "validation.csv", [(t, int(lab == "pos")) for t, lab in rows[240:300]])
    write_csv(folder / "test.csv", [(t, int(lab == "pos")) for t, lab in rows[300:]])
    return folder


def test_tfidf_baseline_learns_a_separable_set_and_saves_its_weights(tmp_path):
    rows = separable_rows(300)
    texts, labels = [t for t, _ in rows], np.array([int(lab == "pos") for _, lab in rows])
    model, info = tfidf_lr(texts[:200], labels[:200], texts[200:], labels[200:], 2,
                           tmp_path / "tfidf")
    assert info["C"] in (0.5, 2.0, 8.0)
    predicted = model.logits(texts[200:]).argmax(axis=1)
    assert (predicted == labels[200:]).mean() > 0.9
    vocab = len(json.loads((tmp_path / "tfidf" / "vocab.json").read_text()))
    assert model.params == 2 * vocab + 1  # binary: one weight row and one idf per term, 1 bias


def test_subset_keeps_the_fraction_and_the_other_splits(tmp_path):
    data = _data(tmp_path / "data")
    subset = bench.subset_data(data, tmp_path / "sub", 0.25)
    assert len((subset / "train.csv").read_text().splitlines()) == 1 + 60
    assert (subset / "test.csv").read_bytes() == (data / "test.csv").read_bytes()


def test_targets_are_checked_against_their_thresholds():
    systems = {"student_int8": {"pct_of_teacher": 99.5, "throughput_b32": 3000,
                                "latency_b1_p50_ms": 0.25, "size_bytes": 1_000, "accuracy": 0.9},
               "teacher_int8": {"throughput_b32": 100}, "tfidf_lr": {"accuracy": 0.86},
               "fasttext": {"accuracy": 0.84},
               "student_fast": {"latency_b1_p50_ms": 0.04, "throughput_b32": 39_000,
                                "accuracy": 0.875}}
    doc = {"data": "sst2", "systems": systems, "teacher": {"onnx_fp32_bytes": 30_000},
           "cold": True, "total_seconds": 2000, "rerun": {"fraction_of_cold": 0.2}}
    targets = bench.check_targets(doc)
    assert {k: t["met"] for k, t in targets.items()} == {
        "int8_pct_of_teacher": True, "teacher_onnx_over_folder": True,
        "points_over_tfidf": False, "b32_vs_teacher_int8": False, "b1_p50_ms": False,
        "points_over_fasttext": True, "fast_b1_p50_ms": True, "fast_b32_texts_per_s": False,
        "fast_points_over_fasttext": True, "cold_minutes": True,
        "rerun_fraction_of_cold": False}
    assert targets["b32_vs_teacher_int8"]["value"] == 30.0
    assert targets["fast_points_over_fasttext"]["value"] == 3.5
    # AG News: a 0.3 ms batch-1 bound, no lead over fastText asked of the fast student.
    doc["data"] = "ag_news"
    systems["student_fast"]["accuracy"] = 0.84
    targets = bench.check_targets(doc)
    assert targets["b1_p50_ms"]["met"] and targets["fast_points_over_fasttext"]["met"]
    assert targets["points_over_fasttext"]["target"] == ">= 2"
    # An extra split: 97% of the teacher, and no speed or cold-run targets.
    doc["data"] = "ag_news_1k"
    systems["student_int8"]["pct_of_teacher"] = 97.2
    targets = bench.check_targets(doc)
    assert targets["int8_pct_of_teacher"]["met"]
    assert not {"b32_vs_teacher_int8", "fast_b1_p50_ms", "cold_minutes"} & set(targets)


def test_timing_rounds_take_turns_and_ratios_are_taken_round_by_round(monkeypatch):
    """The systems are timed in turn, round after round; a slow spell of the machine (round
    2 here, 3x slower) moves each system's rounds but not the round-by-round ratio."""
    logits_calls: list[tuple[str, int]] = []
    last: dict[str, float] = {}

    class Fake:
        def __init__(self, name: str, ms_per_text: float) -> None:
            self.name, self.cost = name, ms_per_text / 1000

        def logits(self, texts):
            logits_calls.append((self.name, len(texts)))
            last["seconds"] = self.cost * len(texts)

        def tokenize(self, texts):
            last["seconds"] = 1e-6

    def fake_timed(call, budget, warmup=3, least=5, most=2000):
        call()
        round_index = (len(logits_calls) - 1) // (2 * len(bench.BATCHES))
        return np.full(least, last["seconds"] * (3.0 if round_index == 2 else 1.0))

    monkeypatch.setattr(bench, "timed", fake_timed)
    models = {"teacher": Fake("teacher", 2.0), "student": Fake("student", 0.05)}
    found = bench.timing_rounds(models, [f"text {i}" for i in range(300)], 1.0, rounds=4)
    one_round = [(n, b) for n in ("teacher", "student") for b in bench.BATCHES]
    assert logits_calls == one_round * 4
    teacher, student = found["teacher"], found["student"]
    assert teacher["throughput_b32_rounds"][2] == pytest.approx(
        teacher["throughput_b32_rounds"][0] / 3)
    assert teacher["throughput_b32"] == pytest.approx(500.0)  # the median ignores the spell
    assert bench.round_ratio(student, teacher, "throughput_b32") == pytest.approx(40.0)
    assert student["latency_b1_p50_ms"] == pytest.approx(0.05)


@pytest.mark.slow
def test_bench_run_end_to_end(tmp_path, tiny_bert, capsys, monkeypatch):
    data = _data(tmp_path / "mini")
    tiny = [f"teacher.checkpoint={tiny_bert}", "teacher.epochs=1", "student.embedding_dim=16",
            "distill.epochs=2", "distill.min_steps=0", "evaluate.latency_repeats=2",
            "evaluate.latency_warmup=0", "ingest.max_length=32",
            "tracking.enabled=false"]  # MLflow costs each stage seconds; tested elsewhere
    argv = ["--data", str(data), "--work", str(tmp_path / "work"), "--results",
            str(tmp_path / "results"), "--budget", "0.05"]
    for item in tiny:
        argv += ["-S", item]
    # The re-run changes an evaluate setting: it exercises the same code as a distill change
    # at fewer stages. (test_dvc.py checks what a distill change makes DVC re-run.)
    monkeypatch.setattr(bench, "RERUN_CHANGE", ("evaluate", "ece_bins", 10))
    doc = bench.main(argv)
    saved = json.loads((tmp_path / "results" / "mini.json").read_text())
    assert saved["data"] == "mini" and list(saved["systems"]) == list(bench.SYSTEMS)
    for name, m in saved["systems"].items():
        assert 0.0 <= m["accuracy"] <= 1.0 and m["test_accuracy"] is not None, name
        assert m["latency_b1_p95_ms"] >= m["latency_b1_p50_ms"] > 0, name
        assert m["throughput_b256"] > 0 and m["size_bytes"] > 0 and m["params"] > 0, name
    assert saved["systems"]["tfidf_lr"]["accuracy"] > 0.9  # the fixture is separable
    # The int8 folder is the quantize step's; the hard-label student is a separate run.
    assert saved["systems"]["student_int8"]["params"] != saved["systems"]["teacher_fp32"]["params"]
    assert list(saved["step_seconds"]) == ["ingest", "teacher", "baseline", "soft_labels",
                                          "fractionate",
                                          "distill", "prune", "export", "quantize",
                                          "evaluate", "register"]
    assert saved["scaling"]["1"]["train_rows"] == 240
    rerun = saved["rerun"]
    # baseline, evaluate and register read the evaluate settings; ingest always runs; the
    # rest is skipped.
    assert rerun["stages_changed"] == ["baseline", "evaluate", "ingest", "register"]
    assert rerun["change"] == "evaluate.ece_bins=10"
    assert rerun["seconds"] > 0
    # kdpipe run, timed first from the same state, ran those steps but ingest: its
    # provenance knows the source did not change.
    assert rerun["kdpipe_run"]["steps_run"] == ["baseline", "evaluate", "register"]
    assert rerun["kdpipe_run"]["seconds"] > 0
    assert set(saved["targets"]) >= {"int8_pct_of_teacher", "points_over_fasttext",
                                     "rerun_fraction_of_cold",
                                     "rerun_kdpipe_run_fraction_of_cold"}
    # The fast student: distilled from the same soft labels, served from its ONNX graph.
    fast = json.loads((tmp_path / "work" / "mini" / "student_fast" / "student.json").read_text())
    assert fast["arch"] == "fast" and saved["settings"]["fast_student"] == bench.FAST_SETTINGS
    assert doc["targets"] == saved["targets"]
    assert (tmp_path / "results" / "mini.png").stat().st_size > 1000
    assert "| student_int8 |" in capsys.readouterr().out
    # Reused with nothing changed since the re-run: DVC skips every stage and the record is
    # the cold run's, as written to the project while it ran.
    project = tmp_path / "work" / "mini" / "full"
    again = bench.run_pipeline(project, data, [], fresh=False)
    assert again["cold"] and again["step_seconds"] == saved["step_seconds"]
    # After a change, the stages run again and the record says it was not cold. (A change
    # only register reads: the distill re-run above already ran the long way.)
    params = project / "params.yaml"
    text = params.read_text()
    assert text.count("max_regression: 0.005") == 1
    params.write_text(text.replace("max_regression: 0.005", "max_regression: 0.01"))
    assert bench.dvc_changed(project) == ["register"]
    changed = bench.run_pipeline(project, data, [], fresh=False)
    assert not changed["cold"] and list(changed["step_seconds"]) == list(saved["step_seconds"])
    assert bench.dvc_changed(project) == []
    # The extra systems: trained again when the pipeline changed since (the re-run and the
    # register change above), kept when it did not (only TF-IDF, seconds, is fitted again).
    root = tmp_path / "work" / "mini"
    weights = root / "student_fast" / "model.safetensors"
    first = weights.stat().st_mtime_ns
    extras = bench.train_baselines(project, root, reuse=True)
    assert weights.stat().st_mtime_ns != first
    retrained = weights.stat().st_mtime_ns
    kept = bench.train_baselines(project, root, reuse=True)
    assert weights.stat().st_mtime_ns == retrained
    assert kept["student_fast"] == extras["student_fast"]
    assert isinstance(kept["fasttext"]["folder"], Path) and "model" in kept["tfidf_lr"]
