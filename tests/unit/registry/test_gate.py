"""The promotion gate as a pure function: passes when every threshold holds; fails on each
threshold alone, with the reason; compares against the champion only on same-row
measurements; unmeasured values fail a threshold that is set; force promotes anyway."""

import json

import pytest

from kdpipe.config import GateConfig
from kdpipe.registry.gate import ChampionComparison, KeyMetrics, decide, unguarded

CANDIDATE = KeyMetrics(accuracy=0.86, macro_f1=0.85, teacher_accuracy=0.90,
                       latency_b1_p50_ms=0.5, size_bytes=4_000_000)
STRICT = GateConfig(min_accuracy=0.80, min_teacher_retention=0.95, max_latency_p50_ms=1.0,
                    max_size_bytes=5_000_000, max_regression=0.01)


def champion(candidate_accuracy, champion_accuracy, version=3):
    return ChampionComparison(version, "validation", 872, candidate_accuracy,
                              champion_accuracy)


def by_name(decision):
    return {check.name: check for check in decision.checks}


def test_passes_when_every_threshold_holds():
    decision = decide(CANDIDATE, STRICT, champion(0.86, 0.865))
    assert decision.passed and decision.promote and not decision.forced
    assert [c.name for c in decision.checks] == [
        "min_accuracy", "min_teacher_retention", "max_latency_p50_ms", "max_size_bytes",
        "max_regression"]
    checks = by_name(decision)
    assert checks["min_teacher_retention"].value == pytest.approx(0.86 / 0.90)
    assert checks["max_regression"].value == pytest.approx(-0.005)
    assert checks["max_regression"].threshold == -0.01
    assert decision.why_not() == ""


@pytest.mark.parametrize("change,failing,message", [
    ({"min_accuracy": 0.90}, "min_accuracy", "accuracy 86.00% < minimum 90.00%"),
    ({"min_teacher_retention": 0.97}, "min_teacher_retention",
     "teacher retention 95.56% < minimum 97.00%"),
    ({"max_latency_p50_ms": 0.4}, "max_latency_p50_ms",
     "batch-1 p50 latency 0.5 ms > limit 0.4 ms"),
    ({"max_size_bytes": 3_000_000}, "max_size_bytes", "size 4.00 MB > limit 3.00 MB"),
])
def test_each_threshold_alone_fails_with_its_reason(change, failing, message):
    decision = decide(CANDIDATE, STRICT.model_copy(update=change), champion(0.86, 0.86))
    assert not decision.passed and not decision.promote
    assert [c.name for c in decision.failures] == [failing]
    assert by_name(decision)[failing].message == message
    assert decision.why_not() == message


def test_regression_is_measured_against_the_champion_on_the_same_rows():
    decision = decide(CANDIDATE, STRICT, champion(0.84, 0.86, version=7))
    check = by_name(decision)["max_regression"]
    assert not check.passed and check.value == pytest.approx(-0.02)
    assert check.message == ("accuracy 84.00% vs champion v7 86.00% on the same 872 "
                             "validation rows: -2.00 points, worse than the -1.00 allowed")
    # Exactly at the allowed loss passes (float rounding in 0.85 - 0.86 must not refuse it).
    assert decide(CANDIDATE, STRICT, champion(0.85, 0.86)).passed


def test_no_champion_passes_the_regression_check():
    check = by_name(decide(CANDIDATE, STRICT, None))["max_regression"]
    assert check.passed and check.message == "no champion yet" and check.value is None


def test_champion_that_could_not_be_measured_refuses():
    unmeasured = ChampionComparison(2, "validation", 872, 0.86, None, "v2: download failed")
    decision = decide(CANDIDATE, STRICT, unmeasured)
    assert [c.name for c in decision.failures] == ["max_regression"]
    assert decision.why_not() == ("accuracy against champion v2 not measured: "
                                  "v2: download failed")


def test_unmeasured_values_fail_thresholds_that_are_set_and_pass_unset_ones():
    bare = KeyMetrics(accuracy=0.9)  # no teacher, latency or size known
    assert decide(bare, GateConfig(min_teacher_retention=0), None).passed  # no limits set
    # The defaults want 95% of the teacher: an unknown retention cannot show it.
    assert [c.name for c in decide(bare, GateConfig(), None).failures] == [
        "min_teacher_retention"]
    decision = decide(bare, STRICT, None)
    assert [c.name for c in decision.failures] == [
        "min_teacher_retention", "max_latency_p50_ms", "max_size_bytes"]
    assert by_name(decision)["max_latency_p50_ms"].message == (
        "batch-1 p50 latency not measured, so limit 1 ms not shown")


def test_force_promotes_a_refused_candidate_and_records_it():
    decision = decide(CANDIDATE, STRICT.model_copy(update={"min_accuracy": 0.99}),
                      champion(0.5, 0.9), force=True)
    assert decision.forced and decision.promote and not decision.passed
    assert [c.name for c in decision.failures] == ["min_accuracy", "max_regression"]
    doc = json.loads(json.dumps(decision.to_dict()))  # JSON-ready as register.json needs
    assert doc["forced"] and doc["promote"] and not doc["passed"]
    assert len(doc["checks"]) == 5 and set(doc["checks"][0]) == {
        "name", "value", "threshold", "passed", "message"}


def test_key_metrics_round_trip_through_string_tags():
    tags = {k: str(v) for k, v in CANDIDATE.to_dict().items()}
    assert KeyMetrics.from_dict(tags) == CANDIDATE
    assert KeyMetrics.from_dict({"accuracy": "nan", "size_bytes": "junk"}) == KeyMetrics()
    assert KeyMetrics(accuracy=0.5, teacher_accuracy=0.0).retention is None


def test_the_default_gate_refuses_a_student_under_95_percent_of_its_teacher():
    keeps = KeyMetrics(accuracy=0.86, teacher_accuracy=0.90)  # 95.6%
    loses = KeyMetrics(accuracy=0.85, teacher_accuracy=0.90)  # 94.4%
    assert decide(keeps, GateConfig(), None).passed
    refused = decide(loses, GateConfig(), None)
    assert [c.name for c in refused.failures] == ["min_teacher_retention"]
    assert unguarded(GateConfig()) is None
    assert "checks no quality" in unguarded(GateConfig(min_teacher_retention=0))
