"""The fast student served by numpy: the same logits as PyTorch for texts of any length in
one call (with and without bigrams or a hidden layer, behind a pruned vocabulary), chosen by
the Predictor for an export folder, and left out of the int8 folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import prepared_config
from safetensors.numpy import save_file

from kdpipe.compression import pruning
from kdpipe.errors import KdpipeError
from kdpipe.models import bag
from kdpipe.serving import bag_numpy
from kdpipe.serving.bag_numpy import BAG_FILE, BagSession
from kdpipe.serving.predictor import Predictor

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Lengths 1, 2, 5 and 3 in one call: a text with no bigram, and texts on either side of it.
ROWS = [[7], [3, 9], [1, 4, 4, 2, 8], [5, 6, 0]]


def module(buckets: int, hidden: int, seed: int = 0) -> bag.BagOfNgrams:
    torch.manual_seed(seed)
    model = bag.BagOfNgrams(10, 6, 0, buckets, hidden, 3, dropout=0.0).eval()
    with torch.no_grad():  # rows well away from the start, so every table matters
        for param in model.parameters():
            param.normal_()
    model.student_record = {"arch": "fast"}
    return model


def torch_logits(model, rows):
    with torch.no_grad():
        return torch.cat([model(torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long))
                          .logits for r in rows]).numpy()


def session(model, tmp_path):
    path = tmp_path / BAG_FILE
    save_file(bag.serving_tables(model), str(path))
    return BagSession(path)


def test_the_hash_is_the_models():
    assert bag_numpy.BIGRAM_PRIME == bag.BIGRAM_PRIME


@pytest.mark.parametrize("buckets,hidden", [(16, 4), (16, 0), (0, 4)])
def test_numpy_logits_are_pytorchs_in_one_call_or_one_by_one(buckets, hidden, tmp_path):
    model = module(buckets, hidden)
    served = session(model, tmp_path)
    want = torch_logits(model, ROWS)
    np.testing.assert_allclose(served.logits(ROWS), want, atol=1e-5, rtol=0)
    for row, expected in zip(ROWS, want, strict=True):
        np.testing.assert_allclose(served.logits([row])[0], expected, atol=1e-5, rtol=0)
    assert served.logits([]).shape == (0, 3)


def test_a_pruned_vocabulary_is_resolved_into_the_word_table(tmp_path):
    model = pruning.PrunedStudent(module(16, 4)).eval()
    pruning.prune_vocabulary(model, [0, 1, 3, 4, 5, 9], unk_id=1, own_rank=2)
    served = session(model, tmp_path)
    assert served.words.shape == (10, 4)  # every tokenizer id, cut ones too; times hidden
    np.testing.assert_allclose(served.logits(ROWS), torch_logits(model, ROWS), atol=1e-5,
                               rtol=0)


def test_a_damaged_table_file_names_itself(tmp_path):
    path = tmp_path / BAG_FILE
    path.write_bytes(b"not safetensors")
    with pytest.raises(KdpipeError, match="cannot read the fast student's tables"):
        BagSession(path)
    save_file({"words": np.zeros((3, 2), np.float32)}, str(path))
    with pytest.raises(KdpipeError, match="has no classifier.bias"):
        BagSession(path)


def test_export_writes_the_tables_the_predictor_serves_and_quantize_leaves_them(
        tmp_path, tiny_bert):
    from kdpipe.models.students import build_student, save_student
    from kdpipe.models.teacher import load_tokenizer
    from kdpipe.steps import export, quantize

    cfg = prepared_config(tmp_path, tiny_bert, student={
        "arch": "fast", "embedding_dim": 8, "fast": {"buckets": 32, "hidden_size": 4}})
    tokenizer = load_tokenizer(str(tiny_bert))
    torch.manual_seed(0)
    student = build_student(cfg.student, 2, tiny_bert, tokenizer.pad_token_id, len(tokenizer))
    save_student(student, tmp_path / "student")
    tokenizer.save_pretrained(tmp_path / "student")
    export.run(cfg, tmp_path / "student", cfg.paths.prepared, tmp_path / "export")
    record = json.loads((tmp_path / "export" / "export.json").read_text())
    assert record["numpy_parity"]["passed"] and record["numpy_parity"]["rows"] > 0

    by_numpy = Predictor(tmp_path / "export", threads=1)
    by_graph = Predictor(tmp_path / "export", threads=1, numpy_bag=False)
    assert by_numpy.bag is not None and by_graph.bag is None
    texts = ["good", "the film was awful and the food was dull", "a"]
    np.testing.assert_allclose(by_numpy.logits(texts), by_graph.logits(texts), atol=1e-5)

    quantize.run(cfg, tmp_path / "export", cfg.paths.prepared, tmp_path / "q",
                 student_dir=tmp_path / "student")
    assert not (tmp_path / "q" / BAG_FILE).exists()
    assert Predictor(tmp_path / "q", threads=1).bag is None  # the int8 graph is what it serves
