"""kdpipe.training.losses against values worked out by hand (math.exp / math.log, not the
same torch ops)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kdpipe.config import DistillConfig
from kdpipe.training.loss_terms import LossTerms
from kdpipe.training.losses import (
    MemoryBank,
    crd_infonce,
    ema_update,
    feature_alignment,
    hard_ce,
    hidden_mse,
    kd_kl,
    kd_loss,
    logit_mse,
    make_ema,
    temperature_at,
)

E = math.e


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))


def softmax(xs: list[float]) -> list[float]:
    exps = [math.exp(x) for x in xs]
    return [e / sum(exps) for e in exps]


# ---------------------------------------------------------------- kd_kl


def test_kd_kl_on_two_classes_at_t2_by_hand():
    # teacher [2, 0] / T=2 -> [1, 0] -> p = [e/(e+1), 1/(e+1)] = [0.7311, 0.2689];
    # student [0, 0] -> q = [0.5, 0.5]; KL = 0.7311 ln 1.4621 + 0.2689 ln 0.5379
    p = [E / (E + 1), 1 / (E + 1)]
    expected = 4 * (p[0] * math.log(p[0] / 0.5) + p[1] * math.log(p[1] / 0.5))
    assert expected == pytest.approx(0.4438, abs=1e-4)  # 4 * (0.2777 - 0.1668)
    got = kd_kl(t([[0.0, 0.0]]), t([[2.0, 0.0]]), temperature=2.0)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_kd_kl_is_t_squared_times_the_kl_of_the_softened_distributions():
    student, teacher = [0.5, -1.0, 2.0], [3.0, 0.0, -1.0]
    soft_kl = kl(softmax([x / 2 for x in teacher]), softmax([x / 2 for x in student]))
    got = kd_kl(t([student]), t([teacher]), temperature=2.0)
    assert got.item() == pytest.approx(4 * soft_kl, rel=1e-5)


def test_kd_kl_direction_teacher_is_the_target():
    p, q = [E / (E + 1), 1 / (E + 1)], [0.5, 0.5]
    forward = kd_kl(t([[0.0, 0.0]]), t([[1.0, 0.0]]), temperature=1.0).item()
    backward = kd_kl(t([[1.0, 0.0]]), t([[0.0, 0.0]]), temperature=1.0).item()
    assert forward == pytest.approx(kl(p, q), rel=1e-5)   # sum p (log p - log q)
    assert backward == pytest.approx(kl(q, p), rel=1e-5)
    assert abs(forward - backward) > 1e-3


def test_kd_kl_is_zero_when_student_matches_and_mean_over_rows():
    same = kd_kl(t([[1.0, -2.0]]), t([[1.0, -2.0]]), temperature=3.0)
    assert same.item() == pytest.approx(0.0, abs=1e-7)
    one = kd_kl(t([[0.0, 0.0]]), t([[1.0, 0.0]]), 1.0).item()
    two = kd_kl(t([[0.0, 0.0], [5.0, 5.0]]), t([[1.0, 0.0], [1.0, 1.0]]), 1.0).item()
    assert two == pytest.approx(one / 2, rel=1e-5)  # second row contributes 0


# ---------------------------------------------------------------- hard_ce and kd_loss


def test_hard_ce_ignores_rows_labelled_minus_one():
    logits = t([[2.0, 0.0], [9.0, -9.0], [0.0, 1.0]])
    labels = torch.tensor([0, -1, 0])
    a, b = math.log(1 + math.exp(-2)), math.log(1 + E)  # row 0 and row 2
    assert hard_ce(logits, labels).item() == pytest.approx((a + b) / 2, rel=1e-6)
    weighted = hard_ce(logits, labels, weights=t([1.0, 5.0, 3.0])).item()
    assert weighted == pytest.approx((1 * a + 3 * b) / 4, rel=1e-6)


def test_hard_ce_is_zero_with_a_graph_when_every_row_is_ignored():
    logits = t([[2.0, 0.0], [0.0, 1.0]]).requires_grad_()
    loss = hard_ce(logits, torch.tensor([-1, -1]))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros(2, 2))


def test_kd_loss_mixes_alpha_kd_and_hard_ce_over_labelled_rows_only():
    student = t([[0.0, 0.0], [0.0, 0.0]])
    teacher = t([[1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, -1])
    p = [E / (E + 1), 1 / (E + 1)]
    kd = kl(p, [0.5, 0.5])  # both rows have the same KL (mirror images), T = 1
    ce = math.log(2)        # row 0 only: -log 0.5
    got = kd_loss(student, teacher, labels, temperature=1.0, alpha=0.25).item()
    assert got == pytest.approx(0.25 * kd + 0.75 * ce, rel=1e-6)
    all_augmented = kd_loss(student, teacher, torch.tensor([-1, -1]), 1.0, alpha=0.25).item()
    assert all_augmented == pytest.approx(0.25 * kd, rel=1e-6)
    assert kd_loss(student, teacher, labels, 1.0, alpha=1.0).item() == pytest.approx(kd, 1e-6)
    assert kd_loss(student, teacher, labels, 1.0, alpha=0.0).item() == pytest.approx(ce, 1e-6)


# ---------------------------------------------------------------- weights


LOSSES = {
    "kd_kl": lambda s, te, w: kd_kl(s, te, 2.0, weights=w),
    "hard_ce": lambda s, te, w: hard_ce(s, torch.tensor([0, 1, 1]), weights=w),
    "kd_loss": lambda s, te, w: kd_loss(s, te, torch.tensor([0, -1, 1]), 2.0, 0.5, weights=w),
    "logit_mse": lambda s, te, w: logit_mse(s, te, weights=w),
    "feature_mse": lambda s, te, w: feature_alignment(s, te, "mse", weights=w),
    "feature_cosine": lambda s, te, w: feature_alignment(s, te, "cosine", weights=w),
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_a_zero_weight_row_does_not_change_the_loss(name):
    loss = LOSSES[name]
    student = t([[1.0, -1.0], [3.0, 0.5], [0.2, 0.4]])
    teacher = t([[0.0, 2.0], [-4.0, 1.0], [1.0, 1.0]])
    w = t([1.0, 0.0, 1.0])
    base = loss(student, teacher, w).item()
    student[1], teacher[1] = t([50.0, -50.0]), t([-50.0, 50.0])  # the ignored row changes
    assert loss(student, teacher, w).item() == pytest.approx(base, rel=1e-6)
    assert base != pytest.approx(loss(student, teacher, None).item(), rel=1e-3)


def test_weights_give_the_weighted_mean():
    # per-row MSE: row 0 -> 1, row 1 -> 4; weights 3 and 1 -> (3 + 4) / 4
    got = logit_mse(t([[1.0], [2.0]]), t([[0.0], [0.0]]), weights=t([3.0, 1.0]))
    assert got.item() == pytest.approx(7 / 4)


# ---------------------------------------------------------------- logit_mse, features


def test_logit_mse_is_the_mean_over_classes():
    # (1-0)^2 + (2-2)^2 + (3-5)^2 = 5, over 3 classes
    assert logit_mse(t([[1.0, 2.0, 3.0]]), t([[0.0, 2.0, 5.0]])).item() == pytest.approx(5 / 3)


def test_feature_alignment_mse_and_cosine():
    s, te = t([[1.0, 0.0], [1.0, 0.0]]), t([[1.0, 1.0], [-2.0, 0.0]])
    # mse: row 0 (0 + 1)/2, row 1 (9 + 0)/2 -> mean 2.5
    assert feature_alignment(s, te, "mse").item() == pytest.approx(2.5)
    # cosine: row 0 1 - 1/sqrt(2), row 1 1 - (-1) = 2
    expected = ((1 - 1 / math.sqrt(2)) + 2) / 2
    assert feature_alignment(s, te, "cosine").item() == pytest.approx(expected, rel=1e-6)
    assert feature_alignment(t([[2.0, 0.0]]), t([[5.0, 0.0]]), "cosine").item() == 0.0
    with pytest.raises(ValueError, match="kind"):
        feature_alignment(s, te, "l1")


# ---------------------------------------------------------------- CRD


def test_crd_infonce_on_a_2x2_case_by_hand():
    # normalised: s = e1, e2; teacher [2, 0], [0, 3] -> e1, e2; temperature 0.5
    # row logits [2, 0] and [0, 2] -> each -log(e^2 / (e^2 + 1)) = log(1 + e^-2)
    s, te = t([[1.0, 0.0], [0.0, 1.0]]), t([[2.0, 0.0], [0.0, 3.0]])
    expected = math.log(1 + math.exp(-2))
    assert crd_infonce(s, te, temperature=0.5).item() == pytest.approx(expected, rel=1e-6)
    # a bank row [1, 0]: row 0 sees [2, 0, 2], row 1 sees [0, 2, 0]
    row0 = -math.log(E**2 / (2 * E**2 + 1))
    row1 = -math.log(E**2 / (E**2 + 2))
    with_bank = crd_infonce(s, te, 0.5, negatives=t([[4.0, 0.0]])).item()
    assert with_bank == pytest.approx((row0 + row1) / 2, rel=1e-6)
    only_row0 = crd_infonce(s, te, 0.5, negatives=t([[4.0, 0.0]]), weights=t([1.0, 0.0]))
    assert only_row0.item() == pytest.approx(row0, rel=1e-6)


def test_crd_aligned_pairs_score_lower_than_shuffled_pairs():
    gen = torch.Generator().manual_seed(0)
    teacher = torch.randn(8, 16, generator=gen)
    aligned = crd_infonce(teacher.clone(), teacher, temperature=0.1).item()
    shuffled = crd_infonce(teacher[torch.roll(torch.arange(8), 1)], teacher, 0.1).item()
    assert aligned < shuffled


def test_memory_bank_is_a_detached_fifo():
    bank = MemoryBank(3)
    assert bank.get() is None
    bank.push(t([[1.0], [2.0]]).requires_grad_())
    assert bank.get().tolist() == [[1.0], [2.0]]
    assert not bank.get().requires_grad
    bank.push(t([[3.0], [4.0]]))
    assert bank.get().tolist() == [[2.0], [3.0], [4.0]]
    bank.push(t([[5.0], [6.0], [7.0], [8.0]]))
    assert bank.get().tolist() == [[6.0], [7.0], [8.0]]
    assert len(bank) == 3
    with pytest.raises(ValueError, match="width"):
        bank.push(t([[1.0, 2.0]]))


# ---------------------------------------------------------------- hidden states


def test_hidden_mse_ignores_padded_positions():
    # student state 1 vs teacher state 2, three tokens, the last one padding
    student = [torch.zeros(1, 3, 2), t([[[1.0, 1.0], [0.0, 0.0], [9.0, 9.0]]])]
    teacher = [torch.zeros(1, 3, 2), torch.zeros(1, 3, 2),
               t([[[0.0, 0.0], [0.0, 2.0], [-9.0, -9.0]]])]
    mask = torch.tensor([[1, 1, 0]])
    # token 0: (1 + 1) / 2 = 1; token 1: (0 + 4) / 2 = 2; mean 1.5
    assert hidden_mse(student, teacher, [(1, 2)], mask=mask).item() == pytest.approx(1.5)
    # pair (0, 0) is 0 everywhere: the mean over the two pairs halves it
    both = hidden_mse(student, teacher, [(0, 0), (1, 2)], mask=mask).item()
    assert both == pytest.approx(0.75)
    assert hidden_mse(student, teacher, [(1, 2)]).item() > 1.5  # padding now counts


def test_hidden_mse_projects_where_widths_differ():
    student = [torch.ones(2, 4, 3)]
    teacher = [torch.zeros(2, 4, 5)]
    with pytest.raises(ValueError, match="projection"):
        hidden_mse(student, teacher, [(0, 0)])
    proj = nn.Linear(3, 5, bias=False)
    nn.init.zeros_(proj.weight)
    assert hidden_mse(student, teacher, [(0, 0)], projections=[proj]).item() == 0.0
    with pytest.raises(ValueError, match="does not exist"):
        hidden_mse(student, teacher, [(1, 0)], projections=[proj])


# ---------------------------------------------------------------- EMA


class OneParameter(nn.Module):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([value]))
        self.register_buffer("seen", torch.tensor([0.0]))


def test_ema_update_is_momentum_times_old_plus_rest_times_new():
    model = OneParameter(2.0)
    ema = make_ema(model)
    assert not ema.training and not ema.w.requires_grad
    with torch.no_grad():
        model.w.fill_(12.0)
        model.seen.fill_(7.0)
    ema_update(ema, model, momentum=0.9)
    assert ema.w.item() == 3.0  # 0.9 * 2 + 0.1 * 12, exact in float32 too
    assert ema.seen.item() == 7.0  # buffers are copied
    assert model.w.item() == 12.0  # the student is untouched
    ema_update(ema, model, momentum=0.9)
    assert ema.w.item() == pytest.approx(0.9 * 3.0 + 0.1 * 12.0, abs=1e-6)  # 3.9


def test_ema_update_refuses_models_of_different_structure():
    with pytest.raises(ValueError, match="parameters differ"):
        ema_update(make_ema(OneParameter(1.0)), torch.nn.Linear(1, 1), momentum=0.9)
    with pytest.raises(ValueError, match=r"momentum: expected in \[0, 1\]"):
        ema_update(make_ema(OneParameter(1.0)), OneParameter(1.0), momentum=1.5)


# ---------------------------------------------------------------- schedules, composition


def test_temperature_at_endpoints_and_midpoint():
    assert temperature_at(0, 5, start=4.0, end=1.0) == 4.0
    assert temperature_at(4, 5, start=4.0, end=1.0) == 1.0
    assert temperature_at(2, 5, start=4.0, end=1.0) == 2.5
    assert temperature_at(9, 5, start=4.0, end=1.0) == 1.0  # held after the last epoch
    assert temperature_at(3, 5, start=4.0, end=None) == 4.0


def test_loss_terms_follow_the_config():
    cfg = DistillConfig(hard_label_epochs=1, temperature=3.0, feature={"weight": 0.5})
    assert dict(LossTerms.for_epoch(cfg, 0).weights) == {"hard_ce": 1.0}
    terms = LossTerms.for_epoch(cfg, 1)
    assert dict(terms.weights) == {"kd": 1.0, "feature": 0.5}
    assert "crd" not in terms and terms.temperature == 3.0
    total, logged = terms.combine({"kd": torch.tensor(2.0), "feature": torch.tensor(4.0)})
    assert total.item() == 4.0
    assert logged == {"kd": 2.0, "feature": 4.0, "total": 4.0}
    with pytest.raises(ValueError, match="expected"):
        terms.combine({"kd": torch.tensor(2.0)})
