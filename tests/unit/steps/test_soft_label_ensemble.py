"""Multi-teacher soft labels (soft_labels.teachers): the ensemble's distribution by hand, the
step's arrays against each teacher run alone, the cache key, the checks on a teacher that
cannot join, and the sharded (Kubeflow) path agreeing with the single process."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
from conftest import build_tiny_bert

from kdpipe.errors import KdpipeError
from kdpipe.models.teacher import load_tokenizer
from kdpipe.steps import ingest, soft_label_shards, soft_labels
from kdpipe.steps.soft_labels import ensemble_logits, label_texts, load_teacher


def softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_mean_and_confidence_weighted_ensembles_by_hand():
    a = np.array([[0.0, 0.0]])  # [0.5, 0.5]
    b = np.array([[math.log(3), 0.0]])  # [0.75, 0.25]
    np.testing.assert_allclose(softmax(ensemble_logits([a, b])), [[0.625, 0.375]])
    # weights 0.5 and 0.75: (0.5 [.5, .5] + 0.75 [.75, .25]) / 1.25
    np.testing.assert_allclose(softmax(ensemble_logits([a, b], "confidence")), [[0.65, 0.35]])
    assert ensemble_logits([a, b]).dtype == np.float32
    with pytest.raises(ValueError, match="'mean' or 'confidence'"):
        ensemble_logits([a, b], "max")


@pytest.fixture
def two_teachers(make_config, separable_csv, tiny_bert, tmp_path):
    second = build_tiny_bert(tmp_path / "second", seed=1)

    def build(**overrides):
        cfg = make_config(**{"data.source": str(separable_csv), "soft_labels.batch_size": 16,
                             "soft_labels.augment.enabled": False,
                             "soft_labels.teachers": [str(second)], **overrides})
        ingest.run(cfg, cfg.paths.prepared)
        return cfg

    return build, second


def test_the_soft_labels_are_the_ensemble_of_each_teacher_alone(two_teachers, tiny_bert):
    build, second = two_teachers
    cfg = build(**{"soft_labels.ensemble": "confidence"})
    p = cfg.paths
    result = soft_labels.run(cfg, tiny_bert, p.prepared, p.soft_labels)
    arrays = soft_labels.load(p.soft_labels)
    texts = soft_labels.texts_to_label(cfg, tiny_bert, p.prepared,
                                       load_tokenizer(str(tiny_bert)))[0]
    names = ["neg", "pos"]
    alone = [label_texts(load_teacher(t, names, 0), load_tokenizer(str(t)), texts,
                         cfg.ingest.max_length, 16, features=True) for t in (tiny_bert, second)]
    for split in texts:
        np.testing.assert_allclose(
            softmax(arrays[f"{split}_logits"]),
            softmax(ensemble_logits([a[f"{split}_logits"] for a in alone], "confidence")),
            atol=1e-5)
        # The features stay the first teacher's.
        np.testing.assert_allclose(arrays[f"{split}_features"], alone[0][f"{split}_features"],
                                   atol=1e-5)
    manifest = json.loads((p.soft_labels / "manifest.json").read_text())
    assert manifest["parts"]["ensemble"] == "confidence" and len(manifest["parts"]["teachers"]) == 1
    gold = np.array(soft_labels.read_split(p.prepared / "validation.parquet").labels)
    meta = soft_labels.softcache.read_manifest(
        soft_labels.softcache.lookup(cfg.soft_labels.cache_dir, manifest["key"]))["meta"]
    assert [t["val_accuracy"] for t in meta["teachers"]] == pytest.approx(
        [float((a["validation_logits"].argmax(1) == gold).mean()) for a in alone])
    assert result.metrics["cache_hit"] == 0

    # One teacher: the key is the one single-teacher runs always had (no ensemble parts).
    single = cfg.model_copy(update={"soft_labels": cfg.soft_labels.model_copy(
        update={"teachers": []})})
    parts = soft_labels.key_parts(single, tiny_bert, p.prepared)
    assert "teachers" not in parts and "ensemble" not in parts
    assert soft_labels.key_parts(cfg, tiny_bert, p.prepared)["teachers"] != []


def test_shards_make_the_same_ensemble(two_teachers, tiny_bert, tmp_path):
    build, _ = two_teachers
    cfg = build()
    p = cfg.paths
    soft_labels.run(cfg, tiny_bert, p.prepared, p.soft_labels)
    whole = {k: np.array(v) for k, v in soft_labels.load(p.soft_labels).items()}
    shutil.rmtree(cfg.soft_labels.cache_dir)
    shards = [tmp_path / f"shard{i}" for i in range(2)]
    for i, folder in enumerate(shards):
        soft_label_shards.run_shard(cfg, tiny_bert, p.prepared, folder, i, 2)
    soft_label_shards.merge(shards, tmp_path / "merged")
    merged = soft_labels.load(tmp_path / "merged")
    for name, array in whole.items():
        np.testing.assert_array_equal(merged[name], array)


def test_a_teacher_that_cannot_join_is_a_one_line_error(two_teachers, tiny_bert, tmp_path):
    build, second = two_teachers
    named = tmp_path / "named"
    shutil.copytree(second, named)
    config = json.loads((named / "config.json").read_text())
    config.update(id2label={"0": "pos", "1": "neg"}, label2id={"pos": 0, "neg": 1})
    (named / "config.json").write_text(json.dumps(config))
    cfg = build(**{"soft_labels.teachers": [str(named)]})
    with pytest.raises(KdpipeError, match=r"named: its labels \['pos', 'neg'\] are not the "
                                          r"data's \['neg', 'pos'\]"):
        soft_labels.run(cfg, tiny_bert, cfg.paths.prepared, cfg.paths.soft_labels)

    from transformers import BertModel

    bare = tmp_path / "bare"
    BertModel.from_pretrained(second).save_pretrained(bare)
    load_tokenizer(str(second)).save_pretrained(bare)
    cfg = build(**{"soft_labels.teachers": [str(bare)]})
    with pytest.raises(KdpipeError, match="bare: no fine-tuned head for the 2 classes"):
        soft_labels.run(cfg, tiny_bert, cfg.paths.prepared, cfg.paths.soft_labels)
    cfg = build(**{"soft_labels.teachers": [str(tmp_path / "nowhere")]})
    with pytest.raises(KdpipeError, match="nowhere: not a checkpoint folder"):
        soft_labels.run(cfg, tiny_bert, cfg.paths.prepared, cfg.paths.soft_labels)


# ---------------------------------------------------------------- teacher assistant


def _saved_student(folder, tiny_bert, arch):
    import torch

    from kdpipe.config import StudentConfig
    from kdpipe.models.students import build_student, save_student

    tokenizer = load_tokenizer(str(tiny_bert))
    torch.manual_seed(3)
    cfg = StudentConfig(arch=arch, embedding_dim=8, transformer={"teacher_layers": [1]},
                        bilstm={"hidden_size": 4})
    student = build_student(cfg, 2, tiny_bert, tokenizer.pad_token_id, len(tokenizer))
    save_student(student, folder)
    tokenizer.save_pretrained(folder)
    return student


def test_an_assistant_labels_in_the_teachers_place(make_config, separable_csv, tiny_bert,
                                                   tmp_path):
    assistant = _saved_student(tmp_path / "ta", tiny_bert, "transformer")
    cfg = make_config(**{"data.source": str(separable_csv), "soft_labels.batch_size": 16,
                         "soft_labels.augment.enabled": False,
                         "soft_labels.assistant": str(tmp_path / "ta")})
    p = cfg.paths
    ingest.run(cfg, p.prepared)
    soft_labels.run(cfg, tiny_bert, p.prepared, p.soft_labels)
    arrays = soft_labels.load(p.soft_labels)
    texts = {"validation": soft_labels.read_split(p.prepared / "validation.parquet").texts}
    tokenizer = load_tokenizer(str(tiny_bert))
    expected = label_texts(assistant.model.eval(), tokenizer, texts, cfg.ingest.max_length, 16,
                           features=True)
    teacher = label_texts(load_teacher(tiny_bert, ["neg", "pos"], 0), tokenizer, texts,
                          cfg.ingest.max_length, 16, features=True)
    np.testing.assert_allclose(arrays["validation_logits"], expected["validation_logits"],
                               atol=1e-5)
    np.testing.assert_allclose(arrays["validation_features"],
                               expected["validation_features"], atol=1e-5)
    assert not np.allclose(arrays["validation_logits"], teacher["validation_logits"])
    manifest = json.loads((p.soft_labels / "manifest.json").read_text())
    assert "assistant" in manifest["parts"]

    _saved_student(tmp_path / "lstm", tiny_bert, "bilstm")
    other = cfg.model_copy(update={"soft_labels": cfg.soft_labels.model_copy(
        update={"assistant": str(tmp_path / "lstm")})})
    with pytest.raises(KdpipeError, match="a bilstm student; an assistant must be a "
                                          "transformer student"):
        soft_labels.run(other, tiny_bert, p.prepared, tmp_path / "sl2")
    other = cfg.model_copy(update={"soft_labels": cfg.soft_labels.model_copy(
        update={"assistant": str(tmp_path / "nowhere")})})
    with pytest.raises(KdpipeError, match="nowhere: not a student folder"):
        soft_labels.run(other, tiny_bert, p.prepared, tmp_path / "sl3")
