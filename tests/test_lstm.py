"""lstm specifics: options and their errors (padding, causality and state: tests/test_recurrent.py)."""

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
