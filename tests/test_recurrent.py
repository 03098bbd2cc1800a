"""The per-head recurrent mixers (lstm, gru): the conformance kit, and equality with torch's own cells."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import replacer
from replacer.graph.site import Site
from replacer.testing import check_mixer
from replacer_gru import GRUOptions
from replacer_gru import build as build_gru
from replacer_lstm import LSTMOptions
from replacer_lstm import build as build_lstm

# torch orders LSTM gates [input, forget, candidate, output]; replacer's cell uses [input, forget, output, candidate].
LSTM_FROM_TORCH = [0, 1, 3, 2]
GRU_FROM_TORCH = [0, 1, 2]  # [reset, update, candidate] in both


@pytest.mark.parametrize("plugin", ["lstm", "gru"])
@pytest.mark.parametrize("options", [{}, {"hidden_per_head": 5}, {"init_from_value": False}], ids=["default", "hidden5", "noinit"])
def test_conformance_kit(plugin, options):
    check_mixer(plugin, options)


def single_head_site(width: int, causal: bool) -> Site:
    return Site(name="s", cls="X", adapter="a", layer_index=0, d_model=width, num_heads=1, head_dim=width,
                num_kv_heads=1, causal=causal)


def _blocks(weight: torch.Tensor, order: list[int]) -> torch.Tensor:
    """Reorder torch's stacked gate blocks (k*h, ...) into replacer's order."""
    return torch.cat([weight.chunk(len(order))[i] for i in order])


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_equals_torch_recurrent_layer_with_the_same_weights(kind, bidirectional):
    """One head, identity input projection: the grouped recurrence must be exactly nn.LSTM / nn.GRU."""
    torch.manual_seed(0)
    width = 6
    site = single_head_site(width, causal=False)
    reference = (nn.LSTM if kind == "lstm" else nn.GRU)(width, width, batch_first=True, bidirectional=bidirectional)
    if kind == "lstm":
        mixer, order = build_lstm(site, LSTMOptions(bidirectional=bidirectional), None), LSTM_FROM_TORCH
    else:
        mixer, order = build_gru(site, GRUOptions(bidirectional=bidirectional), None), GRU_FROM_TORCH
    directions = 2 if bidirectional else 1
    with torch.no_grad():
        mixer.in_proj.weight.copy_(torch.eye(width))
        mixer.in_proj.bias.zero_()
        for d, suffix in enumerate(["", "_reverse"][:directions]):
            w_ih, w_hh = getattr(reference, f"weight_ih_l0{suffix}"), getattr(reference, f"weight_hh_l0{suffix}")
            b_ih, b_hh = getattr(reference, f"bias_ih_l0{suffix}"), getattr(reference, f"bias_hh_l0{suffix}")
            mixer.weight_ih[d].copy_(_blocks(w_ih, order).t())  # one head: group d is direction d
            mixer.weight_hh[d].copy_(_blocks(w_hh, order).t())
            if kind == "lstm":
                mixer.bias[d].copy_(_blocks(b_ih + b_hh, order))
            else:
                mixer.bias[d].copy_(_blocks(b_ih, order))
                mixer.bias_hh[d].copy_(_blocks(b_hh, order))
    x = torch.randn(2, 7, width)
    expected = reference(x)[0]  # (B, N, directions * width)
    for d in range(directions):  # read each direction out through the merge map
        with torch.no_grad():
            for g, merge in enumerate(mixer.merge_weight):
                merge.copy_(torch.eye(width) if g == d else torch.zeros(width, width))
            mixer.merge_bias.zero_()
        torch.testing.assert_close(mixer(x), expected[..., d * width : (d + 1) * width], atol=1e-5, rtol=1e-5)


def test_gru_is_lighter_than_lstm_at_the_same_width():
    model = replacer.load_model("conftest:tiny_deit", pretrained=False)
    lstm = replacer.count_parameters(replacer.replace(model, plugin="lstm"))
    gru = replacer.count_parameters(replacer.replace(model, plugin="gru"))
    assert gru < lstm
