"""Soft labels in shards (the Kubeflow DAG's ParallelFor) merge into exactly what one
unsharded run writes."""

import json

import numpy as np
import pytest

from kdpipe.errors import KdpipeError
from kdpipe.steps import ingest, soft_label_shards, soft_labels


@pytest.fixture
def setup(make_config, separable_csv):
    """Prepared data (batches of 16, so every split has several batches) with augmentation
    on, so the augmented set's arrays and texts are merged too."""
    cfg = make_config(**{"data.source": str(separable_csv), "soft_labels.batch_size": 16,
                         "soft_labels.augment.enabled": True,
                         "soft_labels.augment.variants": 2})
    ingest.run(cfg, cfg.paths.prepared)
    return cfg


def shard_all(cfg, teacher, num_shards, root):
    return [soft_label_shards.run_shard(cfg, teacher, cfg.paths.prepared, root / f"shard-{i}", i,
                                  num_shards).out_dir for i in range(num_shards)]


def test_shard_rows_deals_whole_length_sorted_batches_in_turn():
    lengths = np.array([5, 1, 3, 2, 4])  # sorted: rows 1, 3, 2, 4, 0 -> [1 3] [2 4] [0]
    np.testing.assert_array_equal(soft_label_shards.shard_rows(lengths, 2, 0, 2), [1, 3, 0])
    np.testing.assert_array_equal(soft_label_shards.shard_rows(lengths, 2, 1, 2), [2, 4])
    assert soft_label_shards.shard_rows(lengths, 2, 3, 4).size == 0  # more shards than batches


@pytest.mark.parametrize("num_shards", [2, 3])
def test_merged_shards_equal_the_unsharded_run_byte_for_byte(setup, tiny_bert, tmp_path,
                                                             num_shards):
    cfg = setup
    whole = soft_labels.run(cfg, tiny_bert, cfg.paths.prepared, tmp_path / "whole").out_dir
    # Shards must compute, not find the whole run's entry: a separate cache.
    shard_cfg = cfg.model_copy(update={"soft_labels": cfg.soft_labels.model_copy(
        update={"cache_dir": tmp_path / "shard-cache"})})
    shards = shard_all(shard_cfg, tiny_bert, num_shards, tmp_path)
    sizes = [int(np.load(d / "validation_rows.npy").size) for d in shards]
    assert sum(sizes) == 20 and (num_shards == 2 or 0 in sizes)  # 20 rows = 2 batches of 16

    result = soft_label_shards.merge(list(reversed(shards)), tmp_path / "merged",
                                     cfg.paths.prepared)
    merged = result.out_dir
    names = sorted(p.name for p in whole.iterdir())
    assert sorted(p.name for p in merged.iterdir()) == names
    for name in names:
        if name != "manifest.json":
            assert (merged / name).read_bytes() == (whole / name).read_bytes(), name
    ours, theirs = (json.loads((d / "manifest.json").read_text()) for d in (merged, whole))
    assert ours.keys() == theirs.keys()
    for key in ("key", "parts", "texts", "shapes"):
        assert ours[key] == theirs[key], key
    assert result.metrics["shards"] == num_shards
    assert result.metrics["teacher_val_accuracy"] == pytest.approx(
        soft_labels.validation_accuracy(whole, cfg.paths.prepared))
    assert result.summary.endswith(f" in {num_shards} shards")


def test_a_shard_is_cached_and_a_rerun_loads_no_teacher(setup, tiny_bert, tmp_path,
                                                        monkeypatch):
    cfg = setup
    first = soft_label_shards.run_shard(cfg, tiny_bert, cfg.paths.prepared, tmp_path / "a", 1, 2)
    assert first.metrics["cache_hit"] == 0

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher was loaded for a cached shard")

    monkeypatch.setattr(soft_labels, "load_teacher", no_teacher)
    again = soft_label_shards.run_shard(cfg, tiny_bert, cfg.paths.prepared, tmp_path / "b", 1, 2)
    assert again.metrics["cache_hit"] == 1
    np.testing.assert_array_equal(np.load(tmp_path / "b" / "train_logits.npy"),
                                  np.load(tmp_path / "a" / "train_logits.npy"))


@pytest.fixture
def two_shards(make_config, separable_csv, tiny_bert, tmp_path):
    cfg = make_config(**{"data.source": str(separable_csv), "soft_labels.features": False})
    ingest.run(cfg, cfg.paths.prepared)
    return cfg, shard_all(cfg, tiny_bert, 2, tmp_path)


def test_merge_refuses_a_missing_or_repeated_shard(two_shards, tmp_path):
    _, (zero, one) = two_shards
    with pytest.raises(KdpipeError, match=r"got shards \[0\] of \[2\]"):
        soft_label_shards.merge([zero], tmp_path / "out")
    with pytest.raises(KdpipeError, match=r"got shards \[1, 1\]"):
        soft_label_shards.merge([one, one], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_merge_refuses_shards_of_different_runs(two_shards, tiny_bert, tmp_path):
    cfg, (zero, _) = two_shards
    other = cfg.model_copy(update={"ingest": cfg.ingest.model_copy(update={"max_length": 16})})
    one = soft_label_shards.run_shard(other, tiny_bert, cfg.paths.prepared, tmp_path / "other", 1,
                                2).out_dir
    with pytest.raises(KdpipeError, match="different runs"):
        soft_label_shards.merge([zero, one], tmp_path / "out")


def test_merge_refuses_a_folder_that_is_not_a_shard(two_shards, tiny_bert, tmp_path):
    cfg, (zero, _) = two_shards
    whole = soft_labels.run(cfg, tiny_bert, cfg.paths.prepared, tmp_path / "whole").out_dir
    with pytest.raises(KdpipeError, match="not a soft-label shard"):
        soft_label_shards.merge([zero, whole], tmp_path / "out")


@pytest.mark.parametrize("shard, num_shards", [(2, 2), (-1, 2), (0, 0)])
def test_a_shard_outside_the_count_is_an_error(make_config, tiny_bert, tmp_path, shard,
                                               num_shards):
    with pytest.raises(KdpipeError, match="need num_shards >= 1 and 0 <= shard"):
        soft_label_shards.run_shard(make_config(), tiny_bert, tmp_path, tmp_path / "o", shard,
                              num_shards)
