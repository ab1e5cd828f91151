"""The BiLSTM's ONNX form: one ONNX ``LSTM`` node per layer, each row's length its
``sequence_lens`` (``BiLSTM.export_form`` swaps it in on the copy that is exported)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from kdpipe.errors import KdpipeError


class _Padded(NamedTuple):
    """What the patched ``pack_padded_sequence`` hands to ``OnnxLSTM`` instead of a
    PackedSequence: the right-padded batch and each row's length."""

    data: Tensor  # (B, L, E), batch first
    lengths: Tensor  # (B,) int64, each >= 1


def pack_as_padded(input: Tensor, lengths: Tensor | Sequence[int], batch_first: bool = False,
                    enforce_sorted: bool = True) -> _Padded:
    data = input if batch_first else input.transpose(0, 1)
    return _Padded(data, torch.as_tensor(lengths, dtype=torch.long, device=data.device))


class OnnxLSTM(nn.Module):
    """An ``nn.LSTM`` (batch_first, any layers, one or two directions) over right-padded
    rows that exports as one ONNX ``LSTM`` node per layer, each row's length its
    ``sequence_lens``; it returns the final hidden states the same LSTM returns on the packed
    rows.

    Takes a ``_Padded`` and returns ``(None, (h_n, None))``, h_n (layers * directions, B, H)
    in the LSTM's own order. The per-step output and c_n are None, not invented: a caller
    that reads them fails loudly instead of exporting something wrong.

    ``sequence_lens`` is what makes one node do what packing does: the forward direction's
    state stops at each row's last real token and the backward direction starts there, so
    neither reads padding. The earlier form reversed each row's tokens with GatherElements
    around two one-directional nodes; its int8 SST-2 BiLSTM was slower (32 texts: 13,143
    against 11,280 texts/s; one text: 0.092 against 0.140 ms;
    ``docs/decisions.md#one-onnx-lstm-node-per-layer``).
    """

    def __init__(self, lstm: nn.LSTM) -> None:
        super().__init__()
        if not lstm.batch_first or lstm.proj_size:
            raise KdpipeError("OnnxLSTM: expects a batch_first LSTM without projections")
        self.layers = lstm.num_layers
        for layer in range(lstm.num_layers):
            w, r, b = _onnx_lstm_weights(lstm, layer)
            self.register_buffer(f"w{layer}", w)
            self.register_buffer(f"r{layer}", r)
            self.register_buffer(f"b{layer}", b)

    def forward(self, padded: _Padded) -> tuple[None, tuple[Tensor, None]]:
        if not isinstance(padded, _Padded):
            raise TypeError("OnnxLSTM needs the patched pack_padded_sequence "
                            f"(got {type(padded).__name__})")
        x, lengths = padded
        x = x.transpose(0, 1)  # time-major, as the ONNX operator's default layout wants
        finals = []
        for layer in range(self.layers):
            x, last = _LSTMNode.apply(x, lengths, getattr(self, f"w{layer}"),
                                      getattr(self, f"r{layer}"), getattr(self, f"b{layer}"))
            finals.append(last)
        return None, (torch.cat(finals), None)


def _onnx_lstm_weights(lstm: nn.LSTM, layer: int) -> tuple[Tensor, Tensor, Tensor]:
    """One layer's weights in ONNX's layout and gate order: W (directions, 4H, in),
    R (directions, 4H, H), B (directions, 8H: input biases, then recurrent ones)."""
    suffixes = ("", "_reverse")[: 2 if lstm.bidirectional else 1]

    def stacked(name: str) -> Tensor:
        return torch.stack([_onnx_gate_order(getattr(lstm, f"{name}_l{layer}{sfx}"))
                            for sfx in suffixes]).detach().clone()

    bias = (torch.cat([stacked("bias_ih"), stacked("bias_hh")], dim=1) if lstm.bias
            else torch.zeros(len(suffixes), 8 * lstm.hidden_size))
    return stacked("weight_ih"), stacked("weight_hh"), bias


def _onnx_gate_order(weight: Tensor) -> Tensor:
    """PyTorch stacks an LSTM's gates as input, forget, cell, output; ONNX as input, output,
    forget, cell."""
    i, f, c, o = weight.chunk(4)
    return torch.cat([i, o, f, c])


class _LSTMNode(torch.autograd.Function):
    """One ONNX ``LSTM`` node: x (L, B, in) time-major, lengths (B,), W, R, B in ONNX's
    layout and gate order -> (outputs (L, B, directions * H), final states (directions, B,
    H)). The PyTorch side computes what the operator computes (padding steps leave the state
    alone and output zeros); it runs while tracing, so it is written for clarity, not speed.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, lengths: Tensor, w: Tensor, r: Tensor,
                b: Tensor) -> tuple[Tensor, Tensor]:
        steps, batch, _ = x.shape
        hidden = r.shape[-1]
        outputs, finals = [], []
        for direction in range(w.shape[0]):
            h = x.new_zeros(batch, hidden)
            c = x.new_zeros(batch, hidden)
            out = x.new_zeros(steps, batch, hidden)
            order = range(steps) if direction == 0 else range(steps - 1, -1, -1)
            bias = b[direction, : 4 * hidden] + b[direction, 4 * hidden:]
            for t in order:
                gates = x[t] @ w[direction].T + h @ r[direction].T + bias
                i, o, f, cell = gates.chunk(4, dim=-1)
                c_next = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(cell)
                h_next = torch.sigmoid(o) * torch.tanh(c_next)
                live = (t < lengths).unsqueeze(1)
                c = torch.where(live, c_next, c)
                h = torch.where(live, h_next, h)
                out[t] = torch.where(live, h_next, torch.zeros_like(h_next))
            outputs.append(out)
            finals.append(h)
        return torch.cat(outputs, dim=-1), torch.stack(finals)

    @staticmethod
    def symbolic(g: Any, x: Any, lengths: Any, w: Any, r: Any, b: Any) -> tuple[Any, Any]:
        from torch.onnx import symbolic_helper

        directions, hidden4, _ = symbolic_helper._get_tensor_sizes(w)
        lens = g.op("Cast", lengths, to_i=6)  # INT32, what sequence_lens must be
        out, last, _ = g.op("LSTM", x, w, r, b, lens, hidden_size_i=hidden4 // 4,
                            direction_s="bidirectional" if directions == 2 else "forward",
                            outputs=3)
        # (L, directions, B, H) -> (L, B, directions * H), the next layer's input
        out = g.op("Transpose", out, perm_i=[0, 2, 1, 3])
        out = g.op("Reshape", out, g.op("Constant", value_t=torch.tensor([0, 0, -1])))
        return out, last
