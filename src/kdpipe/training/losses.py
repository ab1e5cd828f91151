"""Knowledge-distillation losses: pure functions of tensors.

Every loss takes the student's and the teacher's tensors and returns a scalar tensor that keeps
the graph (so ``.backward()`` works); none holds state, reads config or moves data between
devices. Shapes: ``B`` rows in the batch, ``C`` classes, ``D`` feature width, ``L`` tokens.

Per-example ``weights`` (B,), e.g. the fractionation weights, turn every batch mean into the
weighted mean ``sum(w * l) / sum(w)``; a row of weight 0 does not change the loss, and a batch
whose weights sum to 0 gives 0 (still with a graph). ``weights=None`` is the plain mean.

``kdpipe.training.loss_terms`` wraps each into a term of the distillation loss (its settings,
heads and state), which the distill step composes from params.yaml.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ---------------------------------------------------------------- reduction


def weighted_mean(per_row: Tensor, weights: Tensor | None = None) -> Tensor:
    """``sum(w * l) / sum(w)`` over rows (plain mean when ``weights`` is None).

    per_row: (B,); weights: (B,), non-negative. All-zero weights (or B = 0) give 0, with a
    graph (its gradients are 0), rather than NaN.
    """
    if weights is None:
        return per_row.mean() if per_row.numel() else per_row.sum()
    weights = weights.to(per_row)
    if weights.shape != per_row.shape:
        raise ValueError(f"weights: expected shape {tuple(per_row.shape)}, "
                         f"got {tuple(weights.shape)}")
    # clamp instead of a branch: no host-device sync, and 0 / tiny is an exact 0
    return (per_row * weights).sum() / weights.sum().clamp_min(_tiny(per_row))


# ---------------------------------------------------------------- logits


def kd_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float,
          weights: Tensor | None = None) -> Tensor:
    """Temperature-scaled KL divergence of the student from the teacher (Hinton et al. 2015).

    student_logits, teacher_logits: (B, C). With ``p = softmax(teacher / T)`` (the target) and
    ``q = softmax(student / T)``, each row gives ``KL(p || q) = sum_c p_c (log p_c - log q_c)``;
    the result is ``T^2 * weighted_mean(KL)``. The ``T^2`` keeps the gradient's scale independent
    of T, so the mix with the hard-label loss need not be retuned when T changes. Gradients flow
    into both inputs; detach the teacher's logits if they are not constants already.
    """
    _same_shape(student_logits, teacher_logits, "student_logits", "teacher_logits")
    log_q = F.log_softmax(student_logits / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits / temperature, dim=-1)
    per_row = (log_p.exp() * (log_p - log_q)).sum(dim=-1)
    return temperature ** 2 * weighted_mean(per_row, weights)


def hard_ce(student_logits: Tensor, labels: Tensor, weights: Tensor | None = None,
            ignore_index: int = -1) -> Tensor:
    """Cross-entropy with the gold labels, over the rows that have one.

    student_logits: (B, C); labels: (B,) int, ``ignore_index`` (-1: an augmented text with no
    gold label) for rows to skip. Returns ``weighted_mean(-log softmax(s)[label])`` over the
    labelled rows only (a skipped row is neither in the numerator nor the denominator); 0, with
    a graph, when every row is skipped.
    """
    if labels.shape != student_logits.shape[:1]:
        raise ValueError(f"labels: expected shape ({student_logits.shape[0]},), "
                         f"got {tuple(labels.shape)}")
    keep = labels != ignore_index
    per_row = F.cross_entropy(student_logits, labels.masked_fill(~keep, 0), reduction="none")
    mask = keep.to(per_row.dtype)
    weights = mask if weights is None else weights.to(per_row) * mask
    return weighted_mean(per_row, weights)


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, temperature: float,
            alpha: float, weights: Tensor | None = None) -> Tensor:
    """The classic distillation objective: ``alpha * kd_kl + (1 - alpha) * hard_ce``.

    student_logits, teacher_logits: (B, C); labels: (B,) int, -1 where there is no gold label.
    Each term is the (weighted) mean over its own rows: ``kd_kl`` over all B rows, ``hard_ce``
    over the labelled rows only. A row labelled -1 therefore contributes only through the KD
    term; it does not dilute the cross-entropy of the labelled rows. A batch with no labelled
    row gives ``alpha * kd_kl`` (the hard term is 0), so its loss is on the KD term's scale.
    ``alpha = 1`` is pure distillation, ``alpha = 0`` pure supervised training.
    """
    soft = kd_kl(student_logits, teacher_logits, temperature, weights)
    hard = hard_ce(student_logits, labels, weights)
    return alpha * soft + (1.0 - alpha) * hard


def logit_mse(student_logits: Tensor, teacher_logits: Tensor,
              weights: Tensor | None = None) -> Tensor:
    """Squared error between raw logits (Tang et al. 2019, distilling BERT into a BiLSTM).

    student_logits, teacher_logits: (B, C). Returns ``weighted_mean(mean_c (s_c - t_c)^2)``:
    the mean over classes, so the scale does not grow with C.
    """
    _same_shape(student_logits, teacher_logits, "student_logits", "teacher_logits")
    per_row = (student_logits - teacher_logits).pow(2).mean(dim=-1)
    return weighted_mean(per_row, weights)


# ---------------------------------------------------------------- features


def feature_alignment(student_features_projected: Tensor, teacher_features: Tensor,
                      kind: str = "mse", weights: Tensor | None = None) -> Tensor:
    """Pull the student's pooled feature towards the teacher's [CLS] feature.

    student_features_projected: (B, D), already mapped to the teacher's width (the distill step
    owns that ``nn.Linear``); teacher_features: (B, D).
    ``kind="mse"``: ``weighted_mean(mean_d (s_d - t_d)^2)``;
    ``kind="cosine"``: ``weighted_mean(1 - cos(s, t))``, in [0, 2], blind to the norm.
    """
    s, t = student_features_projected, teacher_features
    _same_shape(s, t, "student_features_projected", "teacher_features")
    if kind == "mse":
        per_row = (s - t).pow(2).mean(dim=-1)
    elif kind == "cosine":
        per_row = 1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)
    else:
        raise ValueError(f"kind: expected 'mse' or 'cosine', got {kind!r}")
    return weighted_mean(per_row, weights)


def crd_infonce(student_proj: Tensor, teacher_proj: Tensor, temperature: float,
                negatives: Tensor | None = None, weights: Tensor | None = None) -> Tensor:
    """Contrastive representation distillation in InfoNCE form (after Tian et al. 2020).

    student_proj, teacher_proj: (B, D), both already projected to a shared width D;
    negatives: (N, D) extra teacher-side negatives (a ``MemoryBank``), or None.
    Both sides are L2-normalised to ``s_i``, ``t_j``, ``n_k``. Row i's candidates are
    ``[t_1 .. t_B, n_1 .. n_N]``; its positive is ``t_i`` (same row), the other B - 1 rows of
    the batch and all N bank rows are negatives. With ``z_ij = <s_i, c_j> / temperature``:
    ``l_i = -log(exp(z_ii) / sum_j exp(z_ij))``, returned as ``weighted_mean(l)``.
    Lower when each student row is closest to its own teacher row.
    """
    _same_shape(student_proj, teacher_proj, "student_proj", "teacher_proj")
    s = F.normalize(student_proj, dim=-1)
    candidates = F.normalize(teacher_proj, dim=-1)
    if negatives is not None:
        if negatives.dim() != 2 or negatives.shape[1] != s.shape[1]:
            raise ValueError(f"negatives: expected shape (N, {s.shape[1]}), "
                             f"got {tuple(negatives.shape)}")
        candidates = torch.cat([candidates, F.normalize(negatives.to(s), dim=-1)])
    logits = s @ candidates.T / temperature
    targets = torch.arange(s.shape[0], device=s.device)
    per_row = F.cross_entropy(logits, targets, reduction="none")
    return weighted_mean(per_row, weights)


class MemoryBank:
    """A FIFO of the last ``size`` rows pushed (teacher projections), as CRD negatives.

    ``push(x)`` appends the rows of ``x`` (n, D), detached, dropping the oldest beyond ``size``;
    ``get()`` returns them (N, D), oldest first, or None while empty. Call ``get()`` before
    ``push()`` of the same batch, or the batch's positives also appear as its negatives.
    """

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"size: expected >= 1, got {size}")
        self.size = size
        self._rows: Tensor | None = None

    def push(self, x: Tensor) -> None:
        x = x.detach()
        if x.dim() != 2:
            raise ValueError(f"x: expected (n, D), got shape {tuple(x.shape)}")
        if self._rows is not None and self._rows.shape[1] != x.shape[1]:
            raise ValueError(f"x: width {x.shape[1]} does not match the bank's "
                             f"{self._rows.shape[1]}")
        rows = x if self._rows is None else torch.cat([self._rows, x.to(self._rows)])
        self._rows = rows[-self.size:].clone()  # clone: do not pin the caller's big batch

    def get(self) -> Tensor | None:
        return self._rows

    def __len__(self) -> int:
        return 0 if self._rows is None else self._rows.shape[0]


def hidden_mse(student_hidden: Sequence[Tensor], teacher_hidden: Sequence[Tensor],
               layer_pairs: Sequence[tuple[int, int]],
               projections: Sequence[nn.Module | None] | None = None,
               mask: Tensor | None = None, weights: Tensor | None = None) -> Tensor:
    """Layer-to-layer hidden-state matching (BERT-PKD, TinyBERT), over real tokens only.

    student_hidden: the student's hidden states, a sequence of (B, L, Ds), index 0 = the
    embeddings' output, index i = layer i (as ``output_hidden_states`` returns them);
    teacher_hidden: the same for the teacher, (B, L, Dt). layer_pairs: (i, j) pairs, student
    state i against teacher state j. projections: one module (or None) per pair, mapping Ds to
    Dt, required where widths differ. mask: (B, L), 1 for real tokens, 0 for padding (None: all
    real). For each pair, ``sum_{b,l} w_b m_bl sum_d (P(s_i)_bld - t_j_bld)^2 / (D * sum_{b,l}
    w_b m_bl)``: a (weighted) mean over real tokens and features; the result is the mean over
    pairs.
    """
    if not layer_pairs:
        raise ValueError("layer_pairs: at least one (student, teacher) pair is needed")
    if projections is not None and len(projections) != len(layer_pairs):
        raise ValueError(f"projections: expected one per pair ({len(layer_pairs)}), "
                         f"got {len(projections)}")
    total = None
    for k, (i, j) in enumerate(layer_pairs):
        s = _layer(student_hidden, i, "student hidden state")
        t = _layer(teacher_hidden, j, "teacher hidden state")
        proj = projections[k] if projections is not None else None
        if proj is not None:
            s = proj(s)
        if s.shape != t.shape:
            raise ValueError(f"pair ({i}, {j}): student state {tuple(s.shape)} does not match "
                             f"teacher state {tuple(t.shape)}; give a projection for it")
        token_weight = torch.ones(s.shape[:2], dtype=s.dtype, device=s.device)
        if mask is not None:
            token_weight = token_weight * mask.to(s)
        if weights is not None:
            token_weight = token_weight * weights.to(s)[:, None]
        err = (s - t).pow(2).mean(dim=-1)
        term = (err * token_weight).sum() / token_weight.sum().clamp_min(_tiny(err))
        total = term if total is None else total + term
    return total / len(layer_pairs)


def attention_mse(student_attentions: Sequence[Tensor], teacher_attentions: Sequence[Tensor],
                  layer_pairs: Sequence[tuple[int, int]], mask: Tensor | None = None,
                  weights: Tensor | None = None) -> Tensor:
    """Attention transfer (TinyBERT, Jiao et al. 2020): attention maps against the teacher's.

    student_attentions: per layer (B, Hs, L, L), index 0 = layer 1 (as transformers returns
    ``attentions``); teacher_attentions: the same with Ht heads. layer_pairs: (i, j), student
    layer i against teacher layer j, both from 1 (the numbering of ``hidden_mse``, whose state i
    is layer i's output). Where Hs != Ht both sides are averaged over their heads first. mask:
    (B, L), 1 for real tokens: only entries whose query and key are both real count. For each
    pair, the (row-``weights``-weighted) mean of ``(a_s - a_t)^2`` over those entries and the
    heads; the result is the mean over pairs. Probabilities, not TinyBERT's raw scores: they
    are what both models expose, and a padded key's score is -inf-like in one and not the other.
    """
    if not layer_pairs:
        raise ValueError("layer_pairs: at least one (student, teacher) pair is needed")
    total = None
    for i, j in layer_pairs:
        s = _layer(student_attentions, i, "student attention layer", first=1)
        t = _layer(teacher_attentions, j, "teacher attention layer", first=1)
        if s.shape[1] != t.shape[1]:
            s, t = s.mean(dim=1, keepdim=True), t.mean(dim=1, keepdim=True)
        if s.shape != t.shape:
            raise ValueError(f"pair ({i}, {j}): student attention {tuple(s.shape)} does not "
                             f"match the teacher's {tuple(t.shape)}")
        batch, _, length, _ = s.shape
        real = (torch.ones(batch, length, dtype=s.dtype, device=s.device) if mask is None
                else mask.to(s))
        entry = real[:, :, None] * real[:, None, :]  # (B, L, L): query and key both real
        if weights is not None:
            entry = entry * weights.to(s)[:, None, None]
        err = (s - t).pow(2).mean(dim=1)  # (B, L, L), mean over heads
        term = (err * entry).sum() / entry.sum().clamp_min(_tiny(err))
        total = term if total is None else total + term
    return total / len(layer_pairs)


def srrd(student_projected: Tensor, teacher_features: Tensor, teacher_logits: Tensor,
         teacher_head: nn.Module, temperature: float, feature_weight: float,
         weights: Tensor | None = None) -> Tensor:
    """Softmax-regression representation distillation (Yang et al., ICLR 2021).

    student_projected: (B, D), the student's feature already mapped to the teacher's width;
    teacher_features: (B, D), the teacher's [CLS] features; teacher_logits: (B, C);
    teacher_head: the teacher's frozen classifier, (B, D) -> (B, C). Returns
    ``kd_kl(teacher_head(s), teacher_logits, T) + feature_weight * mse(s, t)``: the student's
    feature must make the teacher's own classifier say what the teacher said (the
    softmax-regression term), and lie near the teacher's feature (feature matching).
    Gradients reach ``student_projected`` (and the projection) only; freeze the head.
    """
    regression = kd_kl(teacher_head(student_projected), teacher_logits, temperature, weights)
    if feature_weight == 0:
        return regression
    return regression + feature_weight * feature_alignment(student_projected, teacher_features,
                                                           "mse", weights)


# ---------------------------------------------------------------- EMA self-distillation


def make_ema(model: nn.Module) -> nn.Module:
    """A frozen copy of ``model`` (eval mode, ``requires_grad=False``) to average into."""
    ema = copy.deepcopy(model)
    ema.requires_grad_(False)
    return ema.eval()


def make_peer(model: nn.Module, seed: int) -> nn.Module:
    """A trainable copy of ``model`` for mutual learning, its layers re-initialised from
    ``seed`` (torch's global RNG is left as it was) so that the two start apart; an
    embedding copied from the teacher (a shared, good start) is kept. Re-initialised: every
    submodule with ``reset_parameters`` but the embeddings."""
    peer = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in peer.modules():
            if not isinstance(module, nn.Embedding) and hasattr(module, "reset_parameters"):
                module.reset_parameters()
    return peer.train()


@torch.no_grad()
def ema_update(ema_model: nn.Module, model: nn.Module, momentum: float) -> None:
    """In place, for every parameter: ``ema = momentum * ema + (1 - momentum) * param``;
    every buffer (e.g. batch-norm statistics) is copied as is. Models must share a structure.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum: expected in [0, 1], got {momentum}")
    averaged, online = _paired(ema_model.named_parameters(), model.named_parameters(),
                               "parameter")
    # One multi-tensor lerp (ema + (1 - m)(p - ema)), as torch.optim.swa_utils' EMA does:
    # it runs after every optimizer step, and a mul_ then an add_ per tensor pass over the
    # embedding matrix twice.
    torch._foreach_lerp_(averaged, online, 1.0 - momentum)
    for target, source in zip(*_paired(ema_model.named_buffers(), model.named_buffers(),
                                       "buffer"), strict=True):
        target.copy_(source)


# ---------------------------------------------------------------- schedules


def temperature_at(epoch: float, epochs: int, start: float, end: float | None) -> float:
    """The distillation temperature at ``epoch`` (0-based, fractions allowed).

    ``end`` None: ``start`` throughout. Otherwise linear from ``start`` at epoch 0 to ``end``
    at the last epoch (``epochs - 1``), held there after; with one epoch, ``start``.
    """
    if end is None or epochs <= 1:
        return float(start)
    progress = min(max(epoch, 0.0) / (epochs - 1), 1.0)
    return float(start + (end - start) * progress)


# ---------------------------------------------------------------- helpers


def _tiny(x: Tensor) -> float:
    return torch.finfo(x.dtype).tiny


def _same_shape(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} {tuple(a.shape)} and {name_b} {tuple(b.shape)} must have "
                         "the same shape")


def _layer(states: Sequence[Tensor], number: int, who: str, first: int = 0) -> Tensor:
    """``states[number - first]``: layers are numbered from ``first`` (hidden states from 0,
    the embeddings; attention maps from 1)."""
    if not first <= number < len(states) + first:
        raise ValueError(f"{who} {number} does not exist ({first}..{len(states) - 1 + first}"
                         f"{'; 0 is the embeddings' if first == 0 else ''})")
    return states[number - first]


def _paired(ema_items: Iterable[tuple[str, Tensor]], model_items: Iterable[tuple[str, Tensor]],
            kind: str) -> tuple[list[Tensor], list[Tensor]]:
    """The EMA model's and the model's tensors, matched by name."""
    ema_items, model_items = dict(ema_items), dict(model_items)
    if ema_items.keys() != model_items.keys():
        raise ValueError(f"ema_update: the two models' {kind}s differ: "
                         f"{sorted(ema_items.keys() ^ model_items.keys())[:5]}")
    return [ema_items[n] for n in model_items], [v.detach() for v in model_items.values()]

