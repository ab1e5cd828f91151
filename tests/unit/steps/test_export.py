"""The export step: each student exports to ONNX with dynamic batch and length and matches
PyTorch; the BiLSTM's export path equals its packed forward and becomes one LSTM node per
layer; the folder stands alone;
parity failures and missing inputs are clear errors; TensorRT is skipped where absent."""

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from conftest import prepared_config, save_fresh_student

from kdpipe.compression.onnx_export import exportable
from kdpipe.config import StudentConfig
from kdpipe.errors import KdpipeError
from kdpipe.models.students import load_student
from kdpipe.models.teacher import load_tokenizer
from kdpipe.serving.ort import ort_session
from kdpipe.serving.predictor import Predictor
from kdpipe.serving.predictor import load_tokenizer as load_folder_tokenizer
from kdpipe.steps import export

ARCHS = ["textcnn", "bilstm", "transformer", "fast"]
SMALL_STUDENT = {"embedding_dim": 16, "textcnn": {"num_filters": 8},
                 "bilstm": {"hidden_size": 8, "layers": 2},
                 "fast": {"buckets": 32, "hidden_size": 8}}


def make_students(root, tiny_bert):
    """Prepared data (ingest of a 200-row CSV) and one saved student folder per arch, built
    straight from the tiny teacher (no training: export only needs a fixed module)."""
    cfg = prepared_config(root, tiny_bert, student=SMALL_STUDENT)
    tokenizer = load_tokenizer(str(tiny_bert))
    folders = {arch: save_fresh_student(
        root / arch, StudentConfig.model_validate({**SMALL_STUDENT, "arch": arch}), tiny_bert,
        tokenizer) for arch in ARCHS}
    return cfg, folders


@pytest.fixture(scope="module")
def students(tmp_path_factory, tiny_bert):
    torch.set_num_threads(1)
    return make_students(tmp_path_factory.mktemp("export"), tiny_bert)


@pytest.fixture(scope="module")
def exported(students, tmp_path_factory):
    """arch -> (StepResult, export folder), each exported once for the module."""
    cfg, folders = students
    root = tmp_path_factory.mktemp("exported")
    return {arch: (export.run(cfg, folders[arch], cfg.paths.prepared, root / arch),
                   root / arch) for arch in ARCHS}


def padded_batch(batch, length, vocab, seed):
    """Random ids, right-padded to random lengths in 1..length (the first row unpadded)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, vocab, (batch, length))
    mask = np.ones_like(ids)
    for row in range(1, batch):
        keep = rng.integers(1, length + 1)
        ids[row, keep:], mask[row, keep:] = 0, 0
    return ids.astype(np.int64), mask.astype(np.int64)


@pytest.mark.parametrize("arch", ARCHS)
def test_each_student_exports_with_parity(exported, students, arch):
    result, folder = exported[arch]
    assert result.metrics["parity_max_abs_diff"] <= 1e-4
    assert result.metrics["parity_label_agreement"] == 1.0
    assert result.metrics["onnx_bytes"] == (folder / "model.onnx").stat().st_size
    record = json.loads((folder / "export.json").read_text())
    assert record["parity"]["rows"] == 20 and record["parity"]["passed"]
    assert (record["opset"], record["optimize"], record["max_length"]) == (17, "basic", 32)
    graph = onnx.load(str(folder / "model.onnx")).graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in graph.output] == ["logits"]  # no features, no hidden states
    assert all(i.type.tensor_type.elem_type == onnx.TensorProto.INT64 for i in graph.input)
    assert not list(folder.glob("*.data")) and not list(folder.glob("*.plan"))


@pytest.mark.parametrize("optimize,opset", [("none", 23), ("all", 17)])
def test_other_optimisation_levels_and_opsets(students, tmp_path, optimize, opset):
    cfg, folders = students
    cfg = cfg.model_copy(update={"export": cfg.export.model_copy(
        update={"optimize": optimize, "opset": opset})})
    result = export.run(cfg, folders["bilstm"], cfg.paths.prepared, tmp_path / "e")
    assert result.metrics["parity_max_abs_diff"] <= 1e-4
    record = json.loads((tmp_path / "e" / "export.json").read_text())
    assert (record["optimize"], record["opset"]) == (optimize, opset)
    assert record["traced_at_opset"] == min(opset, 20)  # the TorchScript exporter's newest
    imports = onnx.load(str(tmp_path / "e" / "model.onnx")).opset_import
    assert {i.version for i in imports if i.domain in ("", "ai.onnx")} == {opset}


@pytest.mark.parametrize("arch", ARCHS)
def test_exported_graph_takes_any_batch_and_length(exported, students, arch):
    _, folders = students
    model = load_student(folders[arch])
    session = ort_session(exported[arch][1] / "model.onnx", threads=1)
    vocab = model.student_record["vocab_size"]
    for seed, (batch, length) in enumerate([(1, 4), (5, 4), (1, 17), (5, 17)]):
        ids, mask = padded_batch(batch, length, vocab, seed)
        got = session.run(["logits"], {"input_ids": ids, "attention_mask": mask})[0]
        with torch.inference_mode():
            want = model(torch.from_numpy(ids), torch.from_numpy(mask)).logits.numpy()
        assert got.shape == (batch, 2)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("layers", [1, 2])
def test_bilstm_export_path_equals_packed_forward(layers):
    from kdpipe.models.bilstm import BiLSTM

    torch.manual_seed(layers)
    model = BiLSTM(40, 12, 0, 6, layers, 3, dropout=0.3).eval()
    ids, mask = padded_batch(6, 9, 40, seed=layers)
    ids[1, 1:], mask[1, 1:] = 0, 0  # one real token
    ids[2], mask[2] = 0, 0  # no real token: packed as one step of the pad embedding
    ids, mask = torch.from_numpy(ids), torch.from_numpy(mask)
    with torch.inference_mode():
        packed = model(ids, mask).logits
        with exportable(model) as twin:
            assert not any(isinstance(m, torch.nn.LSTM) for m in twin.modules())
            logits = twin(ids, mask)
        assert torch.allclose(model(ids, mask).logits, packed)  # the original is untouched
    torch.testing.assert_close(logits, packed, atol=1e-6, rtol=0)


def test_bilstm_exports_one_lstm_node_per_layer_reading_the_lengths(exported):
    """Both directions in one node that takes each row's length, so nothing reverses rows
    around it or picks each row's last step (the per-row GatherElements of the old path)."""
    graph = onnx.load(str(exported["bilstm"][1] / "model.onnx")).graph
    lstms = [n for n in graph.node if n.op_type == "LSTM"]
    assert len(lstms) == SMALL_STUDENT["bilstm"]["layers"]
    for node in lstms:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["direction"] == b"bidirectional"
        assert attrs["hidden_size"] == SMALL_STUDENT["bilstm"]["hidden_size"]
        assert len(node.input) >= 5 and node.input[4]  # sequence_lens is wired
    assert not any(n.op_type == "GatherElements" for n in graph.node)


def test_wrapped_bilstm_with_a_vocabulary_buffer_exports_its_own_forward(tmp_path):
    """The module's forward is what gets exported (here a remap of token ids held in a
    buffer, around a BiLSTM), with only the packing swapped."""
    from kdpipe.compression.onnx_export import export_onnx
    from kdpipe.models.bilstm import BiLSTM

    class Remapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("remap", torch.arange(40).flip(0) % 20)
            self.inner = BiLSTM(20, 8, 0, 4, 1, 2, dropout=0.0)

        def forward(self, input_ids, attention_mask):
            return self.inner(self.remap[input_ids], attention_mask)

    torch.manual_seed(0)
    model = Remapped().eval()
    example = tuple(torch.from_numpy(a) for a in padded_batch(2, 6, 40, seed=0))
    export_onnx(model, example, tmp_path / "m.onnx", opset=17)
    session = ort_session(tmp_path / "m.onnx", threads=1)
    ids, mask = padded_batch(3, 11, 40, seed=1)
    with torch.inference_mode():
        want = model(torch.from_numpy(ids), torch.from_numpy(mask)).logits.numpy()
    got = session.run(["logits"], {"input_ids": ids, "attention_mask": mask})[0]
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_pruned_student_exports_with_its_vocabulary_remap(students, tmp_path, arch):
    """A prune output (vocabulary cut to the words of a few texts, half the units removed,
    half the weights zeroed) exports with parity; an id that was cut reads as [UNK]."""
    from kdpipe.compression import pruning

    cfg, folders = students
    tokenizer = load_folder_tokenizer(folders[arch])
    model = pruning.PrunedStudent(load_student(folders[arch]))
    texts = ["good movie", "the film was awful", "bad"]
    kept = pruning.kept_token_ids(tokenizer(texts)["input_ids"], tokenizer.all_special_ids)
    pruning.prune_vocabulary(model, kept, tokenizer.unk_token_id)
    pruning.prune_structure(model, 0.5)
    pruning.prune_magnitude(model, 0.5)
    pruning.save_pruned(model.eval(), tmp_path / "pruned")
    tokenizer.save_pretrained(tmp_path / "pruned")
    result = export.run(cfg, tmp_path / "pruned", cfg.paths.prepared, tmp_path / "e")
    assert result.metrics["parity_max_abs_diff"] <= 1e-4
    assert result.metrics["parity_label_agreement"] == 1.0
    predictor = Predictor(tmp_path / "e", threads=1)
    cut, unk = (predictor.predict_proba(text) for text in ("good superb film", "good [UNK] film"))
    if arch == "fast":  # its bigrams hash the tokenizer's ids: "superb" still has its own
        assert np.abs(cut - unk).max() > 1e-5
    else:
        np.testing.assert_allclose(cut, unk, atol=1e-6)
    assert json.loads((tmp_path / "e" / "export.json").read_text())["module"] == "PrunedStudent"


@pytest.mark.parametrize("arch", ARCHS)
def test_pruned_student_with_own_unseen_rows_exports(students, tmp_path, arch):
    """Dropped tokens reading their own low-rank rows (a FallbackEmbedding) export with
    parity (a text with a dropped word reads as in PyTorch) and the low-rank rows go along."""
    from kdpipe.compression import pruning

    cfg, folders = students
    tokenizer = load_folder_tokenizer(folders[arch])
    model = pruning.PrunedStudent(load_student(folders[arch]))
    kept = pruning.kept_token_ids(tokenizer(["good movie", "bad"])["input_ids"],
                                  tokenizer.all_special_ids)
    pruning.prune_vocabulary(model, kept, tokenizer.unk_token_id, own_rank=2)
    pruning.save_pruned(model.eval(), tmp_path / "pruned")
    tokenizer.save_pretrained(tmp_path / "pruned")
    result = export.run(cfg, tmp_path / "pruned", cfg.paths.prepared, tmp_path / "e")
    assert result.metrics["parity_max_abs_diff"] <= 1e-4
    predictor = Predictor(tmp_path / "e", threads=1)
    batch = tokenizer(["good superb film", "good [UNK] film"], return_tensors="pt")
    with torch.inference_mode():
        want = model(batch["input_ids"], batch["attention_mask"]).logits.softmax(-1).numpy()
    got = predictor.predict_proba(["good superb film", "good [UNK] film"])
    np.testing.assert_allclose(got, want, atol=1e-5)
    graph = onnx.load(tmp_path / "e" / "model.onnx").graph
    assert any(init.dims[:1] == [len(tokenizer) - len(kept)] for init in graph.initializer)


def test_folder_is_self_contained(students, tmp_path):
    cfg, folders = students
    source = shutil.copytree(folders["bilstm"], tmp_path / "student")
    export.run(cfg, source, cfg.paths.prepared, tmp_path / "export")
    texts = ["a lovely film", "the phone was broken and sad"]
    before = Predictor(tmp_path / "export").predict_proba(texts)
    moved = shutil.copytree(tmp_path / "export", tmp_path / "elsewhere" / "model")
    shutil.rmtree(source)
    shutil.rmtree(tmp_path / "export")
    np.testing.assert_array_equal(Predictor(moved, threads=1).predict_proba(texts), before)
    assert sorted(p.name for p in moved.iterdir()) == [
        "export.json", "labels.json", "model.onnx", "tokenizer.json", "tokenizer_config.json"]


def test_tensorrt_is_skipped_here(exported):
    record = json.loads((exported["textcnn"][1] / "export.json").read_text())
    assert record["tensorrt"] == "skipped: TensorRT not available"
    assert "tensorrt_engine" not in record


def test_tensorrt_switched_off_is_recorded(students):
    cfg, _ = students
    off = cfg.model_copy(update={"export": cfg.export.model_copy(update={"tensorrt": False})})
    status, engine = export.tensorrt_engine(off, None, None, [], np.zeros((0, 2)))
    assert (status, engine) == ("skipped: export.tensorrt is false", None)


def test_parity_failure_names_the_numbers_and_writes_nothing(students, tmp_path,
                                                             monkeypatch):
    cfg, folders = students
    strict = cfg.model_copy(update={"export": cfg.export.model_copy(
        update={"parity_tolerance": 1e-12})})
    real = export.torch_logits

    def differing_model(model, feeds):  # the reference now comes from a nudged copy
        import copy

        other = copy.deepcopy(model)
        with torch.no_grad():
            other.classifier.bias += 1e-3
        return real(other, feeds)

    monkeypatch.setattr(export, "torch_logits", differing_model)
    out = tmp_path / "export"
    out.mkdir()
    (out / "keep.txt").write_text("previous export")
    with pytest.raises(KdpipeError, match=r"max \|Δlogit\| 0\.001\d* > export\.parity_tolerance "
                                          r"1e-12 over 20 validation texts"):
        export.run(strict, folders["textcnn"], cfg.paths.prepared, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]  # the old output stays whole


def test_parity_report_counts_nan_as_failure():
    report = export.parity_report(np.array([[0.0, 1.0]]), np.array([[np.nan, 1.0]]), 1e-4)
    assert report["max_abs_diff"] == np.inf and not report["passed"]


def test_student_folder_without_tokenizer_is_a_clear_error(students, tmp_path):
    cfg, folders = students
    bare = shutil.copytree(folders["textcnn"], tmp_path / "s")
    (bare / "tokenizer_config.json").unlink()
    with pytest.raises(KdpipeError, match="tokenizer_config.json: not found"):
        export.run(cfg, bare, cfg.paths.prepared, tmp_path / "e")
    assert not (tmp_path / "e").exists()


def test_missing_prepared_data_is_a_clear_error(students, tmp_path):
    cfg, folders = students
    with pytest.raises(KdpipeError, match="labels.json: not found; run `kdpipe ingest`"):
        export.run(cfg, folders["textcnn"], tmp_path / "nowhere", tmp_path / "e")
