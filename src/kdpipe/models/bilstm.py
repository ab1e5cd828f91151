"""BiLSTM student (Tang et al. 2019, "Distilling Task-Specific Knowledge from BERT into
Simple Neural Networks"): word embeddings, a bidirectional LSTM, a linear classifier."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.utils.rnn import pack_padded_sequence

from kdpipe.config import StudentConfig
from kdpipe.models.base import Student, StudentOutput
from kdpipe.models.surgery import kept_count, linear_columns, strongest


class BiLSTM(Student):
    """Embed → BiLSTM over each text's real tokens → [last forward state; last backward
    state] → dropout → Linear.

    ``forward(input_ids, attention_mask)``: both (B, L), right-padded, mask 1 for real tokens.
    Returns ``StudentOutput(logits (B, num_labels), features (B, 2 * hidden_size), None)``.

    Features are the final states of both directions, as in Tang et al. (so results compare
    with the paper), rather than max pooling: the forward state is taken at the text's last
    real token and the backward one at its first, so padding never reaches them and no mask
    is needed after the LSTM (see ``final_states``).
    """

    arch = "bilstm"

    @classmethod
    def from_record(cls, cfg: StudentConfig, record: dict[str, Any]) -> BiLSTM:
        return cls(record["vocab_size"], cfg.embedding_dim, record["pad_id"],
                   cfg.bilstm.hidden_size, cfg.bilstm.layers, record["num_labels"], cfg.dropout)

    def __init__(self, vocab_size: int, embedding_dim: int, pad_id: int, hidden_size: int,
                 layers: int, num_labels: int, dropout: float) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_dim, padding_idx=pad_id)
        # torch applies LSTM dropout between stacked layers only; it warns when there is one.
        self.lstm = nn.LSTM(embedding_dim, hidden_size, num_layers=layers, batch_first=True,
                            bidirectional=True, dropout=dropout if layers > 1 else 0.0)
        self.feature_dim = 2 * hidden_size
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(self.feature_dim, num_labels)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> StudentOutput:
        # At least one step, so an all-padding row still has a state (of the pad embedding).
        lengths = attention_mask.sum(1).clamp(min=1)
        last = final_states(self.lstm, self.embedding(input_ids), lengths)
        features = torch.cat([last[-2], last[-1]], dim=1)  # top layer: forward, backward
        return StudentOutput(self.classifier(self.dropout(features)), features, None)

    def shrink(self, fraction: float) -> None:
        """Units chosen per (layer, direction), by the L1 of their rows of all four gates in
        weight_ih and weight_hh; the same count everywhere (nn.LSTM has one hidden_size)."""
        lstm: nn.LSTM = self.lstm
        hidden = lstm.hidden_size
        keep = kept_count(hidden, fraction)
        directions = ["", "_reverse"]
        units = {}
        for layer in range(lstm.num_layers):
            for d in directions:
                rows = (_lstm_weight(lstm, "weight_ih", layer, d).detach().abs().sum(1)
                        + _lstm_weight(lstm, "weight_hh", layer, d).detach().abs().sum(1))
                units[layer, d] = strongest(rows.view(4, hidden).sum(0), keep)  # gates i, f, g, o
        # skip_init cannot see nn.LSTM's device argument; its draws are all overwritten below
        # and made on a forked RNG, so the caller's random stream stays as it was.
        with torch.random.fork_rng(devices=[]):
            new = nn.LSTM(lstm.input_size, keep, num_layers=lstm.num_layers, bias=lstm.bias,
                          batch_first=lstm.batch_first, dropout=lstm.dropout, bidirectional=True,
                          device=lstm.weight_ih_l0.device, dtype=lstm.weight_ih_l0.dtype)

        def both(layer: int) -> Tensor:  # a layer's output: [forward units; backward units]
            return torch.cat([units[layer, ""], hidden + units[layer, "_reverse"]])

        with torch.no_grad():
            for (layer, d), kept in units.items():
                gate_rows = (torch.arange(4).unsqueeze(1) * hidden + kept).flatten()
                inputs = both(layer - 1) if layer else torch.arange(lstm.input_size)
                _lstm_weight(new, "weight_ih", layer, d).copy_(
                    _lstm_weight(lstm, "weight_ih", layer, d)[gate_rows][:, inputs])
                _lstm_weight(new, "weight_hh", layer, d).copy_(
                    _lstm_weight(lstm, "weight_hh", layer, d)[gate_rows][:, kept])
                if lstm.bias:
                    for kind in ("bias_ih", "bias_hh"):
                        _lstm_weight(new, kind, layer, d).copy_(
                            _lstm_weight(lstm, kind, layer, d)[gate_rows])
        new.flatten_parameters()
        new.train(lstm.training)  # its dropout between layers must not switch on in eval mode
        self.lstm = new
        self.classifier = linear_columns(self.classifier, both(lstm.num_layers - 1))
        self.feature_dim = 2 * keep
        self.student_record["student"]["bilstm"]["hidden_size"] = keep

    def sizes(self) -> dict[str, Any]:
        return {"hidden_size": self.lstm.hidden_size, "layers": self.lstm.num_layers}

    @contextlib.contextmanager
    def export_form(self) -> Iterator[None]:
        """The LSTM as one ONNX ``LSTM`` node per layer that reads each row's length
        (``OnnxLSTM``): the TorchScript exporter fails on ``pack_padded_sequence`` with
        unsorted lengths."""
        from kdpipe.models.bilstm_onnx import OnnxLSTM, pack_as_padded

        before, self.lstm = self.lstm, OnnxLSTM(self.lstm)
        try:
            with mock.patch(f"{__name__}.pack_padded_sequence", pack_as_padded):
                yield
        finally:
            self.lstm = before


def _lstm_weight(lstm: nn.LSTM, kind: str, layer: int, direction: str) -> Tensor:
    return getattr(lstm, f"{kind}_l{layer}{direction}")


def final_states(lstm: nn.Module, x: Tensor, lengths: Tensor) -> Tensor:
    """h_n (layers * directions, B, H) of a batch_first ``lstm`` over right-padded rows
    ``x`` (B, L, E) with ``lengths`` (B,) real steps each: what it returns on the packed rows.

    A plain ``nn.LSTM`` runs on the padded batch instead of a PackedSequence: on CPU, torch
    runs a packed LSTM as a loop of small ATen ops per time step, and a padded one
    as oneDNN's fused kernel, much faster
    (``docs/decisions.md#the-lstm-runs-on-the-padded-batch-in-training``). Padding only
    trails each row, so the forward direction's state at the last real token has not read
    any; the backward direction reads each row's real tokens reversed to the front, so it
    reads padding only after the step whose state is kept. Other LSTM modules (torch's
    dynamic int8 LSTM, the export's ``OnnxLSTM``) get the packed rows.
    """
    if type(lstm) is not nn.LSTM or lstm.proj_size or not lstm.batch_first:
        return packed_final_states(lstm, x, lengths)
    steps = torch.arange(x.shape[1], device=x.device)
    # Each row's real steps reversed in place, padding left where it is: its own inverse.
    flip = torch.where(steps < lengths[:, None], lengths[:, None] - 1 - steps, steps)
    last_step = (lengths - 1)[:, None, None].expand(-1, 1, lstm.hidden_size)
    directions = ("", "_reverse") if lstm.bidirectional else ("",)
    finals = []
    for layer in range(lstm.num_layers):
        if layer:
            x = F.dropout(x, lstm.dropout, lstm.training)
        one_way = _one_way_lstm(x.shape[2], lstm.hidden_size, lstm.bias)
        outputs = []
        for direction in directions:
            # The template's names (weight_ih_l0, ...) with this layer's and direction's suffix.
            weights = {name: getattr(lstm, f"{name.removesuffix('_l0')}_l{layer}{direction}")
                       for name, _ in one_way.named_parameters()}
            rows = _flip_rows(x, flip) if direction else x
            out = functional_call(one_way, weights, (rows,), strict=True)[0]
            finals.append(out.gather(1, last_step)[:, 0])
            outputs.append(_flip_rows(out, flip) if direction else out)
        x = torch.cat(outputs, dim=2)
    return torch.stack(finals)


def packed_final_states(lstm: nn.Module, x: Tensor, lengths: Tensor) -> Tensor:
    """``final_states`` the way torch documents it: through a PackedSequence."""
    packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
    return lstm(packed)[1][0]


def _flip_rows(x: Tensor, flip: Tensor) -> Tensor:
    return x.gather(1, flip[:, :, None].expand(-1, -1, x.shape[2]))


@functools.lru_cache(maxsize=16)
def _one_way_lstm(input_size: int, hidden_size: int, bias: bool) -> nn.LSTM:
    """A one-layer, one-direction LSTM whose own weights are never used: ``functional_call``
    runs it with one direction's weights of the model's LSTM. Built outside the global random
    stream: its initial draws would otherwise shift the dropout masks that follow, and a
    resumed run (which builds it later) would no longer repeat an uninterrupted one."""
    with torch.random.fork_rng(devices=[]):
        return nn.LSTM(input_size, hidden_size, bias=bias, batch_first=True)
