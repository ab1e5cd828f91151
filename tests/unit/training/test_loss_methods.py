"""Attention transfer, softmax-regression representation distillation (SRRD) and the
adaptive (MLP) projection, against values worked out by hand; the teacher's classifier head
as SRRD reads it; the teacher run alongside once per batch for the terms sharing it."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kdpipe.config import DistillConfig, StudentConfig
from kdpipe.errors import KdpipeError
from kdpipe.models.students import build_student
from kdpipe.models.teacher_head import classifier_head, head_of
from kdpipe.training import loss_terms
from kdpipe.training.losses import attention_mse, srrd


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


# ---------------------------------------------------------------- attention transfer


def test_attention_mse_counts_only_real_query_key_pairs():
    # one layer, one head, three tokens, the last one padding: its row and column differ
    # wildly and must not count
    student = [t([[[[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.3, 0.3, 0.4]]]])]
    teacher = [t([[[[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]]])]
    mask = torch.tensor([[1, 1, 0]])
    # real entries (0,0) (0,1) (1,0) (1,1): 0.25 each
    assert attention_mse(student, teacher, [(1, 1)], mask=mask).item() == pytest.approx(0.25)
    # unmasked: + (0,2) 0, (1,2) 0, (2,0) .09, (2,1) .09, (2,2) .36 -> 1.54 / 9
    assert attention_mse(student, teacher, [(1, 1)]).item() == pytest.approx(1.54 / 9)


def test_attention_mse_averages_heads_only_where_counts_differ():
    eye, swap = [[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]
    student = [t([[eye, swap]])]  # (1, 2 heads, 2, 2)
    # one teacher head: the student's two average to 0.5 everywhere; (0.5)^2 = 0.25
    assert attention_mse(student, [t([[eye]])], [(1, 1)]).item() == pytest.approx(0.25)
    # two teacher heads: head by head, 0 and 1 -> 0.5
    assert attention_mse(student, [t([[eye, eye]])], [(1, 1)]).item() == pytest.approx(0.5)


def test_attention_mse_weights_rows_and_pairs_layers_from_one():
    zeros = torch.zeros(2, 1, 2, 2)
    student = [zeros, torch.cat([torch.full((1, 1, 2, 2), 0.5), torch.ones(1, 1, 2, 2)])]
    teacher = [zeros]
    # layer 2 against layer 1: row 0 errs 0.25, row 1 errs 1.0; weights 1 and 3
    value = attention_mse(student, teacher, [(2, 1)], weights=t([1.0, 3.0]))
    assert value.item() == pytest.approx((0.25 * 1 + 1.0 * 3) / 4)
    # with the (1, 1) pair (error 0) beside it: the mean over the pairs
    both = attention_mse(student, teacher, [(1, 1), (2, 1)], weights=t([1.0, 3.0]))
    assert both.item() == pytest.approx(0.8125 / 2)
    with pytest.raises(ValueError, match="layer 0 does not exist"):
        attention_mse(student, teacher, [(0, 1)])
    with pytest.raises(ValueError, match="teacher attention layer 2 does not exist"):
        attention_mse(student, teacher, [(1, 2)])


# ---------------------------------------------------------------- SRRD


def test_srrd_is_the_teachers_head_on_the_students_feature_plus_feature_mse():
    head = nn.Linear(2, 2)
    with torch.no_grad():
        head.weight.copy_(torch.eye(2))
        head.bias.zero_()
    head.requires_grad_(False)
    student = t([[1.0, 0.0]]).requires_grad_()
    teacher_logits, teacher_features = t([[0.0, 0.0]]), t([[0.0, 0.0]])
    q = [math.e / (math.e + 1), 1 / (math.e + 1)]  # softmax of the head's [1, 0]
    regression = 0.5 * math.log(0.5 / q[0]) + 0.5 * math.log(0.5 / q[1])
    value = srrd(student, teacher_features, teacher_logits, head, 1.0, 2.0)
    assert value.item() == pytest.approx(regression + 2.0 * 0.5)  # mse (1 + 0) / 2
    assert srrd(student, teacher_features, teacher_logits, head, 1.0, 0.0).item() == \
        pytest.approx(regression)
    # T = 2: T^2 * KL of the softened distributions
    q2 = [math.exp(0.5) / (math.exp(0.5) + 1), 1 / (math.exp(0.5) + 1)]
    softened = 4 * (0.5 * math.log(0.5 / q2[0]) + 0.5 * math.log(0.5 / q2[1]))
    assert srrd(student, teacher_features, teacher_logits, head, 2.0, 0.0).item() == \
        pytest.approx(softened)
    value.backward()
    assert student.grad is not None and head.weight.grad is None  # the head stays frozen


# ---------------------------------------------------------------- projections


def test_the_mlp_projection_is_a_scaled_two_layer_net():
    mlp = loss_terms.projection("mlp", 2, 2)
    with torch.no_grad():
        mlp.net[0].weight.copy_(torch.eye(2))
        mlp.net[0].bias.fill_(-1.0)
        mlp.net[2].weight.copy_(t([[1.0, 2.0], [3.0, 4.0]]))
        mlp.net[2].bias.zero_()
        mlp.scale.fill_(2.0)
    out = mlp(t([[2.0, 0.5]]))  # relu([1, -0.5]) = [1, 0] -> [1, 3] -> * 2
    assert out.tolist() == [[2.0, 6.0]]
    out.sum().backward()
    assert mlp.scale.grad.item() == pytest.approx(4.0)  # d(2 * 4) / d scale = 1 + 3
    assert isinstance(loss_terms.projection("linear", 3, 5), nn.Linear)
    with pytest.raises(ValueError, match="expected 'linear' or 'mlp'"):
        loss_terms.projection("conv", 3, 5)


# ---------------------------------------------------------------- the teacher's head


def _cls_and_logits(model, ids):
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                    output_hidden_states=True)
    return out.hidden_states[-1][:, 0], out.logits


def test_the_teachers_head_turns_its_cached_features_into_its_logits(tiny_bert):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert)
    features, logits = _cls_and_logits(model, torch.tensor([[2, 10, 11, 3], [2, 12, 3, 0]]))
    head = classifier_head(tiny_bert)
    assert torch.allclose(head(features), logits, atol=1e-5)
    assert not any(p.requires_grad for p in head.parameters())
    assert not head.training


@pytest.mark.parametrize("family", ["distilbert", "roberta"])
def test_other_families_heads_are_mirrored_too(family):
    from transformers import (
        DistilBertConfig,
        DistilBertForSequenceClassification,
        RobertaConfig,
        RobertaForSequenceClassification,
    )

    torch.manual_seed(0)
    if family == "distilbert":
        model = DistilBertForSequenceClassification(DistilBertConfig(
            vocab_size=30, dim=16, hidden_dim=32, n_layers=1, n_heads=2, num_labels=3))
    else:
        model = RobertaForSequenceClassification(RobertaConfig(
            vocab_size=30, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, num_labels=3))
    features, logits = _cls_and_logits(model, torch.tensor([[0, 5, 6, 2], [0, 7, 8, 2]]))
    assert torch.allclose(head_of(model)(features), logits, atol=1e-5)


def test_a_teacher_without_a_known_head_is_a_one_line_error():
    class Bare(nn.Module):
        base_model_prefix = "encoder"

        def __init__(self):
            super().__init__()
            self.encoder = nn.Identity()
            self.score = nn.Linear(4, 2)

    with pytest.raises(KdpipeError, match="no known classifier head on Bare"):
        head_of(Bare())


# ---------------------------------------------------------------- terms


def _transformer_student(tiny_bert):
    torch.manual_seed(0)
    return build_student(StudentConfig(arch="transformer",
                                       transformer={"teacher_layers": [1]}),
                         2, tiny_bert, 0, 40)


def test_hidden_and_attention_share_one_teacher_run_per_batch(tiny_bert):
    student = _transformer_student(tiny_bert)
    d = DistillConfig(hidden={"weight": 1.0}, attention={"weight": 1.0})
    terms = loss_terms.build_terms(["kd", "hidden", "attention"], d, student, 0, tiny_bert)
    shared = terms["hidden"].alongside
    assert terms["attention"].alongside is shared
    assert terms["attention"].layer_pairs == [(1, 2)]  # student layer 1 was teacher layer 2
    calls = []
    shared.model.register_forward_hook(lambda *a: calls.append(1))
    ids = torch.tensor([[2, 10, 11, 3], [2, 12, 3, 0]])
    mask = (ids != 0).long()
    batch = loss_terms.Batch(ids, mask, torch.tensor([0, 1]), torch.zeros(2, 2), None,
                             torch.ones(2))
    out = student(ids, mask)
    assert out.attentions is not None and out.attentions[0].shape == (2, 2, 4, 4)
    values = {n: terms[n](batch, out, loss_terms.LossTerms.for_epoch(d, 0))
              for n in ("hidden", "attention")}
    assert len(calls) == 1
    assert all(v.item() > 0 and v.requires_grad for v in values.values())
    # Same maps on both sides: the attention term is 0.
    shared_out = shared.outputs(batch)
    assert attention_mse(shared_out.attentions, shared_out.attentions, [(1, 1)]).item() == 0


def test_attention_transfer_needs_the_transformer_student(tiny_bert):
    student = build_student(StudentConfig(arch="bilstm", embedding_dim=8,
                                          bilstm={"hidden_size": 4}), 2, tiny_bert, 0, 40)
    with pytest.raises(KdpipeError, match="distill.attention.weight > 0 needs "
                                          "student.arch=transformer"):
        loss_terms.build_terms(["attention"], DistillConfig(attention={"weight": 1.0}),
                               student, 0, tiny_bert)


# ---------------------------------------------------------------- deep mutual learning


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(5, 2)
        self.head = nn.Linear(2, 2)

    def forward(self, ids, mask):
        from kdpipe.models.base import StudentOutput

        pooled = self.embedding(ids).mean(dim=1)
        return StudentOutput(self.head(pooled), pooled)


def test_the_peer_starts_apart_but_keeps_the_embedding_and_the_global_rng():
    from kdpipe.training.losses import make_peer

    torch.manual_seed(0)
    student = Tiny()
    state = torch.random.get_rng_state()
    peer, again = make_peer(student, seed=1), make_peer(student, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(peer.embedding.weight, student.embedding.weight)
    assert not torch.equal(peer.head.weight, student.head.weight)
    assert torch.equal(peer.head.weight, again.head.weight)  # seeded
    assert peer.embedding.weight.data_ptr() != student.embedding.weight.data_ptr()


def test_mutual_learning_pulls_each_towards_the_other_and_steps_the_peer():
    from kdpipe.training.losses import kd_kl, kd_loss

    torch.manual_seed(0)
    student = Tiny()
    d = DistillConfig(mutual={"weight": 0.5}, max_grad_norm=None, lr=0.1)
    term = loss_terms.build_terms(["kd", "mutual"], d, student, 0, None)["mutual"]
    peer = term.peer
    ids = torch.tensor([[1, 2], [3, 4]])
    batch = loss_terms.Batch(ids, torch.ones_like(ids), torch.tensor([0, -1]),
                             t([[2.0, 0.0], [0.0, 1.0]]), None, torch.ones(2))
    terms = loss_terms.LossTerms.for_epoch(d, 0)
    out = student(ids, batch.attention_mask)
    before = {k: v.clone() for k, v in peer.state_dict().items()}
    peer_logits = peer(ids, batch.attention_mask).logits.detach()
    value = term(batch, out, terms)
    # The student's term: KL from the peer's softened output.
    assert value.item() == pytest.approx(kd_kl(out.logits, peer_logits, terms.temperature)
                                         .item())
    # The peer's loss: its own KD loss plus 0.5 x KL from the student's output.
    expected = (kd_loss(peer_logits, batch.teacher_logits, batch.labels, terms.temperature,
                        terms.alpha) + 0.5 * kd_kl(peer_logits, out.logits.detach(),
                                                   terms.temperature))
    assert term._loss.item() == pytest.approx(expected.item())
    value.backward()
    assert peer.head.weight.grad is None  # the student's term does not train the peer
    term.after_step(student, lr=0.1)
    assert term.optimizer.param_groups[0]["lr"] == 0.1
    assert not torch.equal(before["head.weight"], peer.state_dict()["head.weight"])
    assert term.models() == {"peer": peer}
