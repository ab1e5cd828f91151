"""Pruning: the vocabulary keeps exactly the data's ids and specials and changes no output of a
text made of them (an unseen token reads as [UNK], its nearest kept word or its own row at a
lower rank); structured pruning really shrinks tensors
and removes the weakest units (dead units removed leave the outputs unchanged); magnitude
pruning reaches its sparsity permanently; pruned folders reload exactly; the step end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import separable_rows, write_csv

from kdpipe.compression import pruning
from kdpipe.config import StudentConfig, validate
from kdpipe.data.prepare import read_split
from kdpipe.errors import KdpipeError
from kdpipe.models.students import build_student, count_parameters, load_student, save_student
from kdpipe.steps import ingest, prune, soft_labels

ARCHS = ["textcnn", "bilstm", "transformer", "fast"]
SMALL = {
    "textcnn": {"embedding_dim": 16, "textcnn": {"filter_sizes": [2, 3], "num_filters": 8}},
    "bilstm": {"embedding_dim": 16, "bilstm": {"hidden_size": 8, "layers": 2}},
    "transformer": {"transformer": {"teacher_layers": [0, 1]}},  # 2 layers, 2 heads, FFN 64
    "fast": {"embedding_dim": 16, "fast": {"buckets": 32, "hidden_size": 8}},
}
TRAIN = ["good movie", "the film was awful", "bad"]
KEPT_ONLY = ["good film", "the movie was bad", "awful good the"]  # only words of TRAIN


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer):
    return tiny_tokenizer


def make(arch: str, teacher: Path, tokenizer) -> pruning.PrunedStudent:
    torch.manual_seed(0)
    cfg = StudentConfig.model_validate({"arch": arch, **SMALL[arch]})
    student = build_student(cfg, 2, teacher, tokenizer.pad_token_id, len(tokenizer))
    return pruning.PrunedStudent(student).eval()


def words_only(model: pruning.PrunedStudent) -> None:
    """Zero the fast student's bigram rows. Its bigrams hash the tokenizer's own ids, so a
    cut word keeps its bigrams' rows ("good nasty" is not "good [UNK]"): with them zero,
    the checks that a cut word reads as another word's row apply to it too."""
    if model.arch == "fast":
        with torch.no_grad():
            model.student.bigrams.weight.zero_()


def run_on(model, tokenizer, texts: list[str]):
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        return model(batch["input_ids"], batch["attention_mask"])


def run_ids(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)).logits


def kept_for(tokenizer, texts: list[str]) -> list[int]:
    return pruning.kept_token_ids(tokenizer(texts)["input_ids"],
                                  [*tokenizer.all_special_ids, tokenizer.unk_token_id])


# ---------------------------------------------------------------- vocabulary


def test_kept_ids_are_the_data_tokens_and_the_specials(tokenizer):
    words = tokenizer.convert_tokens_to_ids(["good", "movie", "bad", "film"])
    # conftest's vocabulary starts [PAD] [UNK] [CLS] [SEP] [MASK]: ids 0..4
    assert kept_for(tokenizer, ["good movie", "bad film"]) == [0, 1, 2, 3, 4, *sorted(words)]


@pytest.mark.parametrize("arch", ARCHS)
def test_vocabulary_pruning_keeps_outputs_and_maps_unseen_ids_to_unk(arch, tiny_bert,
                                                                    tokenizer):
    model = make(arch, tiny_bert, tokenizer)
    original = make(arch, tiny_bert, tokenizer)
    for m in (model, original):
        words_only(m)
    before = pruning.parameter_counts(model)
    kept = kept_for(tokenizer, TRAIN)
    pruning.prune_vocabulary(model, kept, tokenizer.unk_token_id)

    embedding = model.student.get_input_embeddings()
    assert embedding.num_embeddings == len(kept)
    assert model.vocab_remap.shape == (len(tokenizer),)
    assert model.vocab_remap[kept].tolist() == list(range(len(kept)))
    assert embedding.padding_idx == model.vocab_remap[tokenizer.pad_token_id]
    after = pruning.parameter_counts(model)
    width = embedding.embedding_dim
    assert before["total"] - after["total"] == (len(tokenizer) - len(kept)) * width

    # Texts of kept tokens (padded in a batch, too): the same outputs.
    torch.testing.assert_close(run_on(model, tokenizer, KEPT_ONLY).logits,
                               run_on(original, tokenizer, KEPT_ONLY).logits,
                               atol=1e-6, rtol=0)
    # An unseen token ("nasty") reads exactly as [UNK] did before.
    ids = tokenizer("good nasty movie")["input_ids"]
    as_unk = [i if i in kept else tokenizer.unk_token_id for i in ids]
    assert as_unk != ids
    torch.testing.assert_close(run_ids(model, ids), run_ids(original, as_unk),
                               atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_unseen_ids_read_their_nearest_kept_word(arch, tiny_bert, tokenizer):
    model = make(arch, tiny_bert, tokenizer)
    original = make(arch, tiny_bert, tokenizer)
    for m in (model, original):
        words_only(m)
    nasty, bad, awful = tokenizer.convert_tokens_to_ids(["nasty", "bad", "awful"])
    for m in (model, original):  # "nasty" points the way "bad" does, "awful" the other way
        weight = m.student.get_input_embeddings().weight
        with torch.no_grad():
            weight[nasty] = 3.0 * weight[bad]
            weight[awful] = -weight[bad]
    kept = kept_for(tokenizer, TRAIN)
    words = [i for i in kept if i not in tokenizer.all_special_ids]
    pruning.prune_vocabulary(model, kept, tokenizer.unk_token_id, nearest_among=words)
    assert model.vocab_remap[nasty] == model.vocab_remap[bad]
    ids = tokenizer("good nasty movie")["input_ids"]
    as_bad = [bad if i == nasty else i for i in ids]
    torch.testing.assert_close(run_ids(model, ids), run_ids(original, as_bad),
                               atol=1e-6, rtol=0)
    # Specials are never a target, and kept ids still read themselves.
    new_special = {int(model.vocab_remap[i]) for i in tokenizer.all_special_ids}
    dropped = [i for i in range(len(tokenizer)) if i not in kept]
    assert not new_special & {int(model.vocab_remap[i]) for i in dropped}
    assert model.vocab_remap[kept].tolist() == list(range(len(kept)))


@pytest.mark.parametrize("arch", ARCHS)
def test_unseen_ids_read_their_own_row_at_the_given_rank(arch, tiny_bert, tokenizer, tmp_path):
    original = make(arch, tiny_bert, tokenizer)
    weight = original.student.get_input_embeddings().weight.detach()
    width = weight.shape[1]
    kept = kept_for(tokenizer, TRAIN)
    dropped = [i for i in range(len(tokenizer)) if i not in kept]
    ids = tokenizer("good nasty movie")["input_ids"]
    assert set(ids) - set(kept)

    # At full rank every dropped token reads its own row as it was: no output changes.
    full = make(arch, tiny_bert, tokenizer)
    pruning.prune_vocabulary(full, kept, tokenizer.unk_token_id, own_rank=width)
    torch.testing.assert_close(run_ids(full, ids), run_ids(original, ids), atol=1e-5, rtol=0)

    # At rank 3: the row's projection on the top 3 principal components of the dropped rows.
    model = make(arch, tiny_bert, tokenizer)
    before = pruning.parameter_counts(model)["total"]
    pruning.prune_vocabulary(model, kept, tokenizer.unk_token_id, own_rank=3)
    rows = weight[dropped].double()
    center = rows.mean(0)
    _, _, vh = torch.linalg.svd(rows - center, full_matrices=False)
    expected = ((rows - center) @ vh[:3].T @ vh[:3] + center).float()
    embedding = model.student.get_input_embeddings()
    with torch.no_grad():
        got = embedding(model.vocab_remap[torch.tensor(dropped + kept)])
    torch.testing.assert_close(got[:len(dropped)], expected, atol=1e-5, rtol=0)
    assert torch.equal(got[len(dropped):], weight[kept])
    assert not torch.allclose(got[:len(dropped)], weight[dropped], atol=1e-3)
    assert pruning.parameter_counts(model)["total"] == (
        before - len(dropped) * width + len(dropped) * 3 + 3 * width + width)

    # The folder records the shape and reloads to the same outputs.
    pruning.save_pruned(model, tmp_path / "pruned")
    vocabulary = json.loads((tmp_path / "pruned" / pruning.PRUNING_FILE).read_text())["vocabulary"]
    assert vocabulary == {"original_size": len(tokenizer), "kept": len(kept),
                          "unseen_rows": len(dropped), "rank": 3}
    reloaded = pruning.load_pruned(tmp_path / "pruned")
    assert torch.equal(run_ids(reloaded, ids), run_ids(model, ids))


def test_own_rows_and_nearest_words_exclude_each_other(tiny_bert, tokenizer):
    model = make("textcnn", tiny_bert, tokenizer)
    kept = kept_for(tokenizer, TRAIN)
    with pytest.raises(ValueError, match="exclude each other"):
        pruning.prune_vocabulary(model, kept, tokenizer.unk_token_id, nearest_among=kept[5:],
                                 own_rank=4)


def test_nearest_rows_by_cosine():
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [10.0, 1.0], [-1.0, 0.2], [0.1, 5.0]])
    best = pruning.nearest_rows(weight, torch.tensor([2, 3, 4]), torch.tensor([0, 1]), chunk=2)
    assert best.tolist() == [0, 1, 1]  # [-1, 0.2] has cosine -0.98 to row 0, +0.20 to row 1


def test_vocabulary_needs_unk_among_the_kept_ids(tiny_bert, tokenizer):
    model = make("textcnn", tiny_bert, tokenizer)
    with pytest.raises(ValueError, match="unknown token"):
        pruning.prune_vocabulary(model, [0, 2, 3], tokenizer.unk_token_id)


# ---------------------------------------------------------------- structured


def _kill_textcnn(student):
    """Odd filters of every width: weak kernels that the classifier ignores."""
    n = student.convs[0].out_channels
    for i, conv in enumerate(student.convs):
        conv.weight[1::2] *= 1e-3
        student.classifier.weight[:, i * n + 1: (i + 1) * n: 2] = 0


def _kill_bilstm(student):
    """Odd units of every layer and direction: weak inputs, outputs read by nobody."""
    lstm, hidden = student.lstm, student.lstm.hidden_size
    dead = torch.arange(1, hidden, 2)
    for layer in range(lstm.num_layers):
        for d in ("", "_reverse"):
            rows = (torch.arange(4).unsqueeze(1) * hidden + dead).flatten()
            getattr(lstm, f"weight_ih_l{layer}{d}")[rows] *= 1e-3
            getattr(lstm, f"weight_hh_l{layer}{d}")[rows] *= 1e-3
            getattr(lstm, f"weight_hh_l{layer}{d}")[:, dead] = 0
            if layer + 1 < lstm.num_layers:
                for reader in ("", "_reverse"):
                    w = getattr(lstm, f"weight_ih_l{layer + 1}{reader}")
                    w[:, dead] = 0
                    w[:, hidden + dead] = 0
    student.classifier.weight[:, dead] = 0
    student.classifier.weight[:, hidden + dead] = 0


def _kill_transformer(student):
    """Head 1 of each layer (weak Q/K/V, zero output columns) and odd FFN neurons."""
    for layer in student.model.bert.encoder.layer:
        attention = layer.attention.self
        head = slice(attention.attention_head_size, 2 * attention.attention_head_size)
        for name in ("query", "key", "value"):
            getattr(attention, name).weight[head] *= 1e-3
        layer.attention.output.dense.weight[:, head] = 0
        layer.intermediate.dense.weight[1::2] *= 1e-3
        layer.output.dense.weight[:, 1::2] = 0


def _shapes_textcnn(student):
    assert [tuple(c.weight.shape) for c in student.convs] == [(4, 16, 2), (4, 16, 3)]
    assert student.classifier.weight.shape == (2, 8)
    assert student.student_record["student"]["textcnn"]["num_filters"] == 4


def _shapes_bilstm(student):
    lstm = student.lstm
    assert lstm.hidden_size == 4
    for d in ("", "_reverse"):
        assert getattr(lstm, f"weight_ih_l0{d}").shape == (16, 16)
        assert getattr(lstm, f"weight_hh_l0{d}").shape == (16, 4)
        assert getattr(lstm, f"weight_ih_l1{d}").shape == (16, 8)
    assert student.classifier.weight.shape == (2, 8)
    assert student.student_record["student"]["bilstm"]["hidden_size"] == 4


def _shapes_transformer(student):
    for layer in student.model.bert.encoder.layer:
        for name in ("query", "key", "value"):
            assert getattr(layer.attention.self, name).weight.shape == (16, 32)
        assert layer.attention.output.dense.weight.shape == (32, 16)
        assert layer.intermediate.dense.weight.shape == (32, 32)
        assert layer.output.dense.weight.shape == (32, 32)
    assert student.student_record["bert_config"]["intermediate_size"] == 32


def _kill_fast(student):
    """Odd hidden units: weak inputs, zero classifier columns."""
    student.hidden.weight[1::2] *= 1e-3
    student.classifier.weight[:, 1::2] = 0


def _shapes_fast(student):
    assert student.hidden.weight.shape == (4, 16)
    assert student.classifier.weight.shape == (2, 4)
    assert student.bigrams.weight.shape == (32, 16)  # the hashed table is not pruned
    assert student.student_record["student"]["fast"]["hidden_size"] == 4


KILL = {"textcnn": _kill_textcnn, "bilstm": _kill_bilstm, "transformer": _kill_transformer,
        "fast": _kill_fast}
SHAPES = {"textcnn": _shapes_textcnn, "bilstm": _shapes_bilstm,
          "transformer": _shapes_transformer, "fast": _shapes_fast}
SIZES_AFTER = {"textcnn": {"filter_sizes": [2, 3], "num_filters": 4},
               "bilstm": {"hidden_size": 4, "layers": 2},
               "transformer": {"heads_per_layer": [1, 1], "intermediate_per_layer": [32, 32]},
               "fast": {"hidden_size": 4, "buckets": 32}}


@pytest.mark.parametrize("arch", ARCHS)
def test_structured_pruning_halves_units_and_removes_the_weakest(arch, tiny_bert, tokenizer,
                                                                 tmp_path):
    model = make(arch, tiny_bert, tokenizer)
    with torch.no_grad():
        KILL[arch](model.student)
    texts = [*KEPT_ONLY, "it is fine but the food was dull so sad"]
    before = run_on(model, tokenizer, texts).logits
    params = count_parameters(model)

    pruning.prune_structure(model, 0.5)
    SHAPES[arch](model.student)
    assert pruning.structured_sizes(model) == SIZES_AFTER[arch]
    assert count_parameters(model) < params
    # Only the dead half went, so the outputs are unchanged (up to summation order).
    after = run_on(model, tokenizer, texts).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)

    pruning.save_pruned(model, tmp_path / "pruned")
    reloaded = pruning.load_pruned(tmp_path / "pruned")
    SHAPES[arch](reloaded.student)
    assert torch.equal(run_on(reloaded, tokenizer, texts).logits, after)


def test_textcnn_features_are_the_kept_filters(tiny_bert, tokenizer):
    model = make("textcnn", tiny_bert, tokenizer)
    norms = [conv.weight.detach().abs().sum(dim=(1, 2)) for conv in model.student.convs]
    kept = torch.cat([i * 8 + n.topk(4).indices.sort().values for i, n in enumerate(norms)])
    features = run_on(model, tokenizer, KEPT_ONLY).features
    pruning.prune_structure(model, 0.5)
    torch.testing.assert_close(run_on(model, tokenizer, KEPT_ONLY).features,
                               features[:, kept], atol=1e-6, rtol=0)


# ---------------------------------------------------------------- unstructured


@pytest.mark.parametrize("arch", ARCHS)
def test_magnitude_pruning_reaches_the_sparsity_permanently(arch, tiny_bert, tokenizer,
                                                            tmp_path):
    model = make(arch, tiny_bert, tokenizer)
    weights = [getattr(m, n) for m, n in pruning.prunable_weights(model)]
    magnitudes = torch.cat([w.detach().abs().flatten() for w in weights])
    embedding = model.student.get_input_embeddings().weight.detach().clone()

    pruning.prune_magnitude(model, 0.6)
    pruned = torch.cat([getattr(m, n).detach().flatten()
                        for m, n in pruning.prunable_weights(model)])
    zero = pruned == 0
    assert int(zero.sum()) == round(0.6 * magnitudes.numel())
    assert pruning.weight_sparsity(model) == pytest.approx(0.6, abs=1 / magnitudes.numel())
    assert magnitudes[zero].max() <= magnitudes[~zero].min()  # the smallest went
    assert torch.equal(model.student.get_input_embeddings().weight, embedding)
    names = [*model.state_dict(), *(n for n, _ in model.named_buffers())]
    assert not [n for n in names if n.endswith(("_orig", "_mask"))]
    assert not any(m._forward_pre_hooks for m in model.modules())

    # The forward uses the zeroed weights (an LSTM's flat weights included): a reload agrees.
    out = run_on(model, tokenizer, KEPT_ONLY).logits
    pruning.save_pruned(model, tmp_path / "pruned")
    assert torch.equal(run_on(pruning.load_pruned(tmp_path / "pruned"), tokenizer,
                              KEPT_ONLY).logits, out)


# ---------------------------------------------------------------- the step


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tiny_bert):
    """Prepared data without two of the vocabulary's words, and soft labels (the untrained
    tiny BERT as teacher: fast, and the step only needs its logits to exist)."""
    root = tmp_path_factory.mktemp("prune")
    rows = [r for r in separable_rows(160) if not {"lovely", "nasty"} & set(r[0].split())]
    raw = {"work_dir": str(root / "work"), "tracking": {"enabled": False},
           "data": {"source": str(write_csv(root / "d.csv", rows))},
           "teacher": {"checkpoint": str(tiny_bert)},
           "soft_labels": {"cache_dir": str(root / "cache")},
           "distill": {"batch_size": 32}}
    cfg = validate(raw, "test")
    ingest.run(cfg, cfg.paths.prepared)
    soft_labels.run(cfg, tiny_bert, cfg.paths.prepared, cfg.paths.soft_labels)
    return raw


def _student_dir(arch, tiny_bert, tokenizer, folder: Path) -> Path:
    save_student(make(arch, tiny_bert, tokenizer).student, folder)
    tokenizer.save_pretrained(folder)
    return folder


def _run(raw, tmp_path, arch, tiny_bert, tokenizer, **settings):
    cfg = validate({**raw, "prune": settings}, "test")
    student_dir = _student_dir(arch, tiny_bert, tokenizer, tmp_path / "student")
    result = prune.run(cfg, student_dir, cfg.paths.prepared, cfg.paths.soft_labels,
                       tmp_path / "pruned")
    report = json.loads((tmp_path / "pruned" / prune.REPORT_FILE).read_text())
    return cfg, student_dir, result, report


def _validation(cfg, tokenizer):
    split = read_split(cfg.paths.prepared / "validation.parquet")
    return split.texts, np.array(split.labels)


@pytest.mark.parametrize("arch", ARCHS)
def test_step_writes_a_folder_that_reloads_to_the_same_pruned_model(pipeline, tmp_path, arch,
                                                                    tiny_bert, tokenizer):
    settings = {"structured_fraction": 0.5, "unstructured_sparsity": 0.3, "unseen_rank": 4}
    cfg, student_dir, result, report = _run(pipeline, tmp_path, arch, tiny_bert, tokenizer,
                                            **settings)
    loaded = pruning.load_pruned(tmp_path / "pruned")

    # The same pruning done here by hand gives the same model.
    train = read_split(cfg.paths.prepared / "train.parquet").texts
    kept = kept_for(tokenizer, train)
    expected = pruning.PrunedStudent(load_student(student_dir))
    pruning.prune_vocabulary(expected, kept, tokenizer.unk_token_id, own_rank=4)
    assert isinstance(loaded.student.get_input_embeddings(), pruning.FallbackEmbedding)
    pruning.prune_structure(expected, 0.5)
    pruning.prune_magnitude(expected, 0.3)
    texts, labels = _validation(cfg, tokenizer)
    logits = run_on(loaded, tokenizer, texts).logits
    assert torch.equal(logits, run_on(expected.eval(), tokenizer, texts).logits)

    m = result.metrics
    # The fixture's texts reach more of the tiny vocabulary than min_vocab_fraction's default.
    assert report["vocabulary"]["added_common"] == 0
    assert m["vocab_kept"] == len(kept) == report["vocabulary"]["kept"]
    assert report["vocabulary"]["unseen_tokens"] == "own"
    assert report["vocabulary"]["unseen_rank"] == 4
    assert m["params_after"] == count_parameters(loaded) == report["params"]["after"]["total"]
    assert m["params_before"] == count_parameters(load_student(student_dir))
    assert m["params_after"] < m["params_before"]
    # The kept rows whole, the dropped ones at a lower rank (+ the basis and centre).
    width = loaded.student.get_input_embeddings().embedding_dim
    dropped = len(tokenizer) - len(kept)
    rank = min(4, dropped)  # the rank is never above the number of dropped rows
    assert report["params"]["before"]["embedding"] == len(tokenizer) * width
    assert report["params"]["after"]["embedding"] == (len(kept) * width + dropped * rank
                                                      + rank * width + width)
    assert m["sparsity"] == pytest.approx(0.3, abs=0.01)
    assert report["structured"]["after"] == SIZES_AFTER[arch]
    assert m["val_accuracy_after"] == pytest.approx(float((logits.argmax(1).numpy()
                                                           == labels).mean()))
    assert m["val_accuracy_before"] == report["val_accuracy"]["before"]
    assert list(report["val_accuracy"]) == ["before", "after_vocabulary", "after_structured",
                                            "after_unstructured"]
    out = tmp_path / "pruned"
    assert (out / "tokenizer.json").exists() and (out / pruning.VOCAB_REMAP_FILE).exists()
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt"))


def test_step_fine_tune_keeps_pruned_weights_at_zero(pipeline, tmp_path, tiny_bert, tokenizer):
    # Weight decay, too, leaves the dropped tokens' low-rank rows as pruning made them.
    raw = {**pipeline, "distill": {**pipeline.get("distill", {}), "weight_decay": 0.5}}
    cfg, student_dir, result, report = _run(raw, tmp_path, "textcnn", tiny_bert, tokenizer,
                                            unstructured_sparsity=0.5, finetune_epochs=2,
                                            finetune_lr=1e-2, unseen_rank=2)
    assert [e["epoch"] for e in report["finetune"]["loss"]] == [0, 1]
    assert all(np.isfinite(e["loss"]) for e in report["finetune"]["loss"])
    assert "after_finetune" in report["val_accuracy"]
    assert result.metrics["val_accuracy_after"] == report["val_accuracy"]["after_finetune"]
    assert result.metrics["val_accuracy_pruned"] == report["val_accuracy"]["after_unstructured"]
    loaded = pruning.load_pruned(tmp_path / "pruned")
    assert pruning.weight_sparsity(loaded) >= 0.5 - 0.01
    expected = pruning.PrunedStudent(load_student(student_dir))
    train = read_split(cfg.paths.prepared / "train.parquet").texts
    pruning.prune_vocabulary(expected, kept_for(tokenizer, train), tokenizer.unk_token_id,
                             own_rank=2)
    got, want = (m.student.get_input_embeddings() for m in (loaded, expected))
    assert isinstance(got, pruning.FallbackEmbedding)
    for name in ("unseen", "basis", "center"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert not torch.equal(got.weight, want.weight)  # the kept rows were fine-tuned


def test_step_without_vocabulary_pruning_keeps_every_id(pipeline, tmp_path, tiny_bert,
                                                        tokenizer):
    _, student_dir, result, report = _run(pipeline, tmp_path, "bilstm", tiny_bert, tokenizer,
                                          vocabulary=False)
    assert result.metrics["vocab_kept"] == len(tokenizer)
    assert result.metrics["params_after"] == result.metrics["params_before"]
    assert report["vocabulary"] is None
    assert not (tmp_path / "pruned" / pruning.VOCAB_REMAP_FILE).exists()
    loaded = pruning.load_pruned(tmp_path / "pruned")
    assert loaded.vocab_remap is None
    original = load_student(student_dir)
    assert torch.equal(run_on(loaded, tokenizer, KEPT_ONLY).logits,
                       run_on(original, tokenizer, KEPT_ONLY).logits)


def test_commonest_missing_ids_are_the_lowest_unkept_ids_past_placeholders(tokenizer):
    # ids 0..4 are the bracketed [PAD] [UNK] [CLS] [SEP] [MASK]: never added, kept or not.
    assert prune.commonest_missing(tokenizer, [], 2, len(tokenizer)) == [5, 6]
    assert prune.commonest_missing(tokenizer, [0, 1, 5, 7], 3, len(tokenizer)) == [6, 8, 9]
    assert prune.commonest_missing(tokenizer, [], 3, 7) == [5, 6]  # no ids past the rows
    assert prune.commonest_missing(tokenizer, [], 0, len(tokenizer)) == []


def test_step_tops_the_vocabulary_up_with_exact_rows(pipeline, tmp_path, tiny_bert, tokenizer):
    # The fixture's train texts lack "lovely" and "nasty"; one more row than they fill keeps
    # "lovely" (the lower id) exactly, while "nasty" still reads a low-rank row.
    cfg = validate(pipeline, "test")
    train = read_split(cfg.paths.prepared / "train.parquet").texts
    seen = kept_for(tokenizer, train)
    lovely, nasty = tokenizer.convert_tokens_to_ids(["lovely", "nasty"])
    assert lovely < nasty and not {lovely, nasty} & set(seen)
    one_more = (len(seen) + 1) / len(tokenizer)
    _, student_dir, result, report = _run(pipeline, tmp_path, "bilstm", tiny_bert, tokenizer,
                                          min_vocab_fraction=one_more, unseen_rank=2)
    first_missing = min(set(range(5, len(tokenizer))) - set(seen))
    assert first_missing == lovely
    assert result.metrics["vocab_kept"] == len(seen) + 1
    assert (report["vocabulary"]["seen_in_train"], report["vocabulary"]["added_common"]) == (
        len(seen), 1)
    loaded, original = pruning.load_pruned(tmp_path / "pruned"), load_student(student_dir)
    rows = loaded.student.get_input_embeddings().num_embeddings
    assert loaded.vocab_remap[lovely] < rows <= loaded.vocab_remap[nasty]
    ids = tokenizer("the lovely film")["input_ids"]
    torch.testing.assert_close(run_ids(loaded, ids), run_ids(original, ids), atol=1e-6, rtol=0)


def test_load_pruned_names_the_missing_file(tiny_bert, tokenizer, tmp_path):
    student_dir = _student_dir("textcnn", tiny_bert, tokenizer, tmp_path / "student")
    with pytest.raises(KdpipeError, match="pruning.json: not found"):
        pruning.load_pruned(student_dir)
    assert not isinstance(pruning.load_for_inference(student_dir), pruning.PrunedStudent)


def test_a_pruned_folder_is_not_mistaken_for_a_plain_student(tiny_bert, tokenizer, tmp_path):
    model = make("textcnn", tiny_bert, tokenizer)
    pruning.prune_vocabulary(model, kept_for(tokenizer, TRAIN), tokenizer.unk_token_id)
    pruning.save_pruned(model, tmp_path / "pruned")
    with pytest.raises(KdpipeError, match="student.json: not found"):
        load_student(tmp_path / "pruned")  # its inner student reads the new ids
    assert isinstance(pruning.load_for_inference(tmp_path / "pruned"), pruning.PrunedStudent)
