"""Training only the reachable embedding rows gives the model a full-table run gives (every
student arch, AdamW with clipping), reads every id as before, merges back to a plain
embedding, and distill uses it only without weight decay."""

from __future__ import annotations

import pytest
import torch
from test_distill import _config, _distill, pipeline_dir  # noqa: F401 (a fixture)

from kdpipe.config import StudentConfig
from kdpipe.models.students import build_student, load_student
from kdpipe.models.teacher import load_tokenizer
from kdpipe.steps import distill
from kdpipe.training import trained_rows

ARCHS = ["textcnn", "bilstm", "transformer", "fast"]
SMALL = {"embedding_dim": 16, "textcnn": {"filter_sizes": [2, 3], "num_filters": 8},
         "bilstm": {"hidden_size": 8}, "transformer": {"teacher_layers": [0]},
         "fast": {"buckets": 32, "hidden_size": 8}}


def _student(arch, tiny_bert, tokenizer):
    torch.manual_seed(0)
    cfg = StudentConfig.model_validate({**SMALL, "arch": arch})
    return build_student(cfg, 2, tiny_bert, tokenizer.pad_token_id, len(tokenizer))


def _batches(tokenizer):
    texts = [["good movie", "the film was awful"], ["bad", "really good film and movie"]]
    return [tokenizer(t, padding=True, return_tensors="pt") for t in texts]


def _train(model, batches, steps=6):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=0.05, weight_decay=0.0)
    model.train()
    for step in range(steps):
        b = batches[step % len(batches)]
        loss = model(b["input_ids"], b["attention_mask"]).logits.logsumexp(1).mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)  # clipping active at 0.5
        optimizer.step()
    return model.eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_restricted_training_equals_full_table_training(arch, tiny_bert, tiny_tokenizer,
                                                        one_torch_thread):
    batches = _batches(tiny_tokenizer)
    full = _train(_student(arch, tiny_bert, tiny_tokenizer), batches)
    restricted = _student(arch, tiny_bert, tiny_tokenizer)
    reached = [ids for b in batches for ids in b["input_ids"].tolist()]
    trained_rows.restrict(restricted, reached)
    embedding = restricted.get_input_embeddings()
    assert isinstance(embedding, trained_rows.RowSubsetEmbedding)
    distinct = set(sum(reached, [])) - {tiny_tokenizer.pad_token_id}
    assert embedding.weight.shape == (len(distinct), embedding.embedding_dim)
    _train(restricted, batches)
    merged = trained_rows.merge(restricted)
    assert type(merged.get_input_embeddings()) is torch.nn.Embedding
    want, got = full.state_dict(), merged.state_dict()
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-5, msg=name)
    # ...and the training did move the reached rows.
    before = _student(arch, tiny_bert, tiny_tokenizer).get_input_embeddings().weight
    after = merged.get_input_embeddings().weight
    moved = (after - before).abs().sum(1) > 0
    assert set(moved.nonzero().flatten().tolist()) == distinct


def test_an_unreached_id_reads_its_frozen_row(tiny_bert, tiny_tokenizer):
    student = _student("bilstm", tiny_bert, tiny_tokenizer)
    original = student.embedding.weight.detach().clone()
    trained_rows.restrict(student, [tiny_tokenizer("good film")["input_ids"]])
    every = torch.arange(len(tiny_tokenizer)).unsqueeze(0)
    assert torch.equal(student.embedding(every)[0], original)
    assert student.embedding(every)[0].requires_grad


def test_distill_trains_only_reachable_rows_without_weight_decay(pipeline_dir, tmp_path,  # noqa: F811
                                                                monkeypatch):
    restricted = []
    restrict = trained_rows.restrict
    monkeypatch.setattr(trained_rows, "restrict", lambda student, ids: (
        restricted.append(student.arch), restrict(student, ids)))
    cfg, fractions = _config(pipeline_dir, tmp_path, epochs=1, student={"arch": "bilstm"})
    _distill(cfg, fractions, tmp_path / "plain")
    assert restricted == ["bilstm"]
    decayed, _ = _config(pipeline_dir, tmp_path / "d", epochs=1, weight_decay=0.1,
                         student={"arch": "bilstm"})
    _distill(decayed, fractions, tmp_path / "decayed")
    assert restricted == ["bilstm"]  # weight decay shrinks every row: the full table trains

    # Saved as a plain, full-width embedding whose unreached rows are the initial ones.
    tokenizer = load_tokenizer(str(cfg.paths.teacher))
    data = distill.load_transfer(cfg, cfg.paths.prepared, cfg.paths.soft_labels, tokenizer)
    reached = trained_rows.reachable_ids(data.ids, tokenizer.pad_token_id)
    torch.manual_seed(cfg.seed)
    initial = build_student(cfg.student, 2, cfg.paths.teacher, tokenizer.pad_token_id,
                            len(tokenizer)).embedding.weight.detach()
    saved = load_student(tmp_path / "plain").embedding
    assert type(saved) is torch.nn.Embedding and saved.num_embeddings == len(tokenizer)
    unreached = torch.ones(len(tokenizer), dtype=torch.bool)
    unreached[reached] = False
    assert 0 < unreached.sum() < len(tokenizer)
    assert torch.equal(saved.weight[unreached], initial[unreached])
    assert not torch.equal(saved.weight[reached], initial[reached])
