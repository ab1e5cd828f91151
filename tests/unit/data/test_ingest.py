import json
from collections import Counter

import pyarrow.parquet as pq
import pytest
from conftest import separable_rows, write_csv

from kdpipe.data.prepare import read_labels, read_split
from kdpipe.errors import DataError
from kdpipe.steps import ingest


def _ingest(cfg):
    result = ingest.run(cfg, cfg.paths.prepared)
    card = json.loads((cfg.paths.prepared / "data_card.json").read_text())
    return result, card


def test_single_csv_gets_stratified_validation_and_test(make_config, separable_csv):
    cfg = make_config(**{"data.source": str(separable_csv)})
    result, card = _ingest(cfg)
    assert card["rows"] == {"train": 160, "validation": 20, "test": 20}
    assert card["created_splits"] == ["validation", "test"]
    for split in ("train", "validation", "test"):
        counts = card["class_counts"][split]
        assert counts["neg"] == counts["pos"]  # stratified on a 50/50 source
    assert read_labels(cfg.paths.prepared) == ["neg", "pos"]
    schema = pq.read_schema(cfg.paths.prepared / "train.parquet")
    assert str(schema.field("label").type) == "int64"
    assert result.metrics["rows_train"] == 160
    all_texts = [t for s in ("train", "validation", "test")
                 for t in read_split(cfg.paths.prepared / f"{s}.parquet").texts]
    assert len(set(all_texts)) == 200  # a partition: nothing lost, nothing repeated


def test_folder_of_split_files_is_used_as_given(make_config, tmp_path):
    rows = separable_rows(60)
    folder = tmp_path / "ds"
    write_csv(folder / "train.csv", rows[:40])
    write_csv(folder / "validation.csv", rows[40:50])
    write_csv(folder / "test.csv", rows[50:])
    _, card = _ingest(make_config(**{"data.source": str(folder)}))
    assert card["rows"] == {"train": 40, "validation": 10, "test": 10}
    assert card["created_splits"] == []
    assert card["source"]["kind"] == "local"


def _write_all_formats(folder, rows):
    import pandas as pd

    frame = pd.DataFrame(rows, columns=["text", "label"])
    write_csv(folder / "a.csv", rows)
    frame.to_csv(folder / "a.tsv", sep="\t", index=False)
    frame.to_json(folder / "a.jsonl", orient="records", lines=True, force_ascii=False)
    frame.to_parquet(folder / "a.parquet", index=False)


@pytest.mark.parametrize("ext", ["tsv", "jsonl", "parquet"])
def test_every_format_gives_the_same_prepared_data_as_csv(make_config, tmp_path, ext):
    rows = separable_rows(80) + [("commas, \"quotes\"\tand tabs", "pos"), ("héllo ünïcode", "neg")]
    _write_all_formats(tmp_path, rows)
    _, from_csv = _ingest(make_config(**{"data.source": str(tmp_path / "a.csv")}))
    _, other = _ingest(make_config(**{"data.source": str(tmp_path / f"a.{ext}")}))
    assert other["content_hash"] == from_csv["content_hash"]


def test_integer_labels_take_names_from_params(make_config, tmp_path):
    rows = [(text, "1" if label == "pos" else "0") for text, label in separable_rows(40)]
    source = write_csv(tmp_path / "ints.csv", rows)
    cfg = make_config(**{"data.source": str(source), "data.label_names": ["negative", "positive"]})
    _, card = _ingest(cfg)
    assert card["labels"] == ["negative", "positive"]
    train = read_split(cfg.paths.prepared / "train.parquet")
    for text, label in zip(train.texts, train.labels, strict=True):
        assert label == (1 if dict(rows)[text] == "1" else 0)


def test_saved_hugging_face_dataset_with_class_labels(make_config, tmp_path):
    import datasets

    rows = separable_rows(60)
    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["neg", "pos"])})
    def part(chunk):
        return datasets.Dataset.from_dict(
            {"sentence": [t for t, _ in chunk], "label": [int(lab == "pos") for _, lab in chunk]},
            features=features)
    dd = datasets.DatasetDict({"train": part(rows[:40]), "validation": part(rows[40:50]),
                               "test": part(rows[50:])})
    dd.save_to_disk(str(tmp_path / "saved"))
    cfg = make_config(**{"data.source": str(tmp_path / "saved"), "data.text_column": "sentence"})
    _, card = _ingest(cfg)
    assert card["labels"] == ["neg", "pos"]
    assert card["rows"] == {"train": 40, "validation": 10, "test": 10}


def test_demo_set_ships_with_the_package(make_config):
    _, card = _ingest(make_config())
    assert card["demo"] is True
    assert card["labels"] == ["negative", "neutral", "positive"]
    assert sum(card["rows"].values()) == 450


def test_duplicates_are_reported_and_dropped_when_configured(make_config, tmp_path):
    rows = separable_rows(40)
    folder = tmp_path / "dup"
    train = rows[:30] + [rows[0], rows[1], (rows[2][0], "neg" if rows[2][1] == "pos" else "pos")]
    write_csv(folder / "train.csv", train + [rows[31]])  # rows[31] also in validation: leakage
    write_csv(folder / "validation.csv", rows[30:35])
    write_csv(folder / "test.csv", rows[35:])
    _, card = _ingest(make_config(**{"data.source": str(folder)}))
    dup = card["duplicates"]
    assert dup["train_repeated_rows"] == 3
    assert dup["train_conflicting_labels"] == 1
    assert dup["train_validation_overlap"] == 1
    assert card["rows"]["train"] == 34
    _, dropped = _ingest(make_config(**{"data.source": str(folder),
                                        "ingest.drop_duplicates": True}))
    assert dropped["dropped_from_train"] == 4
    assert dropped["rows"]["train"] == 30


def test_texts_are_normalised_only_as_configured(make_config, tmp_path):
    rows = [("  Café   GOOD  ", "pos"), ("Cafe\u0301 bad", "neg")] + separable_rows(20)
    folder = tmp_path / "norm"
    write_csv(folder / "train.csv", rows)
    write_csv(folder / "validation.csv", rows[2:6])
    write_csv(folder / "test.csv", rows[6:10])
    cfg = make_config(**{"data.source": str(folder), "ingest.normalize.strip": False})
    _ingest(cfg)
    assert read_split(cfg.paths.prepared / "train.parquet").texts[:2] == [rows[0][0], rows[1][0]]
    cfg = make_config(**{"data.source": str(folder), "ingest.normalize.collapse_whitespace": True,
                         "ingest.normalize.lowercase": True,
                         "ingest.normalize.unicode_form": "NFC"})
    _ingest(cfg)
    assert read_split(cfg.paths.prepared / "train.parquet").texts[:2] == ["café good", "café bad"]


def test_same_input_gives_byte_identical_outputs(make_config, separable_csv, tmp_path):
    cfg = make_config(**{"data.source": str(separable_csv)})
    _ingest(cfg)
    first = {p.name: p.read_bytes() for p in cfg.paths.prepared.iterdir()}
    _ingest(cfg)
    assert {p.name: p.read_bytes() for p in cfg.paths.prepared.iterdir()} == first


def test_seed_changes_the_carved_splits(make_config, separable_csv):
    _, a = _ingest(make_config(**{"data.source": str(separable_csv)}))
    _, b = _ingest(make_config(**{"data.source": str(separable_csv), "seed": 7}))
    assert a["content_hash"] != b["content_hash"]


def test_a_one_megabyte_text_is_accepted_and_counted_as_truncated(make_config, tmp_path):
    rows = separable_rows(40)
    rows[0] = ("good " * 200_000, "pos")  # 1 MB
    source = write_csv(tmp_path / "big.csv", rows)
    cfg = make_config(**{"data.source": str(source)})
    _, card = _ingest(cfg)
    lengths = card["token_length"]
    big_split = next(s for s in ("train", "validation", "test")
                     if "good " * 10 in "".join(
                         read_split(cfg.paths.prepared / f"{s}.parquet").texts))
    assert lengths[big_split]["max"] == ingest.STATS_TOKEN_CAP
    assert lengths[big_split]["truncated_fraction"] > 0
    texts = read_split(cfg.paths.prepared / f"{big_split}.parquet").texts
    assert max(len(t) for t in texts) == len(rows[0][0].strip())  # stored whole


def test_hub_id_offline_says_how_to_use_local_files(make_config, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError,
                       match=r"some-org/some-set: .*Hugging Face hub.*data\.source=path"):
        ingest.run(make_config(**{"data.source": "some-org/some-set"}), ingest.Path("/tmp/unused"))


def test_failed_write_leaves_the_previous_output_intact(make_config, separable_csv, monkeypatch):
    cfg = make_config(**{"data.source": str(separable_csv)})
    _ingest(cfg)
    before = {p.name: p.read_bytes() for p in cfg.paths.prepared.iterdir()}
    calls = Counter()

    def flaky(split, path):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        path.write_bytes(b"partial")

    monkeypatch.setattr(ingest, "write_split", flaky)
    with pytest.raises(OSError, match="disk full"):
        ingest.run(make_config(**{"data.source": str(separable_csv), "seed": 3}),
                   cfg.paths.prepared)
    assert {p.name: p.read_bytes() for p in cfg.paths.prepared.iterdir()} == before
    assert [p.name for p in cfg.paths.prepared.parent.iterdir()] == ["prepared"]
