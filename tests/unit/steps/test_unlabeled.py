"""Unlabeled in-domain texts as transfer data (data.unlabeled): read like the labelled data,
checked, deduplicated against every split, labelled by the teacher with the rest, appended to
the transfer set after the augmented texts with no gold label, and their words kept by
vocabulary pruning."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import write_csv

from kdpipe.config import DataConfig, NormalizeConfig
from kdpipe.data.prepare import Split, prepare_unlabeled, read_split
from kdpipe.data.readers import RawSplit, read_file
from kdpipe.data.sources import load_unlabeled
from kdpipe.errors import DataError
from kdpipe.models.teacher import load_tokenizer
from kdpipe.steps import distill, fractionate, ingest, soft_labels
from kdpipe.steps.prune import prune_vocabulary

# Train speaks of films only; the unlabeled texts of service and phones: words train lacks.
TRAIN = [(f"the film was {w} {i}", "pos" if w in ("good", "great") else "neg")
         for i, w in enumerate(["good", "bad", "great", "awful"] * 10)]
UNLABELED = ["the service was nice", "this phone is broken", "the service was nice",
             "the film was good 0", "quite a dull phone"]


def test_a_file_without_a_label_column_reads_as_texts(tmp_path):
    csv = write_csv(tmp_path / "u.csv", [("one text",), ("another",)], header="text")
    split = read_file(csv, "text", None)
    assert split.texts == ["one text", "another"] and split.labels == [None, None]
    jsonl = tmp_path / "u.jsonl"
    jsonl.write_text('{"body": "a"}\n{"body": "b"}\n')
    with pytest.raises(DataError, match=r"u.jsonl: no column 'text' \(columns: body\); "
                                        "set -S data.text_column=NAME"):
        read_file(jsonl, "text", None)


def test_a_folder_is_every_file_in_name_order_and_errors_name_the_file(tmp_path):
    folder = tmp_path / "unl"
    write_csv(folder / "b.csv", [("from b",), ("b again",)], header="text")
    (folder / "a.jsonl").write_text('{"text": "from a"}\n')
    (folder / "sub" / "c.jsonl").parent.mkdir()
    (folder / "sub" / "c.jsonl").write_text('{"text": "from c"}\n{"text": 5}\n')
    (folder / "notes.md").write_text("not data")
    source = load_unlabeled(DataConfig(unlabeled=str(folder)))
    split = source.splits["unlabeled"]
    assert split.texts == ["from a", "from b", "b again", "from c", 5]
    assert source.provenance == {"kind": "local", "path": str(folder.resolve())}
    with pytest.raises(DataError, match=r"unl: row c.jsonl:2: text is not a string \(5\)"):
        prepare_unlabeled(split, NormalizeConfig(), {n: Split(["x"], [0]) for n in
                                                     ("train", "validation", "test")})
    with pytest.raises(DataError, match=r"nowhere.csv: file not found \(data.unlabeled\)"):
        load_unlabeled(DataConfig(unlabeled=str(tmp_path / "nowhere.csv")))
    assert load_unlabeled(DataConfig()) is None


def test_repeats_and_texts_of_any_split_are_dropped_and_counted():
    splits = {"train": Split(["in train", "t2"], [0, 1]), "validation": Split(["in val"], [0]),
              "test": Split(["in test"], [1])}
    raw = RawSplit("u.csv", ["new", " in val", "in train", "new", "in test", "other", "in val"],
                   [None] * 7)
    kept, report = prepare_unlabeled(raw, NormalizeConfig(strip=True), splits)
    assert kept == ["new", "other"]  # " in val" is "in val" once normalised
    assert report == {"rows_read": 7, "rows": 2, "dropped": {
        "repeated": 1, "in_train": 1, "in_validation": 2, "in_test": 1}}
    with pytest.raises(DataError, match="u.csv: no unlabeled text left"):
        prepare_unlabeled(RawSplit("u.csv", ["in test"], [None]), NormalizeConfig(), splits)


@pytest.fixture
def labelled(make_config, tmp_path, tiny_bert):
    """Ingested and soft-labelled with data.unlabeled (and 1 augmented variant per text)."""
    source = write_csv(tmp_path / "d.csv", TRAIN)
    unl = write_csv(tmp_path / "u.csv", [(t,) for t in UNLABELED], header="text")

    def build(**overrides):
        cfg = make_config(**{"data.source": str(source), "data.unlabeled": str(unl),
                             "soft_labels.augment.variants": 1, **overrides})
        result = ingest.run(cfg, cfg.paths.prepared)
        soft_labels.run(cfg, tiny_bert, cfg.paths.prepared, cfg.paths.soft_labels)
        return cfg, result

    return build


def test_ingest_keeps_the_new_texts_and_later_steps_append_them_to_the_transfer_set(
        labelled, tiny_bert):
    cfg, result = labelled()
    p = cfg.paths
    prepared = read_split(p.prepared / "unlabeled.parquet")
    # "the film was good 0" is a train, validation or test text: dropped, like the repeat.
    assert prepared.texts == ["the service was nice", "this phone is broken",
                              "quite a dull phone"]
    assert prepared.labels == [-1, -1, -1]
    card = json.loads((p.prepared / "data_card.json").read_text())
    assert card["unlabeled"]["rows"] == 3 and card["unlabeled"]["rows_read"] == 5
    assert card["token_length"]["unlabeled"]["truncated"]["texts"] == 0
    assert result.metrics["rows_unlabeled"] == 3
    assert "+ 3 unlabeled (2 dropped: 1 repeated, 1 in " in result.summary

    arrays = soft_labels.load(p.soft_labels)
    assert arrays["unlabeled_logits"].shape == (3, 2)
    assert arrays["unlabeled_features"].shape[0] == 3
    train_rows, augmented = len(arrays["train_logits"]), len(arrays["augment_logits"])

    fractionate.run(cfg, p.soft_labels, p.prepared, p.fractions)
    report = json.loads((p.fractions / "report.json").read_text())
    assert report["rows"] == {"train": train_rows, "augmented": augmented, "unlabeled": 3,
                              "total": train_rows + augmented + 3}
    assert report["per_epoch"][0]["unlabeled_kept"] == 3

    tokenizer = load_tokenizer(str(tiny_bert))
    data = distill.load_transfer(cfg, p.prepared, p.soft_labels, tokenizer)
    assert data.parts == {"train": train_rows, "augment": augmented, "unlabeled": 3}
    # Ids follow fractionate's: the unlabeled texts last, KD only (label -1), their logits.
    assert data.ids[-3:] == tokenizer(prepared.texts)["input_ids"]
    assert (data.labels[-3:] == -1).all()
    assert np.array_equal(data.teacher_logits[-3:], arrays["unlabeled_logits"])

    # Pruning keeps the words the student met only in unlabeled texts.
    from kdpipe.compression import pruning
    from kdpipe.models.students import build_student

    only = distill.load_transfer(cfg, p.prepared, p.soft_labels, tokenizer, only=["unlabeled"])
    assert only.parts == {"train": train_rows, "unlabeled": 3}
    student = build_student(cfg.student, 2, tiny_bert, tokenizer.pad_token_id, len(tokenizer))
    model = pruning.PrunedStudent(student)
    report = prune_vocabulary(model, only, tokenizer, min_fraction=0.0)
    assert report["unlabeled_texts"] == 3
    phone = tokenizer.convert_tokens_to_ids("phone")
    assert phone not in {i for ids in only.ids[:train_rows] for i in ids}
    assert phone in pruning.kept_token_ids(only.ids[-3:], set())
    assert report["kept"] == len(pruning.kept_token_ids(
        only.ids[:train_rows] + only.ids[-3:],
        {*tokenizer.all_special_ids, tokenizer.unk_token_id}))


def test_include_unlabeled_false_leaves_them_out_and_no_setting_keeps_the_old_hash(
        labelled, make_config, tmp_path):
    # The unlabeled texts as a target domain only: rows ranked by closeness to them.
    cfg, _ = labelled(**{"fractionate.include_unlabeled": False,
                         "fractionate.strategy": "domain", "fractionate.fraction": 0.5,
                         "fractionate.domain_target": "unlabeled",
                         "fractionate.domain_per_class": False})
    fractionate.run(cfg, cfg.paths.soft_labels, cfg.paths.prepared, cfg.paths.fractions)
    report = json.loads((cfg.paths.fractions / "report.json").read_text())
    assert report["rows"]["unlabeled"] == 0
    arrays = soft_labels.load(cfg.paths.soft_labels)
    similarity = fractionate.domain_similarity(
        np.concatenate([arrays["train_features"], arrays["augment_features"]]),
        np.asarray(arrays["unlabeled_features"]))
    kept, _ = fractionate.load(cfg.paths.fractions, 0)
    assert report["per_epoch"][0]["mean_domain_similarity_after"] == pytest.approx(
        similarity[kept].mean(), abs=1e-6)
    assert similarity[kept].min() >= np.median(similarity)
    with_unlabeled = json.loads((cfg.paths.prepared / "data_card.json").read_text())

    plain = make_config(**{"data.source": str(tmp_path / "d.csv"), "work_dir":
                           str(tmp_path / "plain")})
    ingest.run(plain, plain.paths.prepared)
    card = json.loads((plain.paths.prepared / "data_card.json").read_text())
    assert "unlabeled" not in card and "unlabeled" not in card["token_length"]
    assert card["content_hash"] != with_unlabeled["content_hash"]
    assert read_split(plain.paths.prepared / "unlabeled.parquet").texts == []
    # The hash of data without unlabeled texts is the one it had before they existed.
    from kdpipe.data.prepare import Prepared

    splits = {n: read_split(plain.paths.prepared / f"{n}.parquet")
              for n in ("train", "validation", "test")}
    assert Prepared(splits, card["labels"]).content_hash() == card["content_hash"]
