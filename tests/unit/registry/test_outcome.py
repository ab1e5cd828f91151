"""The outcome the parent run shows: name, description, headline metrics and tags, from
the evaluate step's metrics.json, register.json and the data card."""

from __future__ import annotations

import pytest

from kdpipe.registry.gate import gate_table
from kdpipe.registry.outcome import HEADLINE_METRICS, dataset_name, outcome, status


def evaluation() -> dict:
    def entry(accuracy, p50, size, vs=None):
        return {"accuracy": accuracy, "latency_ms": {"b1": {"p50": p50}}, "size_bytes": size,
                "vs_teacher": vs}

    return {"split": "validation", "rows": 872, "reference": "teacher",
            "latency": {"batch_sizes": [1, 32]},
            "models": {"teacher": entry(0.91, 7.5, 90_000_000),
                       "quantized": entry(0.885, 0.3, 3_000_000,
                                          {"speedup_b1_p50": 25.0, "size": 1 / 30})}}


CHECKS = [
    {"name": "min_accuracy", "value": 0.885, "threshold": 0.0, "passed": True, "message": ""},
    {"name": "min_teacher_retention", "value": 0.9725, "threshold": 0.95, "passed": True,
     "message": ""},
    {"name": "max_latency_p50_ms", "value": 0.3, "threshold": None, "passed": True,
     "message": ""},
    {"name": "max_size_bytes", "value": 3_000_000, "threshold": 2_000_000, "passed": False,
     "message": "size 3.00 MB over the 2.00 MB limit"},
    {"name": "max_regression", "value": -0.01, "threshold": -0.005, "passed": False,
     "message": "accuracy 88.50% vs champion v2 89.50%"},
]


def record(promoted: bool, champion: int | None, gate=True) -> dict:
    return {"name": "kdpipe-student", "version": 3, "model_uri": "models:/kdpipe-student/3",
            "metrics_source": "quantized", "promoted": promoted, "champion_before": 2,
            "aliases": {"challenger": 3, "champion": champion},
            "metrics": {"accuracy": 0.885, "teacher_accuracy": 0.91, "retention": 0.9725,
                        "latency_b1_p50_ms": 0.3, "size_bytes": 3_000_000},
            "gate": {"passed": promoted, "checks": CHECKS} if gate else None,
            "summary": "v3 not promoted, champion stays v2: size 3.00 MB over the limit"}


CARD = {"content_hash": "ab" * 32, "source": {"kind": "local", "path": "/data/sst2.csv"}}


def test_a_refused_candidate_says_so_in_the_name_the_note_and_a_tag():
    shown = outcome(evaluation(), record(False, 2), CARD, "bilstm")
    assert shown.run_name == "bilstm · sst2 · v3 refused"
    assert shown.tags["kdpipe.outcome"] == "refused"
    assert shown.tags["kdpipe.data_hash"] == "ab" * 8
    assert "**v3 was not promoted**" in shown.note
    assert "| accuracy | 0.8850 | 0.9100 | 97.2% retention |" in shown.note
    assert "25.0x faster (b1)" in shown.note and "1/30" in shown.note
    assert "**FAIL**: size 3.00 MB over the 2.00 MB limit" in shown.note
    assert shown.metrics == pytest.approx({
        "student_accuracy": 0.885, "teacher_accuracy": 0.91, "retention": 0.9725,
        "student_latency_b1_p50_ms": 0.3, "teacher_latency_b1_p50_ms": 7.5, "speedup": 25.0,
        "student_size_bytes": 3e6, "teacher_size_bytes": 9e7, "size_ratio": 1 / 30,
        "registered_version": 3, "promoted": 0.0})
    assert tuple(shown.metrics) == HEADLINE_METRICS  # one order and set of names, every run


def test_a_promoted_candidate_is_the_champion_and_says_what_it_replaced():
    shown = outcome(evaluation(), record(True, 3), CARD, "textcnn")
    assert shown.run_name == "textcnn · sst2 · v3 champion"
    assert "**v3 is the champion (was v2)**: the gate passed every check" in shown.note
    assert "| size | 3.00 MB | 90.00 MB | 1/30 |" in shown.note
    assert shown.metrics["promoted"] == 1.0
    assert status(record(False, 2, gate=False)) == "registered"
    assert status({"skipped": "tracking off"}) == "not registered"


def test_the_gate_table_shows_value_limit_and_result_per_check():
    lines = gate_table(CHECKS).splitlines()
    assert lines[0] == "| gate check | value | limit | result |"
    assert "| min_accuracy | 88.50% | off | pass |" in lines
    assert "| min_teacher_retention | 97.25% | 95.00% | pass |" in lines
    assert "| max_latency_p50_ms | 0.3 ms | off | pass |" in lines
    assert any(line.startswith("| max_size_bytes | 3.00 MB | 2.00 MB | **FAIL**")
               for line in lines)
    assert any(line.startswith("| max_regression | -1.00 points | -0.50 points | **FAIL**")
               for line in lines)


@pytest.mark.parametrize(("source", "name"), [
    ({"kind": "demo"}, "demo"),
    ({"kind": "huggingface", "id": "stanfordnlp/sst2"}, "sst2"),
    ({"kind": "local", "path": "/data/reviews/"}, "reviews"),
    ({"kind": "dvc", "path": "data/train.csv", "rev": "v1"}, "train@v1"),
    ({"kind": "object_storage", "uri": "s3://bucket/ag_news.parquet"}, "ag_news"),
    ({}, "data"),
])
def test_the_dataset_is_named_by_its_source(source, name):
    assert dataset_name({"source": source}) == name
