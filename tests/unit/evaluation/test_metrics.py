"""Classification scores against values worked out by hand in the comments."""

import numpy as np
import pytest

from kdpipe.evaluation import metrics

# Five rows, three classes: true 0 0 1 1 2, predicted 0 1 1 1 0.
LABELS = np.array([0, 0, 1, 1, 2])
PREDICTED = np.array([0, 1, 1, 1, 0])
NAMES = ["a", "b", "c"]

# Five rows, two classes, confidence = max probability; with 4 bins of width 0.25:
#   bin 3 [0.75, 1]:   0.9 (right), 0.8 (wrong)              conf 0.85, acc 1/2
#   bin 2 [0.5, 0.75): 0.6 (right), 0.65 (wrong), 0.55 (right) conf 0.60, acc 2/3
# ECE = 2/5 * |0.5 - 0.85| + 3/5 * |2/3 - 0.6| = 0.14 + 0.04 = 0.18
PROBS = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.35, 0.65], [0.45, 0.55]])
GOLD = np.array([0, 0, 0, 0, 1])


def test_accuracy_and_macro_f1():
    # F1 per class: a 0.5, b 0.8 (P 2/3, R 1), c 0 -> macro 1.3 / 3
    accuracy, macro_f1 = metrics.accuracy_and_f1(LABELS, PREDICTED)
    assert accuracy == pytest.approx(0.6)
    assert macro_f1 == pytest.approx(1.3 / 3)


def test_per_class_report():
    report = metrics.per_class_report(LABELS, PREDICTED, NAMES)
    assert list(report) == NAMES
    assert report["a"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5,
                                         "support": 2})
    assert report["b"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8,
                                         "support": 2})
    # Never predicted: 0 rather than NaN or a warning turned error.
    assert report["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert isinstance(report["a"]["support"], int)


def test_confusion_matrix_rows_are_true_labels():
    matrix = metrics.confusion_matrix(LABELS, PREDICTED, 4)  # class 3 never occurs
    assert matrix.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    assert matrix.dtype == np.int64


def test_reliability_bins_by_hand():
    bins = metrics.reliability_bins(PROBS, GOLD, 4)
    assert [b["count"] for b in bins] == [0, 0, 3, 2]
    assert [(b["lower"], b["upper"]) for b in bins] == [(0, 0.25), (0.25, 0.5),
                                                        (0.5, 0.75), (0.75, 1.0)]
    assert bins[0]["confidence"] is None and bins[0]["accuracy"] is None
    assert bins[2]["confidence"] == pytest.approx(0.6)
    assert bins[2]["accuracy"] == pytest.approx(2 / 3)
    assert bins[3]["confidence"] == pytest.approx(0.85)
    assert bins[3]["accuracy"] == pytest.approx(0.5)


def test_expected_calibration_error_by_hand():
    assert metrics.expected_calibration_error(PROBS, GOLD, 4) == pytest.approx(0.18)
    # One bin: |acc 3/5 - mean conf 3.5/5| = 0.1
    assert metrics.expected_calibration_error(PROBS, GOLD, 1) == pytest.approx(0.1)


def test_confidence_of_one_lands_in_the_last_bin_and_is_calibrated():
    bins = metrics.reliability_bins(np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([0, 1]), 10)
    assert bins[-1]["count"] == 2 and sum(b["count"] for b in bins) == 2
    assert metrics.expected_calibration_error(np.array([[1.0, 0.0]]), np.array([0]), 10) == 0.0
    assert metrics.expected_calibration_error(np.zeros((0, 2)), np.zeros(0, int), 10) == 0.0


def test_softmax_rows_and_stability():
    np.testing.assert_allclose(metrics.softmax(np.array([[0.0, np.log(3.0)]])), [[0.25, 0.75]])
    np.testing.assert_allclose(metrics.softmax(np.array([[1000.0, 1000.0]])), [[0.5, 0.5]])


def test_agreement():
    assert metrics.agreement(np.array([0, 1, 1, 2]), np.array([0, 1, 2, 2])) == 0.75
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.agreement(np.array([0, 1]), np.array([0]))
