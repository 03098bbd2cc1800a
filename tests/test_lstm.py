"""The reference mixer: padding, causality, carried state and options."""

from __future__ import annotations

import pytest
import torch

import replacer
from replacer.graph.site import Site
from replacer_lstm import LSTMOptions, build


def site(causal: bool = False) -> Site:
    return Site(name="s", cls="X", adapter="a", layer_index=0, d_model=12, num_heads=3, head_dim=4,
                num_kv_heads=3, causal=causal)


def mixer(causal: bool = False, **options):
    torch.manual_seed(0)
    return build(site(causal), LSTMOptions(**options), None).eval()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("side", ["right", "left", "middle"])
def test_padded_tokens_never_change_real_tokens(causal, side):
    m = mixer(causal)
    real = torch.randn(1, 6, 12)
    pad = torch.randn(1, 3, 12) * 10
    if side == "right":
        x, keep = torch.cat((real, pad), 1), torch.tensor([[1] * 6 + [0] * 3])
    elif side == "left":
        x, keep = torch.cat((pad, real), 1), torch.tensor([[0] * 3 + [1] * 6])
    else:
        x, keep = torch.cat((real[:, :2], pad, real[:, 2:]), 1), torch.tensor([[1, 1, 0, 0, 0, 1, 1, 1, 1]])
    keep = keep.bool()
    out = m(x, keep)
    torch.testing.assert_close(out[:, keep[0]], m(real), atol=1e-6, rtol=1e-5)
    assert out[0, ~keep[0]].abs().max() == 0


def test_bidirectional_reads_both_ways_and_causal_only_the_past():
    x = torch.randn(1, 8, 12)
    later = x.clone()
    later[:, 5:] += 1.0
    bi, uni = mixer(False), mixer(True)
    assert bi.directions == 2 and uni.directions == 1
    assert not torch.allclose(bi(x)[:, :5], bi(later)[:, :5]), "a bidirectional mixer must see later tokens"
    torch.testing.assert_close(uni(x)[:, :5], uni(later)[:, :5], atol=0, rtol=0)
    assert not torch.allclose(uni(x)[:, 5:], uni(later)[:, 5:])


def test_state_carried_in_pieces_equals_the_whole_sequence():
    m = mixer(True)
    x = torch.randn(2, 10, 12)
    whole = m(x)
    y1, state = m.forward_stateful(x[:, :4], None)
    y2, state = m.forward_stateful(x[:, 4:5], state)
    y3, state = m.forward_stateful(x[:, 5:], state)
    torch.testing.assert_close(torch.cat((y1, y2, y3), 1), whole, atol=1e-6, rtol=1e-5)
    assert all(s.shape[0] == 2 for s in state), "state tensors are batch-first"


def test_bidirectional_mixer_has_no_state():
    with pytest.raises(TypeError, match="cannot carry state"):
        mixer(False).forward_stateful(torch.randn(1, 3, 12), None)


def test_hidden_size_and_output_width():
    m = mixer(False, hidden_per_head=5)
    assert m.hidden == 5
    assert m(torch.randn(2, 7, 12)).shape == (2, 7, 12)


def test_option_errors_are_one_line_and_name_the_field():
    spec = replacer.get_registry().mixer("lstm")
    with pytest.raises(replacer.OptionsError, match=r"option 'hidden_per_head': Input should be greater than 0 \(got -1\)"):
        spec.validate_options({"hidden_per_head": -1})
    with pytest.raises(replacer.OptionsError, match="option 'hiden': Extra inputs are not permitted.*accepted options: hidden_per_head"):
        spec.validate_options({"hiden": 3})
    with pytest.raises(replacer.OptionsError, match="impossible at causal site"):
        build(site(True), LSTMOptions(bidirectional=True), None)
