"""The quantize step: dynamic int8 shrinks the model and still agrees with fp32; static QDQ
calibrates and inserts QuantizeLinear; the accuracy gate keeps fp32 when int8 loses too
much; ``none`` copies unchanged; the output folder stands alone."""

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from conftest import prepared_config, save_fresh_student

from kdpipe.compression import ort_quantize
from kdpipe.errors import KdpipeError
from kdpipe.models.teacher import load_tokenizer
from kdpipe.serving.predictor import Predictor
from kdpipe.steps import export, quantize

SMALL_STUDENT = {"arch": "textcnn", "embedding_dim": 64, "textcnn": {"num_filters": 8}}
TEXTS = ["a lovely film", "the phone was broken and sad", "good", "awful awful plot"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_bert):
    """(cfg, exported textcnn folder): ingest of a 200-row CSV, an untrained textcnn built
    from the tiny teacher, exported once for the module."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("quantize")
    cfg = prepared_config(root, tiny_bert, student=SMALL_STUDENT)
    save_fresh_student(root / "student", cfg.student, tiny_bert, load_tokenizer(str(tiny_bert)))
    export.run(cfg, root / "student", cfg.paths.prepared, root / "export")
    return cfg, root / "export"


def with_quantize(cfg, **update):
    return cfg.model_copy(update={"quantize": cfg.quantize.model_copy(update=update)})


def record(folder):
    return json.loads((folder / "quantize.json").read_text())


def test_ort_dynamic_is_smaller_and_agrees(exported, tmp_path):
    cfg, folder = exported
    result = quantize.run(with_quantize(cfg, max_accuracy_drop=1.0), folder,
                          cfg.paths.prepared, tmp_path / "q")
    out = tmp_path / "q"
    fp32_size = (folder / "model.onnx").stat().st_size
    assert (out / "model.onnx").stat().st_size < fp32_size
    assert result.metrics["kept_int8"] == 1.0
    assert result.metrics["size_bytes"] == (out / "model.onnx").stat().st_size
    assert result.metrics["fp32_bytes"] == fp32_size
    rec = record(out)
    assert rec["method"] == "ort_dynamic" and rec["kept"] == "int8"
    assert rec["sizes"]["int8_bytes"] < rec["sizes"]["fp32_bytes"]
    texts = TEXTS * 5 + [f"word {i} and more" for i in range(20)]
    fp32 = Predictor(folder, threads=1).logits(texts)
    int8 = Predictor(out, threads=1).logits(texts)
    assert (fp32.argmax(1) == int8.argmax(1)).mean() >= 0.8
    assert np.abs(fp32 - int8).max() < 0.5


def ops_of(folder):
    return {n.op_type for n in onnx.load(str(folder / "model.onnx")).graph.node}


def test_default_export_quantizes_the_textcnn_windows_as_one_matmul(exported, tmp_path):
    # The exported TextCNN computes its convolutions as a MatMul (TextCNN.windows_as_matmul),
    # so the default op_types turn them into integer ops, and no float Conv is left. Windows
    # past a text's end are zeroed per width (no (B, L, F) -inf fill: no Where).
    cfg, folder = exported
    assert "Conv" not in ops_of(folder) and "MatMul" in ops_of(folder)
    assert "Where" not in ops_of(folder)
    quantize.run(with_quantize(cfg, max_accuracy_drop=1.0), folder, cfg.paths.prepared,
                 tmp_path / "d")
    ops = ops_of(tmp_path / "d")
    assert "MatMulInteger" in ops and "MatMul" not in ops
    assert record(tmp_path / "d")["op_types"] == ["Gather", "MatMul", "LSTM"]
    assert record(tmp_path / "d")["left_in_float"] == []


def test_op_types_limit_what_is_quantized(exported, tmp_path):
    cfg, folder = exported
    quantize.run(with_quantize(cfg, max_accuracy_drop=1.0, op_types=["Gather"]), folder,
                 cfg.paths.prepared, tmp_path / "g")
    ops = ops_of(tmp_path / "g")
    assert "MatMul" in ops and "MatMulInteger" not in ops
    assert record(tmp_path / "g")["op_types"] == ["Gather"]


def test_runtime_only_operators_are_reported(tmp_path):
    # ORT's "extended" level saves its own fused operators (a Conv + ReLU becomes FusedConv),
    # which the quantizer does not know: the quantize record lists them as left in float.
    from kdpipe.serving.ort import save_optimized

    module = torch.nn.Sequential(torch.nn.Conv1d(4, 3, 2), torch.nn.ReLU()).eval()
    torch.onnx.export(module, (torch.randn(1, 4, 5),), str(tmp_path / "plain.onnx"),
                      dynamo=False, input_names=["x"], output_names=["y"])
    assert ort_quantize.runtime_only_ops(tmp_path / "plain.onnx") == []
    save_optimized(tmp_path / "plain.onnx", tmp_path / "fused.onnx", "extended")
    assert "FusedConv" in ort_quantize.runtime_only_ops(tmp_path / "fused.onnx")


def test_ort_static_minmax_inserts_qdq(exported, tmp_path):
    cfg, folder = exported
    cfg = with_quantize(cfg, method="ort_static", calibration="minmax",
                        calibration_batches=2, max_accuracy_drop=1.0)
    result = quantize.run(cfg, folder, cfg.paths.prepared, tmp_path / "q")
    ops = {n.op_type for n in onnx.load(str(tmp_path / "q" / "model.onnx")).graph.node}
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    rec = record(tmp_path / "q")
    assert rec["calibration"] == "minmax" and rec["kept"] == "int8"
    assert rec["calibration_batches"] == 2 and rec["calibration_texts"] <= 64
    assert rec["pre_process"]["ran"] or rec["pre_process"]["why"]
    assert result.metrics["kept_int8"] == 1.0
    assert Predictor(tmp_path / "q", threads=1).predict_proba(TEXTS).shape == (4, 2)


def test_gate_keeps_fp32_when_int8_loses_too_much(exported, tmp_path):
    cfg, folder = exported
    # max_accuracy_drop=-1 (bypassing validation) demands int8 beat fp32 by 100 points.
    q = cfg.quantize.model_copy(update={"max_accuracy_drop": -1.0})
    result = quantize.run(cfg.model_copy(update={"quantize": q}), folder,
                          cfg.paths.prepared, tmp_path / "q")
    assert (tmp_path / "q" / "model.onnx").read_bytes() == (folder / "model.onnx").read_bytes()
    rec = record(tmp_path / "q")
    assert rec["kept"] == "fp32"
    assert rec["why"].startswith("int8 lost") and "> max_accuracy_drop" in rec["why"]
    assert result.metrics["kept_int8"] == 0.0
    assert result.metrics["size_bytes"] == result.metrics["fp32_bytes"]
    assert result.metrics["int8_bytes"] < result.metrics["fp32_bytes"]


def test_none_copies_unchanged_and_others_are_copied_as_is(exported, tmp_path):
    cfg, folder = exported
    result = quantize.run(with_quantize(cfg, method="none"), folder, cfg.paths.prepared,
                          tmp_path / "q")
    for path in folder.iterdir():
        assert (tmp_path / "q" / path.name).read_bytes() == path.read_bytes(), path.name
    assert sorted(p.name for p in (tmp_path / "q").iterdir()) == sorted(
        [p.name for p in folder.iterdir()] + ["quantize.json"])
    assert result.metrics["val_accuracy_fp32"] == result.metrics["val_accuracy_int8"]
    assert result.metrics["kept_int8"] == 1.0
    assert record(tmp_path / "q")["kept"] == "fp32"


def test_output_folder_is_self_contained(exported, tmp_path):
    cfg, folder = exported
    source = shutil.copytree(folder, tmp_path / "export")
    quantize.run(cfg, source, cfg.paths.prepared, tmp_path / "q")
    before = Predictor(tmp_path / "q", threads=1).predict_proba(TEXTS)
    moved = shutil.copytree(tmp_path / "q", tmp_path / "elsewhere" / "model")
    shutil.rmtree(source)
    shutil.rmtree(tmp_path / "q")
    np.testing.assert_array_equal(Predictor(moved, threads=1).predict_proba(TEXTS), before)


def test_fp16_halves_the_weights_and_agrees(exported, tmp_path):
    cfg, folder = exported
    result = quantize.run(with_quantize(cfg, method="fp16", max_accuracy_drop=1.0), folder,
                          cfg.paths.prepared, tmp_path / "q")
    model = onnx.load(str(tmp_path / "q" / "model.onnx"))
    types = {init.data_type for init in model.graph.initializer if init.dims}
    assert onnx.TensorProto.FLOAT16 in types and onnx.TensorProto.FLOAT not in types
    assert result.metrics["int8_bytes"] < 0.7 * result.metrics["fp32_bytes"]  # graph overhead aside
    fp32 = Predictor(folder, threads=1).logits(TEXTS)
    half = Predictor(tmp_path / "q", threads=1).logits(TEXTS)
    assert half.dtype == np.float32 and np.abs(fp32 - half).max() < 1e-2
    rec = record(tmp_path / "q")
    assert rec["kept"] == "fp16" and rec["why"].startswith("fp16 lost")
    assert result.metrics["kept_int8"] == 1.0  # the quantized (here: half) model was kept


def test_torch_dynamic_ships_an_int8_pytorch_student(exported, tmp_path):
    cfg, folder = exported
    student = folder.parent / "student"  # what the fixture exported
    result = quantize.run(with_quantize(cfg, method="torch_dynamic", max_accuracy_drop=1.0),
                          folder, cfg.paths.prepared, tmp_path / "q", student)
    out = tmp_path / "q"
    assert not (out / "model.onnx").exists() and (out / "torch" / "int8.json").is_file()
    assert not list((out / "torch").glob("tokenizer*"))  # the folder's own copy serves
    rec = record(out)
    assert rec["kept"] == "int8" and rec["torch"]["layers"] == ["classifier"]
    assert rec["student"] == str(student)
    torch_bytes = sum(p.stat().st_size for p in (out / "torch").rglob("*") if p.is_file())
    assert result.metrics["size_bytes"] == result.metrics["int8_bytes"] == torch_bytes
    predictor = Predictor(out, threads=1)
    assert predictor.model_path == out / "torch"
    texts = TEXTS * 5 + [f"word {i} and more" for i in range(20)]
    fp32 = Predictor(folder, threads=1).logits(texts)
    torch.set_num_threads(2)
    try:
        int8 = predictor.logits(texts)
        assert torch.get_num_threads() == 2  # the call's one thread was scoped to it
    finally:
        torch.set_num_threads(1)
    assert not np.array_equal(fp32, int8)
    assert (fp32.argmax(1) == int8.argmax(1)).mean() >= 0.9 and np.abs(fp32 - int8).max() < 0.1
    assert predictor.predict(["a lovely film"])[0].label in predictor.labels


def test_torch_dynamic_gate_puts_the_onnx_model_back(exported, tmp_path, monkeypatch):
    cfg, folder = exported
    accuracies = iter([0.9, 0.5])  # fp32, then int8
    monkeypatch.setattr(quantize, "accuracy", lambda predictor, split: next(accuracies))
    result = quantize.run(with_quantize(cfg, method="torch_dynamic"), folder,
                          cfg.paths.prepared, tmp_path / "q", folder.parent / "student")
    out = tmp_path / "q"
    assert (out / "model.onnx").read_bytes() == (folder / "model.onnx").read_bytes()
    assert not (out / "torch").exists()
    assert record(out)["kept"] == "fp32" and result.metrics["kept_int8"] == 0.0


def test_torch_dynamic_needs_the_pytorch_student(exported, tmp_path):
    cfg, folder = exported
    with pytest.raises(KdpipeError, match="torch_dynamic quantizes the PyTorch student"):
        quantize.run(with_quantize(cfg, method="torch_dynamic"), folder, cfg.paths.prepared,
                     tmp_path / "q")
    with pytest.raises(KdpipeError, match="nowhere: not found; .*kdpipe prune"):
        quantize.run(with_quantize(cfg, method="torch_dynamic"), folder, cfg.paths.prepared,
                     tmp_path / "q", tmp_path / "nowhere")
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("calibration", ["entropy", "percentile"])
def test_histogram_calibration_on_batches_of_different_lengths(exported, tmp_path, calibration):
    # ORT's histogram calibrators stack every batch's activations into one array, so every
    # calibration batch must have the same shape; train batches differ in longest text.
    cfg, folder = exported
    train = quantize.read_split(cfg.paths.prepared / "train.parquet").texts
    predictor = Predictor(folder, threads=1, batch_size=ort_quantize.CALIBRATION_BATCH)
    widths = {feed["input_ids"].shape[1] for feed in predictor.encode(list(train)[:96])}
    assert len(widths) > 1  # the fixture really has batches of different lengths
    cfg = with_quantize(cfg, method="ort_static", calibration=calibration,
                        calibration_batches=3, max_accuracy_drop=1.0)
    quantize.run(cfg, folder, cfg.paths.prepared, tmp_path / "q")
    assert "QuantizeLinear" in ops_of(tmp_path / "q")
    rec = record(tmp_path / "q")
    assert rec["calibration"] == calibration and rec["calibration_batches"] == 3
    assert rec["calibration_width"] == max(widths)
    fp32 = Predictor(folder, threads=1).logits(TEXTS)
    int8 = Predictor(tmp_path / "q", threads=1).logits(TEXTS)
    assert (fp32.argmax(1) == int8.argmax(1)).mean() >= 0.75
