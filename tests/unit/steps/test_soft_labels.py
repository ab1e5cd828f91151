import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import separable_rows, write_csv

from kdpipe.data.prepare import read_split
from kdpipe.steps import ingest, soft_labels
from kdpipe.training import softcache
from kdpipe.training.augment import make_variants

SPLITS = ("train", "validation", "test")


# ---------------------------------------------------------------- helpers and fixtures


@pytest.fixture
def setup(make_config, separable_csv, tiny_bert):
    """A config over the separable CSV (batches of 16, so length sorting reorders rows),
    prepared data, and the tiny teacher folder; no augmented texts unless asked for."""

    def build(**overrides):
        cfg = make_config(**{"data.source": str(separable_csv), "soft_labels.batch_size": 16,
                             "soft_labels.augment.enabled": False, **overrides})
        if not (cfg.paths.prepared / "data_card.json").exists():
            ingest.run(cfg, cfg.paths.prepared)
        return cfg

    return build


def label(cfg, teacher, prepared=None, out=None):
    return soft_labels.run(cfg, teacher, prepared or cfg.paths.prepared,
                           out or cfg.paths.soft_labels)


def copied(arrays):
    # Step outputs are hard links into the cache: copy before touching the cache.
    return {name: np.array(a) for name, a in arrays.items()}


def entries(cache_dir: Path) -> list[Path]:
    return sorted(p for p in cache_dir.iterdir() if not p.name.startswith("."))


def direct_forward(teacher: Path, texts: list[str], max_length: int):
    """Logits and [CLS] features of each text run alone (no batching, no padding)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(teacher)
    model = AutoModelForSequenceClassification.from_pretrained(teacher).eval()
    logits, feats = [], []
    with torch.inference_mode():
        for text in texts:
            out = model(**tokenizer(text, truncation=True, max_length=max_length,
                                    return_tensors="pt"), output_hidden_states=True)
            logits.append(out.logits[0].numpy())
            feats.append(out.hidden_states[-1][0, 0].numpy())
    return np.stack(logits), np.stack(feats)


# ---------------------------------------------------------------- the step


def test_logits_and_features_match_an_unbatched_forward_in_row_order(setup, tiny_bert):
    cfg = setup()
    result = label(cfg, tiny_bert)
    arrays = soft_labels.load(cfg.paths.soft_labels)
    for split in SPLITS:
        texts = read_split(cfg.paths.prepared / f"{split}.parquet").texts
        lengths = [len(t.split()) for t in texts]
        assert lengths != sorted(lengths)  # else sorting could not permute anything
        logits, feats = direct_forward(tiny_bert, texts, cfg.ingest.max_length)
        assert arrays[f"{split}_logits"].shape == (len(texts), 2)
        assert arrays[f"{split}_logits"].dtype == np.float32
        assert arrays[f"{split}_features"].shape == (len(texts), 32)
        assert arrays[f"{split}_features"].dtype == np.float32
        np.testing.assert_allclose(arrays[f"{split}_logits"], logits, atol=1e-5)
        np.testing.assert_allclose(arrays[f"{split}_features"], feats, atol=1e-5)
    assert result.metrics["cache_hit"] == 0
    assert result.summary.startswith("labelled 160+20+20 texts at ")


def test_teacher_val_accuracy_is_argmax_against_gold(setup, tiny_bert):
    cfg = setup()
    result = label(cfg, tiny_bert)
    logits = soft_labels.load(cfg.paths.soft_labels)["validation_logits"]
    gold = read_split(cfg.paths.prepared / "validation.parquet").labels
    expected = np.mean(np.argmax(logits, axis=1) == np.array(gold))
    assert result.metrics["teacher_val_accuracy"] == pytest.approx(expected)


def test_features_off_stores_logits_only(setup, tiny_bert):
    cfg = setup(**{"soft_labels.features": False})
    label(cfg, tiny_bert)
    assert sorted(soft_labels.load(cfg.paths.soft_labels)) == [
        "test_logits", "train_logits", "validation_logits"]


def test_load_is_a_read_only_memory_map(setup, tiny_bert):
    cfg = setup()
    label(cfg, tiny_bert)
    logits = soft_labels.load(cfg.paths.soft_labels)["train_logits"]
    assert isinstance(logits, np.memmap) and not logits.flags.writeable


def test_second_run_is_a_hit_that_loads_no_teacher(setup, tiny_bert, monkeypatch):
    cfg = setup()
    label(cfg, tiny_bert)
    first = copied(soft_labels.load(cfg.paths.soft_labels))

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher was loaded on a cache hit")

    monkeypatch.setattr(soft_labels, "load_teacher", no_teacher)
    monkeypatch.setattr(soft_labels, "load_tokenizer", no_teacher)
    out = cfg.work_dir / "again"
    result = label(cfg, tiny_bert, out=out)
    assert result.metrics["cache_hit"] == 1
    assert result.summary.startswith("cache hit ")
    second = soft_labels.load(out)
    assert sorted(second) == sorted(first)
    for name in first:
        np.testing.assert_array_equal(second[name], first[name])
    manifest = (out / "manifest.json").read_text()
    assert '"cache_hit": true' in manifest
    assert len(entries(cfg.soft_labels.cache_dir)) == 1


def change_teacher(cfg, tiny_bert, tmp_path):
    from safetensors.numpy import load_file, save_file

    teacher = shutil.copytree(tiny_bert, tmp_path / "teacher-changed")
    weights = load_file(teacher / "model.safetensors")
    weights["classifier.bias"] = weights["classifier.bias"] + 1.0
    save_file(weights, teacher / "model.safetensors", metadata={"format": "pt"})
    return cfg, teacher, cfg.paths.prepared


def change_data(cfg, tiny_bert, tmp_path):
    csv = write_csv(tmp_path / "other" / "reviews.csv", separable_rows(200, seed=1))
    other = cfg.model_copy(update={"data": cfg.data.model_copy(update={"source": str(csv)})})
    prepared = tmp_path / "prepared-other"
    ingest.run(other, prepared)
    return cfg, tiny_bert, prepared


def change_max_length(cfg, tiny_bert, tmp_path):
    ingest_cfg = cfg.ingest.model_copy(update={"max_length": 16})
    return cfg.model_copy(update={"ingest": ingest_cfg}), tiny_bert, cfg.paths.prepared


def change_augmentation(cfg, tiny_bert, tmp_path):
    augment = cfg.soft_labels.augment.model_copy(update={"mask_prob": 0.5})
    soft = cfg.soft_labels.model_copy(update={"augment": augment})
    return cfg.model_copy(update={"soft_labels": soft}), tiny_bert, cfg.paths.prepared


def change_seed_with_augmentation(cfg, tiny_bert, tmp_path):
    return cfg.model_copy(update={"seed": cfg.seed + 1}), tiny_bert, cfg.paths.prepared


@pytest.mark.parametrize("change", [change_teacher, change_data, change_max_length,
                                    change_augmentation, change_seed_with_augmentation])
def test_changing_a_key_component_is_a_miss(setup, tiny_bert, tmp_path, change):
    cfg = setup(**{"soft_labels.augment.enabled": True, "soft_labels.augment.variants": 2})
    label(cfg, tiny_bert)
    changed_cfg, teacher, prepared = change(cfg, tiny_bert, tmp_path)
    result = label(changed_cfg, teacher, prepared, out=tmp_path / "out-changed")
    assert result.metrics["cache_hit"] == 0
    assert len(entries(cfg.soft_labels.cache_dir)) == 2


def test_seed_is_not_part_of_the_key_without_augmentation(setup, tiny_bert, tmp_path):
    cfg = setup()
    label(cfg, tiny_bert)
    result = label(cfg.model_copy(update={"seed": cfg.seed + 1}), tiny_bert,
                   out=tmp_path / "out-seed")
    assert result.metrics["cache_hit"] == 1


def test_teacher_in_another_folder_is_the_same_teacher(setup, tiny_bert, tmp_path):
    cfg = setup()
    label(cfg, tiny_bert)
    moved = shutil.copytree(tiny_bert, tmp_path / "elsewhere" / "teacher")
    assert label(cfg, moved, out=tmp_path / "out-moved").metrics["cache_hit"] == 1


def test_corrupted_entry_is_detected_and_rebuilt(setup, tiny_bert, caplog):
    cfg = setup()
    label(cfg, tiny_bert)
    original = copied(soft_labels.load(cfg.paths.soft_labels))
    (entry,) = entries(cfg.soft_labels.cache_dir)
    truncated = entry / "train_logits.npy"
    truncated.write_bytes(truncated.read_bytes()[:-40])
    flipped = entry / "validation_features.npy"
    blob = bytearray(flipped.read_bytes())
    blob[-5] ^= 0xFF  # same size: only the checksum can tell
    flipped.write_bytes(bytes(blob))

    with caplog.at_level(logging.WARNING, logger="kdpipe.training.softcache"):
        result = label(cfg, tiny_bert)
    assert result.metrics["cache_hit"] == 0
    assert "corrupted" in caplog.text
    rebuilt = soft_labels.load(cfg.paths.soft_labels)
    for name in original:
        np.testing.assert_allclose(rebuilt[name], original[name], atol=1e-6)
    assert label(cfg, tiny_bert).metrics["cache_hit"] == 1


def test_augmented_transfer_set_is_labelled_and_stored(setup, tiny_bert):
    cfg = setup(**{"soft_labels.augment.enabled": True, "soft_labels.augment.variants": 3,
                   "soft_labels.augment.mask_prob": 0.3})
    result = label(cfg, tiny_bert)
    train = read_split(cfg.paths.prepared / "train.parquet").texts
    texts, source = make_variants(train, cfg.soft_labels.augment, cfg.seed, "[MASK]")
    assert 0.9 * 3 * len(train) <= len(texts) <= 3 * len(train)
    arrays = soft_labels.load(cfg.paths.soft_labels)
    assert soft_labels.load_augment_texts(cfg.paths.soft_labels) == texts
    np.testing.assert_array_equal(arrays["augment_source"], source)
    assert arrays["augment_logits"].shape == (len(texts), 2)
    assert arrays["augment_features"].shape == (len(texts), 32)
    assert arrays["augment_logits"].dtype == np.float32
    some = [0, len(texts) // 2, len(texts) - 1]
    logits, _ = direct_forward(tiny_bert, [texts[i] for i in some], cfg.ingest.max_length)
    np.testing.assert_allclose(arrays["augment_logits"][some], logits, atol=1e-5)
    assert f"(incl. {len(texts):,} augmented)" in result.summary


def test_missing_data_card_is_an_actionable_error(make_config, tiny_bert, tmp_path):
    from kdpipe.errors import KdpipeError

    with pytest.raises(KdpipeError, match="run `kdpipe ingest` first"):
        soft_labels.run(make_config(), tiny_bert, tmp_path / "nothing", tmp_path / "out")


def test_step_does_not_import_mlflow():
    code = "import sys, kdpipe.steps.soft_labels; assert 'mlflow' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- the cache on its own


def test_cache_key_is_canonical():
    a = softcache.cache_key({"x": 1, "y": {"b": [1, 2], "a": None}})
    b = softcache.cache_key({"y": {"a": None, "b": [1, 2]}, "x": 1})
    assert a == b and len(a) == 64
    assert softcache.cache_key({"x": 2, "y": {"b": [1, 2], "a": None}}) != a


def test_store_then_lookup_round_trip(tmp_path):
    key = softcache.cache_key({"k": 1})
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3)}
    entry = softcache.store(tmp_path, key, arrays, {"parts": {"k": 1}}, {"t.bin": b"xyz"})
    assert softcache.lookup(tmp_path, key) == entry
    manifest = softcache.read_manifest(entry)
    assert manifest["meta"] == {"parts": {"k": 1}}
    assert manifest["files"]["t.bin"]["size"] == 3
    np.testing.assert_array_equal(np.load(entry / "a.npy"), arrays["a"])
    assert softcache.lookup(tmp_path, softcache.cache_key({"k": 2})) is None


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "manifest"])
def test_lookup_drops_a_damaged_entry(tmp_path, damage, caplog):
    key = softcache.cache_key({"k": 1})
    entry = softcache.store(tmp_path, key, {"a": np.arange(100.0)}, {})
    path = entry / "a.npy"
    blob = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(blob[:-8])
    elif damage == "flip":
        path.write_bytes(blob[:-1] + bytes([blob[-1] ^ 1]))
    elif damage == "delete":
        path.unlink()
    else:
        (entry / "manifest.json").write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="kdpipe.training.softcache"):
        assert softcache.lookup(tmp_path, key) is None
    assert "corrupted" in caplog.text
    assert not entry.exists() and entries(tmp_path) == []


def test_a_second_writer_of_the_same_key_keeps_the_first_entry(tmp_path):
    key = softcache.cache_key({"k": 1})
    first = softcache.store(tmp_path, key, {"a": np.zeros(3)}, {"writer": 1})
    second = softcache.store(tmp_path, key, {"a": np.ones(3)}, {"writer": 2})
    assert first == second
    assert softcache.read_manifest(first)["meta"] == {"writer": 1}
    assert softcache.lookup(tmp_path, key) == first
    assert list(tmp_path.iterdir()) == [first]  # no staging leftovers


def test_a_crash_mid_write_leaves_no_entry(tmp_path, monkeypatch):
    key = softcache.cache_key({"k": 1})
    real_save = np.save
    calls = []

    def failing_save(path, array, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        real_save(path, array, **kwargs)

    monkeypatch.setattr(softcache.np, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        softcache.store(tmp_path, key, {"a": np.zeros(3), "b": np.zeros(3)}, {})
    assert softcache.lookup(tmp_path, key) is None
    assert list(tmp_path.iterdir()) == []


def test_keys_that_are_not_digests_are_refused(tmp_path):
    with pytest.raises(ValueError):
        softcache.lookup(tmp_path, "../etc")


def test_file_tree_hash_follows_content_not_location(tiny_bert, tmp_path):
    here = softcache.file_tree_hash(tiny_bert)
    copy = shutil.copytree(tiny_bert, tmp_path / "a" / "b")
    (copy / "README.md").write_text("notes do not change what the model computes")
    assert softcache.file_tree_hash(copy) == here
    with open(copy / "tokenizer_config.json", "a", encoding="utf-8") as handle:
        handle.write(" ")  # one byte more in a file that does count
    assert softcache.file_tree_hash(copy) != here


def test_file_tree_hash_of_a_folder_without_checkpoint_files_is_an_error(tmp_path):
    from kdpipe.errors import KdpipeError

    (tmp_path / "README.md").write_text("x")
    with pytest.raises(KdpipeError, match="no files matching"):
        softcache.file_tree_hash(tmp_path)
