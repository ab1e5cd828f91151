"""Predictor over an exported folder: same probabilities as the PyTorch student, one string
or many, empty and very long input, clear errors for bad input and incomplete folders, and
graphs that also take token_type_ids."""

import json
import shutil

import numpy as np
import pytest
import torch
from test_export import make_students

from kdpipe.errors import KdpipeError
from kdpipe.models.students import load_student
from kdpipe.models.teacher import quiet_transformers
from kdpipe.serving.predictor import Prediction, Predictor, length_groups
from kdpipe.steps import export

TEXTS = ["a lovely film", "the phone was broken and sad, really very dull",
         "good", "", "superb service but awful food 12345"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_bert):
    """arch -> (student folder, exported folder)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("serve")
    cfg, students = make_students(root, tiny_bert)
    out = {}
    for arch, student in students.items():
        export.run(cfg, student, cfg.paths.prepared, root / f"export-{arch}")
        out[arch] = (student, root / f"export-{arch}")
    return out


@pytest.fixture(scope="module")
def predictor(folders):
    return Predictor(folders["textcnn"][1], threads=1)


def student_probabilities(student_dir, predictor, texts):
    """softmax of the PyTorch student on the texts, tokenized one at a time (no padding)."""
    model = load_student(student_dir)
    rows = []
    with torch.inference_mode():
        for text in texts:
            enc = predictor.tokenizer([text], truncation=True, max_length=predictor.max_length,
                                      return_tensors="pt")
            rows.append(model(enc["input_ids"], enc["attention_mask"]).logits.softmax(1))
    return torch.cat(rows).numpy()


@pytest.mark.parametrize("arch", ["textcnn", "bilstm", "transformer", "fast"])
def test_probabilities_match_the_pytorch_student(folders, arch):
    student, exported = folders[arch]
    predictor = Predictor(exported, threads=1, batch_size=2)  # several padded batches
    got = predictor.predict_proba(TEXTS)
    assert got.shape == (len(TEXTS), 2) and got.dtype == np.float32
    np.testing.assert_allclose(got, student_probabilities(student, predictor, TEXTS),
                               atol=1e-5, rtol=0)
    np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-6)


def test_predict_gives_the_argmax_label_and_every_probability(predictor):
    results = predictor.predict(TEXTS)
    probabilities = predictor.predict_proba(TEXTS)
    assert predictor.labels == ["neg", "pos"]
    for result, row in zip(results, probabilities, strict=True):
        assert isinstance(result, Prediction)
        assert result.label == predictor.labels[int(row.argmax())]
        assert list(result.probabilities) == predictor.labels
        assert result.probabilities["pos"] == pytest.approx(float(row[1]))
        assert result.score == max(result.probabilities.values())
    assert json.loads(json.dumps(results[0].to_dict())) == results[0].to_dict()


def test_single_string_is_a_batch_of_one(predictor):
    one = predictor.predict("a lovely film")
    assert len(one) == 1
    assert one == predictor.predict(["a lovely film"])
    assert one[0] == predictor.predict(("x", "a lovely film"))[1]
    assert predictor.predict(t for t in ["a lovely film"]) == one  # any iterable of str


def test_empty_list_gives_empty_results(predictor):
    assert predictor.predict([]) == []
    assert predictor.predict_proba([]).shape == (0, 2)


def test_very_long_text_is_cut_at_max_length(predictor):
    long_text = "good movie and nice food " * 4000  # 20k words, far over max_length 32
    feed = next(predictor.encode([long_text, "bad"]))
    assert feed["input_ids"].shape == (2, predictor.max_length) == (2, 32)
    cut = "good movie and nice food " * 7  # 35 words: also cut to the same 32 tokens
    np.testing.assert_array_equal(predictor.predict_proba(long_text),
                                  predictor.predict_proba(cut))


@pytest.mark.parametrize("bad,message", [
    (None, "expected a string or a list of strings, got NoneType"),
    (42, "got int"),
    (b"bytes", "got bytes"),
    ({"text": "x"}, "got dict"),
    (["fine", 3], "text 1 is int, not a string: 3"),
    (["fine", None], "text 1 is NoneType"),
])
def test_non_string_input_is_a_clear_error(predictor, bad, message):
    with pytest.raises(KdpipeError, match=message):
        predictor.predict(bad)
    with pytest.raises(KdpipeError, match=message):
        predictor.predict_proba(bad)


@pytest.mark.parametrize("missing", ["model.onnx", "labels.json", "export.json",
                                     "tokenizer_config.json", "tokenizer.json"])
def test_incomplete_folder_names_the_missing_file(folders, tmp_path, missing):
    folder = shutil.copytree(folders["textcnn"][1], tmp_path / "export")
    (folder / missing).unlink()
    with pytest.raises(KdpipeError, match=f"{folder / missing}: not found"):
        Predictor(folder)


def test_missing_folder_and_bad_files_are_clear_errors(folders, tmp_path):
    with pytest.raises(KdpipeError, match="no such folder"):
        Predictor(tmp_path / "nothing")
    folder = shutil.copytree(folders["textcnn"][1], tmp_path / "export")
    (folder / "labels.json").write_text('{"names": ["only-one"]}')
    with pytest.raises(KdpipeError, match="gives 2 logits per text but .* names 1 labels"):
        Predictor(folder)
    (folder / "export.json").write_text("{not json")
    with pytest.raises(KdpipeError, match="export.json: not readable JSON"):
        Predictor(folder)
    with pytest.raises(KdpipeError, match="threads must be >= 1"):
        Predictor(folders["textcnn"][1], threads=0)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning",
                            "ignore:Exporting aten..index", "ignore::DeprecationWarning")
def test_graph_that_takes_token_type_ids_is_fed_them(tiny_bert, tmp_path):
    """A BERT exported with all three inputs (as a teacher would be) gets the tokenizer's
    token_type_ids too; only declared inputs are fed."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    with quiet_transformers():
        model = AutoModelForSequenceClassification.from_pretrained(tiny_bert).eval()

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.model(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).logits

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    enc = tokenizer(["good film", "bad"], padding=True, return_tensors="pt")
    names = ["input_ids", "attention_mask", "token_type_ids"]
    folder = tmp_path / "teacher-export"
    folder.mkdir()
    # eval(): the exporter puts the wrapper's own mode back on everything inside after
    torch.onnx.export(Logits().eval(), tuple(enc[n] for n in names), str(folder / "model.onnx"),
                      dynamo=False, opset_version=17, input_names=names,
                      output_names=["logits"],
                      dynamic_axes={**{n: {0: "b", 1: "s"} for n in names}, "logits": {0: "b"}})
    tokenizer.save_pretrained(folder)
    (folder / "labels.json").write_text('{"names": ["neg", "pos"]}')
    (folder / "export.json").write_text('{"max_length": 16}')
    predictor = Predictor(folder, threads=1)
    assert set(predictor.inputs) == set(names)
    enc = tokenizer(TEXTS, padding=True, truncation=True, max_length=16, return_tensors="pt")
    with torch.inference_mode():
        want = model(**enc).logits.softmax(1).numpy()
    np.testing.assert_allclose(predictor.predict_proba(TEXTS), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("threads", [1, 2])  # one text at a time / encode_batch
def test_fast_backend_encodes_exactly_as_the_transformers_call(folders, threads):
    """The Rust backend path gives the ids, masks and padding that
    ``tokenizer(..., truncation=True, padding=True)`` gives, long and odd texts included."""
    predictor = Predictor(folders["textcnn"][1], threads=threads)
    assert predictor.backend is not None
    assert predictor.words is not None  # a student's BERT tokenizer: ids from the word cache
    texts = [*TEXTS, "word " * 500, "  spaces\\tand\\nnewlines  ", "ÜNÍCÖDE ünïcödé 東京 🙂",
             "[CLS] [SEP] [PAD] literal specials", "12345678901234567890"]
    for size in (1, 3, len(texts)):
        batch = texts[:size]
        got = next(predictor.encode(batch))
        want = predictor.tokenizer(batch, truncation=True, max_length=predictor.max_length,
                                   padding=True, return_tensors="np")
        assert set(got) == set(predictor.inputs)
        for name in got:
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)
            assert got[name].dtype == np.int64


def test_without_a_fast_backend_the_transformers_call_gives_the_same(folders):
    """The fallback for tokenizers without a Rust backend (slow tokenizers)."""
    fast = Predictor(folders["textcnn"][1], threads=1)
    slow = Predictor(folders["textcnn"][1], threads=1)
    slow.backend = None
    # The fast path groups texts by length, so rows are padded differently: equal to float
    # rounding, not bit for bit.
    np.testing.assert_allclose(slow.logits(TEXTS), fast.logits(TEXTS), atol=1e-5, rtol=0)


def test_length_groups_cut_on_padding_and_batch_size():
    lengths = [30, 5, 6, 31, 5, 7, 29, 6, 5, 32, 6, 5]
    groups = length_groups(lengths, batch_size=64, min_group=2, slack=1.25)
    # 5s, 6s and the 7 pad to 56 tokens for 45 real (1.24x); the 29 would make it 261 for 74.
    assert [sorted(lengths[i] for i in g) for g in groups] == [
        [5, 5, 5, 5, 6, 6, 6, 7], [29, 30, 31, 32]]
    assert sorted(np.concatenate(groups).tolist()) == list(range(len(lengths)))
    capped = length_groups([4] * 10, batch_size=4)
    assert [len(g) for g in capped] == [4, 4, 2]
    assert [g.tolist() for g in length_groups([9, 1, 5], batch_size=64)] == [[1, 2, 0]]
    assert length_groups([], batch_size=8) == []


def test_grouped_logits_come_back_in_input_order(folders):
    """Many texts of mixed length in one call: each row as that text alone gives."""
    predictor = Predictor(folders["bilstm"][1], threads=1)
    texts = [("short" if i % 3 else "a much longer text about a good film " * (1 + i % 4))
             for i in range(40)]
    alone = np.concatenate([predictor.logits(t) for t in texts])
    np.testing.assert_allclose(predictor.logits(texts), alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("fast", [True, False])
def test_same_width_pads_every_batch_to_the_longest_text(folders, fast):
    predictor = Predictor(folders["textcnn"][1], threads=1, batch_size=2)
    if not fast:
        predictor.backend = None
    texts = ["good", "bad", "the phone was broken and sad, really very dull", "ok", "fine"]
    ragged = [feed["input_ids"].shape[1] for feed in predictor.encode(texts)]
    assert len(set(ragged)) > 1
    feeds = list(predictor.encode(texts, same_width=True))
    assert {feed["input_ids"].shape for feed in feeds} == {(2, max(ragged))} | {(1, max(ragged))}
    assert [f["attention_mask"].sum() for f in feeds] == [
        f["attention_mask"].sum() for f in predictor.encode(texts)]
    assert np.concatenate([predictor.run(f) for f in feeds]).argmax(1).tolist() == \
        predictor.logits(texts).argmax(1).tolist()
