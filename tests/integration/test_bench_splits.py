"""bench/tune_splits.py's extra data sets: the stratified 1k sample, the 5k sample, the
3-class AG News with its labels renumbered; the same files are not rewritten (a new file
time would make the pipeline's ingest stale), and the targets it checks."""

import sys
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from tune_splits import make_split, targets  # noqa: E402


@pytest.fixture
def sources(tmp_path):
    root = tmp_path / "data"
    for name, classes, rows in (("ag_news", 4, 4000), ("sst2", 2, 6000)):
        (root / name).mkdir(parents=True)
        for split, n in (("train", rows), ("validation", 40), ("test", 80)):
            pd.DataFrame({"text": [f"{split} text {i}" for i in range(n)],
                          "label": [i % classes for i in range(n)]}).to_csv(
                root / name / f"{split}.csv", index=False)
    return root


def test_ag_news_1k_keeps_the_class_shares(sources, tmp_path):
    folder = make_split("ag_news_1k", sources, tmp_path / "out")
    train = pd.read_csv(folder / "train.csv")
    assert len(train) == 1000
    assert train["label"].value_counts().to_dict() == {0: 250, 1: 250, 2: 250, 3: 250}
    assert len(pd.read_csv(folder / "validation.csv")) == 40  # validation and test unchanged


def test_sst2_5k_samples_train_only(sources, tmp_path):
    folder = make_split("sst2_5k", sources, tmp_path / "out")
    assert len(pd.read_csv(folder / "train.csv")) == 5000
    assert len(pd.read_csv(folder / "test.csv")) == 80


def test_ag_news_3class_drops_sports_and_renumbers(sources, tmp_path):
    folder = make_split("ag_news_3class", sources, tmp_path / "out")
    for split, n in (("train", 3000), ("validation", 30), ("test", 60)):
        frame = pd.read_csv(folder / f"{split}.csv")
        assert len(frame) == n and sorted(frame["label"].unique()) == [0, 1, 2]
    train = pd.read_csv(folder / "train.csv")
    # Source label 2 (Business) is now 1: its first row is the source's row 2.
    assert train[train["label"] == 1]["text"].iloc[0] == "train text 2"


def test_an_unchanged_split_is_not_rewritten(sources, tmp_path):
    folder = make_split("sst2_5k", sources, tmp_path / "out")
    before = (folder / "train.csv").stat().st_mtime_ns
    make_split("sst2_5k", sources, tmp_path / "out")
    assert (folder / "train.csv").stat().st_mtime_ns == before


def test_an_unknown_split_is_named(sources, tmp_path):
    with pytest.raises(SystemExit, match="unknown split 'imdb'"):
        make_split("imdb", sources, tmp_path / "out")


def test_targets_read_the_default_student_and_the_rerun():
    row = {"default_int8": {"pct_of_teacher": 97.5, "points_over_fasttext": 1.9},
           "rerun": {"fraction_of_cold": 0.2, "kdpipe_run": {"fraction_of_cold": 0.12}}}
    assert targets(row) == {"pct_of_teacher": True, "points_over_fasttext": False,
                            "rerun": False, "rerun_kdpipe_run": True}
