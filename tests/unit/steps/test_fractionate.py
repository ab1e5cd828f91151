"""fractionate: the selection functions on crafted logits, and the step on a tiny teacher."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import separable_rows, write_csv

from kdpipe.config import FractionateConfig
from kdpipe.data.prepare import read_split
from kdpipe.errors import KdpipeError
from kdpipe.steps import fractionate, ingest, soft_labels
from kdpipe.steps.fractionate import (
    class_balanced_weights,
    domain_similarity,
    dynamic,
    keep_count,
    plan,
    select_all,
    select_entropy,
    select_margin,
    select_random,
    teacher_entropy,
    teacher_margin,
)

E = math.e

# Six rows of 3-class logits whose entropy and margin rankings differ:
#   row  logits        entropy (nats)   margin (top1 - top2)
#   0    [0, 0, 0]     ln 3 = 1.0986    0
#   1    [5, 0, 0]     0.0799           0.9801
#   2    [2, 2, -10]   0.6932 (~ln 2)   0          (two classes tie)
#   3    [1, 0, 0]     0.9753           0.3642
#   4    [3, 0, 0]     0.3666           0.8642
#   5    [0, 0, 0]     ln 3 = 1.0986    0          (ties with row 0)
CRAFTED = np.array([[0, 0, 0], [5, 0, 0], [2, 2, -10], [1, 0, 0], [3, 0, 0], [0, 0, 0]],
                   dtype=np.float32)


def test_entropy_and_margin_by_hand():
    p = [E / (E + 2), 1 / (E + 2), 1 / (E + 2)]  # softmax of [1, 0, 0]
    h = -sum(x * math.log(x) for x in p)
    entropy = teacher_entropy(CRAFTED)
    assert entropy[0] == pytest.approx(math.log(3))
    assert entropy[3] == pytest.approx(h)
    assert entropy[3] == pytest.approx(0.9753, abs=1e-4)
    margin = teacher_margin(CRAFTED)
    assert margin[3] == pytest.approx((E - 1) / (E + 2))
    assert margin[0] == 0.0 and margin[2] == 0.0


def test_entropy_keeps_the_most_uncertain_half_ties_to_the_lower_id():
    # ranking: 0, 5 (tie with 0), 3, 2, 4, 1 -> top ceil(0.5 * 6) = 3
    assert select_entropy(CRAFTED, 0.5).tolist() == [0, 3, 5]
    assert select_entropy(CRAFTED, 1 / 6).tolist() == [0]  # the tie goes to row 0


def test_margin_keeps_the_smallest_margins_ties_by_id():
    # margins 0 at rows 0, 2, 5 (in id order), then 3, 4, 1
    assert select_margin(CRAFTED, 0.5).tolist() == [0, 2, 5]
    assert select_margin(CRAFTED, 0.6).tolist() == [0, 2, 3, 5]  # ceil(3.6) = 4


def test_permuted_rows_tie_despite_float_rounding():
    # the same logits in another order: equal scores that differ in the last bit
    row = np.array([0.1257302165031433, -0.13210485875606537, 0.6404226422309875,
                    0.10490011423826218, -0.5356693863868713], np.float32)
    logits = np.stack([row, row[::-1], np.roll(row, 2)])
    # (with numpy 2 on x86-64, row 2's entropy comes out an ulp larger: it would win)
    assert select_entropy(logits, 1 / 3).tolist() == [0]
    row = np.array([0.3615950644016266, 1.3040000200271606, 0.9470809698104858,
                    -0.7037352323532104], np.float32)
    logits = np.stack([row, row[::-1], np.roll(row, 1)])
    # (rows 1 and 2 come out an ulp smaller: row 1 would win)
    assert select_margin(logits, 1 / 3).tolist() == [0]


def test_keep_count_is_ceil_at_least_one_and_robust_to_float_error():
    assert keep_count(6, 0.5) == 3
    assert keep_count(7, 0.5) == 4
    assert keep_count(100, 0.07) == 7  # 0.07 * 100 == 7.000000000000001
    assert keep_count(10, 0.01) == 1
    assert keep_count(10, 1.0) == 10


def test_random_is_deterministic_per_seed():
    first = select_random(100, 0.3, np.random.default_rng(7))
    again = select_random(100, 0.3, np.random.default_rng(7))
    other = select_random(100, 0.3, np.random.default_rng(8))
    assert first.tolist() == again.tolist()
    assert first.tolist() != other.tolist()
    assert len(first) == 30 and first.dtype == np.int64
    assert first.tolist() == sorted(set(first.tolist()))


def test_select_all():
    assert select_all(4).tolist() == [0, 1, 2, 3]


def test_class_balanced_weights_on_imbalanced_labels():
    # counts 4, 2, 6 over 12 rows: weight n / (K * count) = 1, 2, 2/3
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 2])
    weights = class_balanced_weights(labels, 3)
    np.testing.assert_allclose(weights, [1] * 4 + [2] * 2 + [2 / 3] * 6, rtol=1e-6)
    assert weights.dtype == np.float32
    assert weights.mean() == pytest.approx(1.0)
    # a class with no rows takes no share: counts 3, 1, 0 -> 4/(2*3), 4/(2*1)
    np.testing.assert_allclose(class_balanced_weights(np.array([0, 0, 0, 1]), 3),
                               [2 / 3, 2 / 3, 2 / 3, 2], rtol=1e-6)


def test_dynamic_schedule_takes_nested_prefixes_of_one_ranking():
    order = np.array([9, 3, 1, 7, 5, 0, 2, 4, 6, 8])
    epochs = dynamic([0.5, 0.3, 1.0], order)
    assert [len(e) for e in epochs] == [5, 3, 10]
    assert epochs[0].tolist() == [1, 3, 5, 7, 9]
    assert epochs[1].tolist() == [1, 3, 9]
    assert epochs[2].tolist() == list(range(10))


def test_plan_dynamic_by_entropy_on_crafted_logits():
    cfg = FractionateConfig(strategy="dynamic", schedule=[0.5, 0.3, 1.0], schedule_by="entropy")
    epochs = plan(cfg, CRAFTED, np.zeros(6, dtype=np.int64), 3, seed=0)
    assert [idx.tolist() for idx, _ in epochs] == [[0, 3, 5], [0, 5], [0, 1, 2, 3, 4, 5]]
    assert all(w.tolist() == [1.0] * len(idx) for idx, w in epochs)


# ---------------------------------------------------------------- the step


@pytest.fixture
def labelled(make_config, tmp_path, tiny_bert):
    """``build(**overrides)``: a config over 60 separable rows with prepared data and soft
    labels in place (made once per test; fractionate overrides do not change them); no
    augmented texts unless asked for."""
    csv = write_csv(tmp_path / "data" / "small.csv", separable_rows(60))

    def build(**overrides):
        cfg = make_config(**{"data.source": str(csv), "soft_labels.batch_size": 32,
                             "soft_labels.augment.enabled": False, **overrides})
        if not (cfg.paths.soft_labels / "manifest.json").exists():
            ingest.run(cfg, cfg.paths.prepared)
            soft_labels.run(cfg, tiny_bert, cfg.paths.prepared, cfg.paths.soft_labels)
        return cfg

    return build


def fractionate_run(cfg):
    return fractionate.run(cfg, cfg.paths.soft_labels, cfg.paths.prepared, cfg.paths.fractions)


def report_of(cfg):
    return json.loads((cfg.paths.fractions / "report.json").read_text(encoding="utf-8"))


def test_run_entropy_writes_indices_weights_and_report(labelled):
    cfg = labelled(**{"fractionate.strategy": "entropy", "fractionate.fraction": 0.5})
    result = fractionate_run(cfg)
    logits = np.asarray(soft_labels.load(cfg.paths.soft_labels)["train_logits"])
    gold = np.array(read_split(cfg.paths.prepared / "train.parquet").labels)
    n, kept = len(logits), math.ceil(0.5 * len(logits))
    files = sorted(p.name for p in cfg.paths.fractions.iterdir())
    assert files == ["epoch_000_indices.npy", "epoch_000_weights.npy", "report.json"]
    indices, weights = fractionate.load(cfg.paths.fractions, 0)
    assert indices.dtype == np.int64 and weights.dtype == np.float32
    assert indices.tolist() == select_entropy(logits, 0.5).tolist()
    assert weights.tolist() == [1.0] * kept
    report = report_of(cfg)
    assert report["strategy"] == "entropy" and report["epochs"] == 1
    assert report["rows"] == {"train": n, "augmented": 0, "unlabeled": 0, "total": n}
    epoch = report["per_epoch"][0]
    assert epoch["count"] == kept
    assert epoch["class_histogram_before"] == {
        name: int((gold == i).sum()) for i, name in enumerate(["neg", "pos"])}
    assert sum(epoch["class_histogram_after"].values()) == kept
    assert epoch["mean_entropy_after"] >= epoch["mean_entropy_before"]
    assert result.metrics["kept_rows"] == kept
    assert result.metrics["kept_fraction"] == pytest.approx(kept / n, abs=1e-6)
    assert result.metrics["mean_entropy_kept"] == pytest.approx(
        teacher_entropy(logits)[indices].mean(), abs=1e-5)
    assert result.summary == f"entropy: kept {kept:,} of {n:,} ({kept / n:.0%})"
    # epochs past the last written reuse it
    later, _ = fractionate.load(cfg.paths.fractions, 9)
    assert later.tolist() == indices.tolist()


def test_run_dynamic_writes_one_selection_per_scheduled_epoch(labelled):
    cfg = labelled(**{"fractionate.strategy": "dynamic", "fractionate.schedule": [0.5, 0.3, 1.0],
                      "fractionate.schedule_by": "margin"})
    fractionate_run(cfg)
    logits = np.asarray(soft_labels.load(cfg.paths.soft_labels)["train_logits"])
    n = len(logits)
    counts = [len(fractionate.load(cfg.paths.fractions, e)[0]) for e in range(3)]
    assert counts == [math.ceil(0.5 * n), math.ceil(0.3 * n), n]
    assert fractionate.load(cfg.paths.fractions, 1)[0].tolist() == \
        select_margin(logits, 0.3).tolist()
    assert fractionate.load(cfg.paths.fractions, 7)[0].tolist() == list(range(n))
    assert report_of(cfg)["epochs"] == 3
    assert len(list(cfg.paths.fractions.glob("epoch_*_indices.npy"))) == 3


def test_run_class_balanced_keeps_every_row_with_weights(labelled):
    cfg = labelled(**{"fractionate.strategy": "class_balanced"})
    fractionate_run(cfg)
    gold = np.array(read_split(cfg.paths.prepared / "train.parquet").labels)
    indices, weights = fractionate.load(cfg.paths.fractions, 0)
    assert indices.tolist() == list(range(len(gold)))
    np.testing.assert_allclose(weights, class_balanced_weights(gold, 2))
    assert weights.mean() == pytest.approx(1.0, abs=1e-6)


def test_run_includes_augmented_rows_after_train(labelled):
    cfg = labelled(**{"soft_labels.augment.enabled": True, "soft_labels.augment.variants": 2,
                      "fractionate.strategy": "all"})
    fractionate_run(cfg)
    arrays = soft_labels.load(cfg.paths.soft_labels)
    n, m = len(arrays["train_logits"]), len(arrays["augment_logits"])
    assert m == 2 * n
    indices, _ = fractionate.load(cfg.paths.fractions, 0)
    assert indices.tolist() == list(range(n + m))  # augmented ids n .. n+m-1
    report = report_of(cfg)
    assert report["rows"] == {"train": n, "augmented": m, "unlabeled": 0, "total": n + m}
    gold = np.array(read_split(cfg.paths.prepared / "train.parquet").labels)
    teacher = np.argmax(arrays["augment_logits"], axis=1)
    expected = np.bincount(gold, minlength=2) + np.bincount(teacher, minlength=2)
    assert list(report["per_epoch"][0]["class_histogram_before"].values()) == expected.tolist()
    assert report["per_epoch"][0]["augmented_kept"] == m
    # entropy selection ranks over the whole transfer set
    cfg = labelled(**{"soft_labels.augment.enabled": True, "soft_labels.augment.variants": 2,
                      "fractionate.strategy": "entropy", "fractionate.fraction": 0.5})
    fractionate_run(cfg)
    both = np.concatenate([arrays["train_logits"], arrays["augment_logits"]])
    assert fractionate.load(cfg.paths.fractions, 0)[0].tolist() == \
        select_entropy(both, 0.5).tolist()
    # and include_augmented=false leaves them out
    cfg = labelled(**{"soft_labels.augment.enabled": True, "soft_labels.augment.variants": 2,
                      "fractionate.include_augmented": False})
    fractionate_run(cfg)
    assert report_of(cfg)["rows"] == {"train": n, "augmented": 0, "unlabeled": 0, "total": n}


# ---------------------------------------------------------------- domain


def test_domain_similarity_by_hand():
    # Target rows [1, 0] and [0, 1]: mean direction (1, 1) / sqrt 2.
    target = np.array([[2.0, 0.0], [0.0, 3.0]])  # lengths do not matter
    rows = np.array([[1.0, 1.0], [1.0, 0.0], [-1.0, 0.0], [0.0, 0.0]])
    s = 1 / math.sqrt(2)
    np.testing.assert_allclose(domain_similarity(rows, target), [1.0, s, -s, 0.0])
    # knn, k = 1: the cosine to the nearest target row; k = 2: the mean of both.
    np.testing.assert_allclose(domain_similarity(rows, target, "knn", k=1, chunk=3),
                               [s, 1.0, 0.0, 0.0])
    np.testing.assert_allclose(domain_similarity(rows, target, "knn", k=5),  # k > m: m
                               [s, 0.5, -0.5, 0.0])
    with pytest.raises(ValueError, match="'centroid' or 'knn'"):
        domain_similarity(rows, target, "mean")


def test_knn_finds_a_small_cluster_the_centroid_misses():
    # Nine target rows near (1, 0), one near (0, 1): the centroid points at (1, 0); a row at
    # (0, 1) sits on the small cluster, and knn with k = 1 ranks it first.
    target = np.array([[1.0, 0.01 * i] for i in range(9)] + [[0.0, 1.0]])
    rows = np.array([[0.0, 1.0], [0.7, 0.7]])
    centroid = domain_similarity(rows, target)
    knn = domain_similarity(rows, target, "knn", k=1)
    assert centroid[1] > centroid[0] and knn[0] > knn[1]


def test_plan_domain_keeps_the_closest_fraction_and_dynamic_can_rank_by_it():
    logits = np.zeros((6, 2), np.float32)  # entropy ties everywhere: only domain decides
    similarity = np.array([0.1, 0.9, 0.5, 0.9, -0.2, 0.3])
    kept = plan(FractionateConfig(strategy="domain", fraction=0.5), logits,
                np.zeros(6, np.int64), 2, 0, similarity)
    assert kept[0][0].tolist() == [1, 2, 3]  # 0.9, 0.9 (ties by id), 0.5
    epochs = plan(FractionateConfig(strategy="dynamic", schedule=[0.3, 1.0],
                                    schedule_by="domain"), logits, np.zeros(6, np.int64), 2,
                  0, similarity)
    assert [e[0].tolist() for e in epochs] == [[1, 3], list(range(6))]
    with pytest.raises(ValueError, match="domain_similarity"):
        plan(FractionateConfig(strategy="domain"), logits, np.zeros(6, np.int64), 2, 0)


def test_domain_keeps_the_closest_share_of_each_class_unless_told_otherwise():
    logits = np.zeros((6, 2), np.float32)
    labels = np.array([0, 0, 0, 1, 1, 1])
    similarity = np.array([0.9, 0.8, 0.7, 0.1, 0.2, 0.3])  # class 1 is far from the target
    overall = plan(FractionateConfig(strategy="domain", fraction=0.5, domain_per_class=False),
                   logits, labels, 2, 0, similarity)
    assert overall[0][0].tolist() == [0, 1, 2]  # class 1 gone
    # Per class: share of the class closer than the row: rows 0 and 5 score 0, 1 and 4 1/3.
    kept = plan(FractionateConfig(strategy="domain", fraction=0.5), logits, labels, 2, 0,
                similarity)
    assert kept[0][0].tolist() == [0, 1, 5]
    both = plan(FractionateConfig(strategy="domain", fraction=4 / 6), logits, labels, 2, 0,
                similarity)
    assert both[0][0].tolist() == [0, 1, 4, 5]  # two of each


def test_run_domain_ranks_train_by_closeness_to_validation(labelled):
    cfg = labelled(**{"fractionate.strategy": "domain", "fractionate.fraction": 0.25,
                      "fractionate.domain_per_class": False})
    result = fractionate_run(cfg)
    arrays = soft_labels.load(cfg.paths.soft_labels)
    expected = domain_similarity(np.asarray(arrays["train_features"]),
                                 np.asarray(arrays["validation_features"]))
    indices, _ = fractionate.load(cfg.paths.fractions, 0)
    assert indices.tolist() == sorted(np.argsort(-expected, kind="stable")[:len(indices)])
    epoch = report_of(cfg)["per_epoch"][0]
    assert epoch["mean_domain_similarity_after"] > epoch["mean_domain_similarity_before"]
    assert result.metrics["mean_domain_similarity_kept"] == pytest.approx(
        expected[indices].mean(), abs=1e-6)
    assert "similarity to validation" in result.summary

    no_features = labelled(**{"fractionate.strategy": "domain", "soft_labels.features": False,
                              "work_dir": str(cfg.paths.root.parent / "w2")})
    with pytest.raises(KdpipeError, match="needs the teacher's features .*"
                                          "set soft_labels.features=true"):
        fractionate_run(no_features)
    no_unlabeled = labelled(**{"fractionate.strategy": "domain",
                               "fractionate.domain_target": "unlabeled"})
    with pytest.raises(KdpipeError, match="there are no unlabeled texts; set data.unlabeled"):
        fractionate_run(no_unlabeled)


def test_load_without_a_run_is_a_clear_error(tmp_path):
    with pytest.raises(KdpipeError, match="kdpipe fractionate"):
        fractionate.load(tmp_path, 0)
