"""The BiLSTM's padded-batch LSTM (``bilstm.final_states``) computes what torch's LSTM
computes on the packed rows: the same final states and the same gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from kdpipe.models import bilstm

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LENGTHS = [9, 1, 4, 5, 9, 2, 7]  # unsorted, one single-token row, two unpadded rows


def packed_final_states(lstm: nn.LSTM, x: torch.Tensor, lengths: torch.Tensor):
    """torch's own route, written out here rather than taken from the module under test."""
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    return lstm(packed)[1][0]


def padded_rows(seed: int, width: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Random rows (B, 9, width) whose padding steps hold large values: reading any of them
    would show."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(LENGTHS)
    x = torch.randn(len(LENGTHS), max(LENGTHS), width, generator=gen)
    padding = torch.arange(x.shape[1])[None, :] >= lengths[:, None]
    return x.masked_fill(padding[:, :, None], 50.0), lengths


@pytest.mark.parametrize(("layers", "bidirectional", "bias"),
                         [(1, True, True), (2, True, True), (3, True, False), (2, False, True)])
def test_padded_states_and_gradients_equal_the_packed_ones(layers, bidirectional, bias):
    torch.manual_seed(layers)
    lstm = nn.LSTM(5, 4, num_layers=layers, bias=bias, batch_first=True,
                   bidirectional=bidirectional)
    x, lengths = padded_rows(layers)
    x.requires_grad_(True)
    want = packed_final_states(lstm, x, lengths)
    got = bilstm.final_states(lstm, x, lengths)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    weights = torch.randn_like(want)  # a loss that weighs every state differently
    inputs = [x, *lstm.parameters()]
    want_grads = torch.autograd.grad((want * weights).sum(), inputs)
    got_grads = torch.autograd.grad((got * weights).sum(), inputs)
    for name, g, w in zip(["x", *(n for n, _ in lstm.named_parameters())], got_grads,
                          want_grads, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=0, msg=name)


def test_dropout_between_layers_acts_in_training_only():
    torch.manual_seed(0)
    lstm = nn.LSTM(5, 4, num_layers=2, batch_first=True, bidirectional=True, dropout=0.5)
    x, lengths = padded_rows(0)
    lstm.eval()
    torch.testing.assert_close(bilstm.final_states(lstm, x, lengths),
                               packed_final_states(lstm, x, lengths), atol=1e-6, rtol=0)
    lstm.train()
    trained = bilstm.final_states(lstm, x, lengths)
    lstm.eval()
    evaluated = bilstm.final_states(lstm, x, lengths)
    # the first layer's states are untouched by dropout; the second's see dropped inputs
    torch.testing.assert_close(trained[:2], evaluated[:2], atol=1e-6, rtol=0)
    assert not torch.allclose(trained[2:], evaluated[2:], atol=1e-3)


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor")
def test_other_lstm_modules_get_the_packed_rows():
    """torch's dynamic int8 LSTM takes a PackedSequence only; final_states hands it one."""
    torch.manual_seed(0)
    lstm = nn.LSTM(5, 4, batch_first=True, bidirectional=True)
    int8 = torch.ao.quantization.quantize_dynamic(nn.Sequential(lstm), {nn.LSTM})[0]
    assert type(int8) is not nn.LSTM
    x, lengths = padded_rows(1)
    torch.testing.assert_close(bilstm.final_states(int8, x, lengths),
                               packed_final_states(int8, x, lengths), atol=0, rtol=0)
    torch.testing.assert_close(bilstm.final_states(int8, x, lengths),
                               packed_final_states(lstm, x, lengths), atol=0.05, rtol=0)


def test_the_first_forward_leaves_the_random_stream_alone():
    """Dropout masks after a BiLSTM's first call must not depend on whether it was the
    process's first (a resumed run must repeat an uninterrupted one)."""
    bilstm._one_way_lstm.cache_clear()
    model = bilstm.BiLSTM(30, 7, 0, 5, 1, 2, dropout=0.0)
    ids, mask = torch.randint(1, 30, (3, 4)), torch.ones(3, 4, dtype=torch.long)
    torch.manual_seed(0)
    model(ids, mask)
    after_forward = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(after_forward, torch.rand(3))
