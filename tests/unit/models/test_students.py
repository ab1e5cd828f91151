"""Students: shapes, padding invariance, they learn, save/load exactly without the teacher,
start from the teacher's weights, and damaged folders give errors naming the file."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import separable_rows
from safetensors.torch import load_file

from kdpipe.config import StudentConfig
from kdpipe.errors import KdpipeError
from kdpipe.models import teacher_vectors
from kdpipe.models.students import (
    RECORD_FILE,
    WEIGHTS_FILE,
    build_student,
    count_parameters,
    load_student,
    save_student,
)
from kdpipe.models.teacher_vectors import pca_project, teacher_token_vectors

ARCHS = ["textcnn", "bilstm", "transformer", "fast"]
SMALL = {  # widest filter 4 > the 3 tokens of "[CLS] good [SEP]": the short-text path runs
    "textcnn": {"embedding_dim": 16, "textcnn": {"filter_sizes": [2, 4], "num_filters": 8}},
    "bilstm": {"embedding_dim": 16, "bilstm": {"hidden_size": 12}},
    "transformer": {},
    "fast": {"embedding_dim": 16, "fast": {"buckets": 64, "hidden_size": 8}},
}
TEXTS = ["good", "the movie was really awful", "it is fine but the food was dull so sad"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer):
    return tiny_tokenizer


def small_config(arch: str, **overrides: object) -> StudentConfig:
    return StudentConfig.model_validate({"arch": arch, **SMALL[arch], **overrides})


def make(arch: str, teacher: Path, tokenizer, seed: int = 0, **overrides: object):
    torch.manual_seed(seed)
    return build_student(small_config(arch, **overrides), num_labels=2, teacher_dir=teacher,
                         pad_id=tokenizer.pad_token_id, vocab_size=len(tokenizer))


def encode(tokenizer, texts: list[str], pad_to: int | None = None) -> tuple[torch.Tensor, ...]:
    padding = "max_length" if pad_to else True
    batch = tokenizer(texts, padding=padding, max_length=pad_to, return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]


def teacher_word_matrix(teacher: Path) -> torch.Tensor:
    return load_file(teacher / "model.safetensors")["bert.embeddings.word_embeddings.weight"]


@pytest.mark.parametrize("arch", ARCHS)
def test_output_shapes(arch, tiny_bert, tokenizer):
    model = make(arch, tiny_bert, tokenizer)
    ids, mask = encode(tokenizer, TEXTS)
    out = model(ids, mask)
    assert out.logits.shape == (3, 2)
    assert out.features.shape == (3, model.feature_dim)
    if arch == "transformer":
        assert model.hidden_size == 32
        assert len(out.hidden_states) == 2  # embeddings + the one layer copied from 2
        assert all(h.shape == (3, ids.shape[1], 32) for h in out.hidden_states)
    else:
        assert out.hidden_states is None


@pytest.mark.parametrize("arch", ARCHS)
def test_padding_does_not_change_output(arch, tiny_bert, tokenizer):
    model = make(arch, tiny_bert, tokenizer).eval()
    with torch.no_grad():
        padded = model(*encode(tokenizer, TEXTS, pad_to=24)).logits
        for row, text in enumerate(TEXTS):
            alone = model(*encode(tokenizer, [text])).logits[0]
            torch.testing.assert_close(padded[row], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_a_few_steps_lower_the_loss(arch, tiny_bert, tokenizer):
    rows = separable_rows(32)
    ids, mask = encode(tokenizer, [text for text, _ in rows])
    labels = torch.tensor([int(label == "pos") for _, label in rows])
    model = make(arch, tiny_bert, tokenizer)
    # A high rate: the tiny teacher is random, so even the transformer starts from scratch.
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)

    def eval_loss() -> float:
        model.eval()
        with torch.no_grad():
            return F.cross_entropy(model(ids, mask).logits, labels).item()

    before = eval_loss()
    model.train()
    # The fast student averages a text's ~20 token and bigram rows, so the one word that
    # decides the label moves the mean slowly: it needs more steps at this rate.
    for _ in range(24 if arch == "fast" else 8):
        optimizer.zero_grad()
        F.cross_entropy(model(ids, mask).logits, labels).backward()
        optimizer.step()
    assert eval_loss() < 0.8 * before


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_is_exact_without_the_teacher(arch, tiny_bert, tokenizer, tmp_path):
    teacher = shutil.copytree(tiny_bert, tmp_path / "teacher")
    model = make(arch, teacher, tokenizer).eval()
    save_student(model, tmp_path / "student")
    shutil.rmtree(teacher)

    loaded = load_student(tmp_path / "student")
    assert sorted(p.name for p in (tmp_path / "student").iterdir()) == [WEIGHTS_FILE, RECORD_FILE]
    assert not loaded.training
    assert count_parameters(loaded) == count_parameters(model)
    ids, mask = encode(tokenizer, TEXTS)
    with torch.no_grad():
        want, got = model(ids, mask), loaded(ids, mask)
    assert torch.equal(want.logits, got.logits)
    assert torch.equal(want.features, got.features)


def test_pca_project_matches_hand_computed_components():
    # Centred already; variance 4 along x, 1 along y: x is the first component.
    points = torch.tensor([[2.0, 0.0], [-2.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    torch.testing.assert_close(pca_project(points, 1), torch.tensor([[2.0], [-2.0], [0.0], [0.0]]))
    torch.testing.assert_close(pca_project(points, 2), points)
    # Off-centre points on the line y = x: mean (2, 2) removed, direction (1, 1) / sqrt 2.
    line = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    root2 = math.sqrt(2)
    torch.testing.assert_close(pca_project(line, 1), torch.tensor([[-root2], [0.0], [root2]]))


def test_textcnn_embeddings_are_the_teachers_projected_by_pca(tiny_bert, tokenizer):
    model = make("textcnn", tiny_bert, tokenizer, init_layer=0)
    expected = pca_project(teacher_word_matrix(tiny_bert), 16)
    expected /= expected.std()
    expected[tokenizer.pad_token_id] = 0
    torch.testing.assert_close(model.embedding.weight.detach(), expected)


def test_wider_embeddings_keep_the_teachers_and_start_the_rest_at_zero(tiny_bert, tokenizer):
    model = make("bilstm", tiny_bert, tokenizer, embedding_dim=40, init_layer=0)  # hidden 32
    teacher = teacher_word_matrix(tiny_bert)
    weight = model.embedding.weight.detach()
    torch.testing.assert_close(weight[1:, :32], teacher[1:] / teacher.std())
    assert not weight[:, 32:].any() and not weight[tokenizer.pad_token_id].any()


def alone_hidden_state(teacher: Path, tokenizer, token: int, layer: int) -> torch.Tensor:
    """The teacher's hidden state after ``layer`` at ``token`` in ``[CLS] token [SEP]``."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(teacher).eval()
    ids = torch.tensor([[tokenizer.cls_token_id, token, tokenizer.sep_token_id]])
    with torch.no_grad():
        states = model(input_ids=ids, output_hidden_states=True).hidden_states
    return states[layer][0, 1]


@pytest.mark.parametrize("layer", [1, 2])
def test_layer_vectors_are_each_tokens_hidden_state_run_alone(layer, tiny_bert, tokenizer,
                                                              monkeypatch):
    monkeypatch.setattr(teacher_vectors, "TOKEN_BATCH", 7)  # several batches, the last one short
    vectors = teacher_token_vectors(tiny_bert, layer)
    assert vectors.shape == teacher_word_matrix(tiny_bert).shape
    for token in [0, tokenizer.convert_tokens_to_ids("good"), len(tokenizer) - 1]:
        torch.testing.assert_close(vectors[token],
                                   alone_hidden_state(tiny_bert, tokenizer, token, layer),
                                   atol=1e-5, rtol=1e-5)


def test_init_layer_picks_the_layer_whose_states_start_the_embeddings(tiny_bert, tokenizer):
    model = make("textcnn", tiny_bert, tokenizer, init_layer=1)
    expected = pca_project(teacher_token_vectors(tiny_bert, 1), 16)
    expected /= expected.std()
    expected[tokenizer.pad_token_id] = 0
    torch.testing.assert_close(model.embedding.weight.detach(), expected)
    default = make("textcnn", tiny_bert, tokenizer).embedding.weight.detach()  # init_layer 0
    torch.testing.assert_close(default, make("textcnn", tiny_bert, tokenizer, init_layer=0)
                               .embedding.weight.detach())
    assert not torch.allclose(expected, default, atol=0.1)


def test_init_layer_past_the_teachers_depth_is_an_error(tiny_bert, tokenizer):
    with pytest.raises(KdpipeError, match=r"student.init_layer 3: .* has 2 layers"):
        make("bilstm", tiny_bert, tokenizer, init_layer=3)


def test_random_init_is_seeded_and_not_the_teachers(tiny_bert, tokenizer):
    first = make("textcnn", tiny_bert, tokenizer, seed=3, init_from_teacher=False)
    again = make("textcnn", tiny_bert, tokenizer, seed=3, init_from_teacher=False)
    assert all(torch.equal(a, b) for a, b in
               zip(first.state_dict().values(), again.state_dict().values(), strict=True))
    from_teacher = make("textcnn", tiny_bert, tokenizer, seed=3)
    assert not torch.allclose(first.embedding.weight, from_teacher.embedding.weight, atol=0.1)


def test_vocabulary_larger_than_the_teachers_is_an_error(tiny_bert, tokenizer):
    with pytest.raises(KdpipeError, match="does not fit the teacher's embeddings"):
        build_student(small_config("bilstm"), num_labels=2, teacher_dir=tiny_bert,
                      pad_id=0, vocab_size=len(tokenizer) + 1)


@pytest.mark.parametrize("layers", [None, [1]])
def test_transformer_layers_are_the_chosen_teacher_layers(layers, tiny_bert, tokenizer):
    model = make("transformer", tiny_bert, tokenizer, transformer={"teacher_layers": layers})
    chosen = 0 if layers is None else 1  # default: every other layer of 2 = [0]
    assert model.student_record["teacher_layers"] == [chosen]
    teacher = load_file(tiny_bert / "model.safetensors")
    prefix = f"bert.encoder.layer.{chosen}."
    layer = model.model.bert.encoder.layer[0].state_dict()
    assert layer.keys() == {k.removeprefix(prefix) for k in teacher if k.startswith(prefix)}
    assert all(torch.equal(value, teacher[prefix + name]) for name, value in layer.items())
    assert torch.equal(model.model.bert.embeddings.word_embeddings.weight,
                       teacher["bert.embeddings.word_embeddings.weight"])
    assert torch.equal(model.model.classifier.weight, teacher["classifier.weight"])


def test_teacher_layer_out_of_range_is_an_error(tiny_bert, tokenizer):
    with pytest.raises(KdpipeError, match=r"teacher_layers \[2\].*0\.\.1"):
        make("transformer", tiny_bert, tokenizer, transformer={"teacher_layers": [2]})


@pytest.mark.parametrize("damage", ["no record", "bad json", "wrong shape", "no weights",
                                    "bad weights"])
def test_damaged_student_folder_names_the_file(damage, tiny_bert, tokenizer, tmp_path):
    folder = tmp_path / "student"
    save_student(make("textcnn", tiny_bert, tokenizer), folder)
    record, weights = folder / RECORD_FILE, folder / WEIGHTS_FILE
    if damage == "no record":
        record.unlink()
    elif damage == "bad json":
        record.write_text("{not json", encoding="utf-8")
    elif damage == "wrong shape":  # the record no longer describes the saved weights
        saved = json.loads(record.read_text(encoding="utf-8"))
        saved["student"]["textcnn"]["num_filters"] = 9
        record.write_text(json.dumps(saved), encoding="utf-8")
    elif damage == "no weights":
        weights.unlink()
    else:
        weights.write_bytes(b"\x00" * 7)
    named = record if damage in ("no record", "bad json") else weights
    with pytest.raises(KdpipeError, match=str(named.name)) as caught:
        load_student(folder)
    assert str(named) in str(caught.value)


@pytest.mark.parametrize("widths,filters", [([3, 4, 5], [6, 6, 6]), ([1, 3], [4, 2]), ([2], [5])])
def test_textcnn_windows_as_matmul_match_its_convolutions(widths, filters):
    # The exported graph's form (one MatMul over stacked windows) against the trained one,
    # on texts shorter than the widest filter too, and with unequal filter counts per width
    # (as structured pruning leaves them).
    from kdpipe.models.textcnn import TextCNN

    torch.manual_seed(0)
    model = TextCNN(50, 8, 0, widths, max(filters), 3, 0.0).eval()
    for i, count in enumerate(filters):
        conv = model.convs[i]
        model.convs[i] = torch.nn.Conv1d(8, count, conv.kernel_size[0])
    model.classifier = torch.nn.Linear(sum(filters), 3)
    ids = torch.randint(1, 50, (6, 9))
    mask = torch.ones_like(ids)
    for row, length in enumerate([9, 1, 2, 3, 5, 7]):
        mask[row, length:] = 0
        ids[row, length:] = 0
    by_conv = model(ids, mask)
    model.windows_as_matmul = True
    by_matmul = model(ids, mask)
    torch.testing.assert_close(by_matmul.features, by_conv.features, atol=1e-5, rtol=0)
    torch.testing.assert_close(by_matmul.logits, by_conv.logits, atol=1e-5, rtol=0)
    wider = model(F.pad(ids, (0, 4)), F.pad(mask, (0, 4)))  # more padding changes nothing
    torch.testing.assert_close(wider.logits, by_matmul.logits, atol=1e-5, rtol=0)


def test_the_settings_name_exactly_the_registered_students():
    from typing import get_args

    from kdpipe.models.base import Student
    from kdpipe.models.students import STUDENTS

    names = set(get_args(StudentConfig.model_fields["arch"].annotation))
    assert names == set(STUDENTS)
    assert all(issubclass(cls, Student) and cls.arch == name for name, cls in STUDENTS.items())
