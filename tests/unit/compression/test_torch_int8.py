"""PyTorch dynamic int8 (quantize.method torch_dynamic): every student's Linear and LSTM layers
become int8, the saved folder holds only safetensors, reloads the very int8 values it saved
and stays close to the float student; a damaged file is a one-line error naming it."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from kdpipe.compression import pruning, torch_int8
from kdpipe.compression.onnx_export import LogitsOnly
from kdpipe.config import StudentConfig
from kdpipe.errors import KdpipeError
from kdpipe.models.students import build_student, save_student

SMALL = {
    "textcnn": {"embedding_dim": 16, "textcnn": {"filter_sizes": [2, 3], "num_filters": 8}},
    "bilstm": {"embedding_dim": 16, "bilstm": {"hidden_size": 8, "layers": 2}},
    "transformer": {"transformer": {"teacher_layers": [0, 1]}},
    "fast": {"embedding_dim": 16, "fast": {"buckets": 32, "hidden_size": 8}},
}
# What quantize_dynamic turns int8 in each student (Embedding and Conv1d stay float).
# transformer: None, every Linear of the BERT layers, pooler and head.
INT8_LAYERS = {"textcnn": ["classifier"], "bilstm": ["classifier", "lstm"],
               "transformer": None, "fast": ["classifier", "hidden"]}
TRAIN = ["good movie", "the film was awful", "bad"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def build(arch, tiny_bert, tokenizer):
    torch.manual_seed(0)
    cfg = StudentConfig.model_validate({"arch": arch, **SMALL[arch]})
    return build_student(cfg, 2, tiny_bert, tokenizer.pad_token_id, len(tokenizer))


def pruned_folder(arch, tiny_bert, tokenizer, folder):
    """A vocabulary- and structure-pruned student saved as the prune step saves one (dropped
    tokens at rank 4: the default ``prune.unseen_tokens: own``)."""
    model = pruning.PrunedStudent(build(arch, tiny_bert, tokenizer)).eval()
    kept = pruning.kept_token_ids(tokenizer(TRAIN)["input_ids"],
                                  [*tokenizer.all_special_ids, tokenizer.unk_token_id])
    pruning.prune_vocabulary(model, kept, tokenizer.unk_token_id, own_rank=4)
    pruning.prune_structure(model, 0.5)
    pruning.save_pruned(model, folder)
    return folder


def logits(model, tokenizer, texts):
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        return LogitsOnly(model)(batch["input_ids"], batch["attention_mask"])


@pytest.mark.parametrize("arch", ["textcnn", "bilstm", "transformer", "fast"])
def test_int8_student_reloads_exactly_and_stays_close(arch, tiny_bert, tiny_tokenizer,
                                                      tmp_path):
    source = pruned_folder(arch, tiny_bert, tiny_tokenizer, tmp_path / "pruned")
    record = torch_int8.save(source, tmp_path / "int8")

    expected = INT8_LAYERS[arch]
    if expected is not None:
        assert record["layers"] == expected
    else:
        assert len(record["layers"]) == 2 * 6 + 2 and "model.classifier" in record["layers"]
    assert json.loads((tmp_path / "int8" / torch_int8.INT8_RECORD).read_text()) == record
    saved = load_file(str(torch_int8.weights_file(tmp_path / "int8")))
    int8_keys = [k for k in saved if k.endswith(".int8")]
    assert int8_keys and all(saved[k].dtype == torch.int8 for k in int8_keys)
    assert record["int8_values"] == sum(saved[k].numel() for k in int8_keys)

    model = torch_int8.load(tmp_path / "int8")
    assert isinstance(model, pruning.PrunedStudent) and model.vocab_remap is not None
    dynamic = (torch.ao.nn.quantized.dynamic.Linear, torch.ao.nn.quantized.dynamic.LSTM)
    quantized = {name for name, m in model.student.named_modules() if isinstance(m, dynamic)}
    assert quantized == set(record["layers"])
    # The very int8 values and scales that were saved, not a re-rounding of them.
    again = torch_int8.int8_tensors(model.student)
    assert again.keys() == saved.keys()
    assert all(torch.equal(again[k], saved[k]) for k in saved)

    texts = [*TRAIN, "the movie was good", "awful bad film"]
    fp32 = logits(pruning.load_pruned(source), tiny_tokenizer, texts)
    int8 = logits(model, tiny_tokenizer, texts)
    assert not torch.equal(int8, fp32)  # it really runs int8 weights
    assert (int8 - fp32).abs().max() < 0.05


def test_lstm_and_linear_weights_take_a_quarter_of_their_float_bytes(tiny_bert, tiny_tokenizer,
                                                                     tmp_path):
    source = pruned_folder("bilstm", tiny_bert, tiny_tokenizer, tmp_path / "pruned")
    torch_int8.save(source, tmp_path / "int8")
    fp32 = load_file(str(torch_int8.weights_file(source)))
    int8 = load_file(str(torch_int8.weights_file(tmp_path / "int8")))
    weights = [k for k in fp32 if k.startswith(("lstm.weight", "classifier.weight"))]
    assert len(weights) == 2 * 2 * 2 + 1  # ih and hh, 2 layers, 2 directions; classifier
    assert sum(int8[k + ".int8"].nbytes for k in weights) * 4 == sum(fp32[k].nbytes
                                                                     for k in weights)
    assert not any(k in int8 for k in weights)  # no float copy left beside them
    assert torch.equal(int8["embedding.weight"], fp32["embedding.weight"])  # stays float


def test_unpruned_student_folder_works_too(tiny_bert, tiny_tokenizer, tmp_path):
    model = build("textcnn", tiny_bert, tiny_tokenizer)
    save_student(model, tmp_path / "student")
    torch_int8.save(tmp_path / "student", tmp_path / "int8")
    reloaded = torch_int8.load(tmp_path / "int8")
    assert not isinstance(reloaded, pruning.PrunedStudent)
    fp32 = logits(model.eval(), tiny_tokenizer, TRAIN)
    assert (logits(reloaded, tiny_tokenizer, TRAIN) - fp32).abs().max() < 0.05


@pytest.mark.parametrize("damage, message", [
    ("drop_int8", "does not fit the student|no int8 weight"),
    ("extra", "unexpected"),
    ("orphan_scale", "unexpected .*nowhere.weight.scale"),
    ("garbage", "cannot read"),
])
def test_damaged_weights_are_one_line_errors(tiny_bert, tiny_tokenizer, tmp_path, damage,
                                             message):
    source = pruned_folder("bilstm", tiny_bert, tiny_tokenizer, tmp_path / "pruned")
    torch_int8.save(source, tmp_path / "int8")
    path = torch_int8.weights_file(tmp_path / "int8")
    tensors = load_file(str(path))
    if damage == "drop_int8":
        tensors.pop("lstm.weight_ih_l0.int8")
        save_file(tensors, str(path))
    elif damage == "extra":
        tensors["surprise"] = torch.zeros(2)
        save_file(tensors, str(path))
    elif damage == "orphan_scale":
        tensors["nowhere.weight.scale"] = torch.tensor(0.1, dtype=torch.float64)
        save_file(tensors, str(path))
    else:
        path.write_bytes(b"not safetensors")
    with pytest.raises(KdpipeError, match=message) as caught:
        torch_int8.load(tmp_path / "int8")
    assert str(path) in str(caught.value) or str(tmp_path / "int8") in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_float_folder_is_not_taken_for_int8(tiny_bert, tiny_tokenizer, tmp_path):
    source = pruned_folder("textcnn", tiny_bert, tiny_tokenizer, tmp_path / "pruned")
    with pytest.raises(KdpipeError, match="int8.json: not found"):
        torch_int8.load(source)
