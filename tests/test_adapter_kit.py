"""The adapter conformance kit on every built-in family, and that it catches a broken adapter."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import FAMILIES, tiny_bert, tiny_deit, tiny_llama
from replacer.testing import check_adapter


def padded_text_input():
    ids = torch.randint(1, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0  # the second text is shorter
    return (), {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_builtin_adapter_passes_the_kit(name, tmp_path):
    factory, inputs, _, _ = FAMILIES[name]
    check_adapter(factory, inputs, tmp_dir=str(tmp_path))


def test_padded_text_calls_pass_the_kit(tmp_path):
    check_adapter(tiny_bert, padded_text_input, adapter="hf-self-attention", tmp_dir=str(tmp_path))


def test_the_kit_catches_mix_and_forward_disagreeing(monkeypatch, tmp_path):
    from replacer_timm.adapters import TimmReplacedAttention

    def forward(self, *args, **kwargs):
        return self.mix(*self.read_call(args, kwargs)) + 1.0

    monkeypatch.setattr(TimmReplacedAttention, "forward", forward)
    with pytest.raises(AssertionError, match="differs from the installed forward"):
        check_adapter(tiny_deit, FAMILIES["timm-deit"][1], tmp_dir=str(tmp_path))


def test_the_kit_refuses_an_adapter_with_no_sites(tmp_path):
    with pytest.raises(AssertionError, match="no site"):
        check_adapter(tiny_deit, FAMILIES["timm-deit"][1], adapter="hf-qkvo-attention", tmp_dir=str(tmp_path))


# Broken adapters the kit must refuse, each with a message naming the rule it breaks.

def _patch_read(monkeypatch, change):
    from replacer_transformers.convention import HFReplacedAttention

    original = HFReplacedAttention._read
    monkeypatch.setattr(HFReplacedAttention, "_read", staticmethod(lambda call: change(*original(call))))


def test_the_kit_catches_a_read_that_drops_the_padding_mask(monkeypatch, tmp_path):
    _patch_read(monkeypatch, lambda x, keep: (x, None))
    with pytest.raises(AssertionError, match="padding mask must be True at real tokens and False at padding, got None"):
        check_adapter(tiny_bert, padded_text_input, tmp_dir=str(tmp_path))


def test_the_kit_catches_a_forward_that_ignores_the_padding_mask(monkeypatch, tmp_path):
    from replacer_transformers.convention import HFReplacedAttention

    original = HFReplacedAttention.output
    monkeypatch.setattr(HFReplacedAttention, "output", lambda self, call: original(self, {**call, "attention_mask": None}))
    with pytest.raises(AssertionError, match="padding changed real tokens' outputs"):
        check_adapter(tiny_bert, FAMILIES["hf-bert"][1], tmp_dir=str(tmp_path))


def test_the_kit_catches_an_inverted_padding_mask(monkeypatch, tmp_path):
    _patch_read(monkeypatch, lambda x, keep: (x, None if keep is None else ~keep))
    with pytest.raises(AssertionError, match="padding mask must be True at real tokens and False at padding"):
        check_adapter(tiny_bert, padded_text_input, tmp_dir=str(tmp_path))


def test_the_kit_catches_a_read_call_that_drops_the_mask_distillation_reads(monkeypatch, tmp_path):
    from replacer_transformers.convention import HFReplacedAttention

    original = HFReplacedAttention.read_call
    monkeypatch.setattr(HFReplacedAttention, "read_call", lambda self, a, k: (original(self, a, k)[0], None))
    with pytest.raises(AssertionError, match="padding mask must be True at real tokens and False at padding"):
        check_adapter(tiny_bert, FAMILIES["hf-bert"][1], tmp_dir=str(tmp_path))


def _patch_causal(monkeypatch, adapter_cls, causal: bool):
    original = adapter_cls.describe
    monkeypatch.setattr(adapter_cls, "describe", lambda self, *a, **k: dataclasses.replace(original(self, *a, **k), causal=causal))


def test_the_kit_catches_a_causal_model_reported_bidirectional(monkeypatch, tmp_path):
    from replacer_transformers.adapters import HFProjectedAttentionAdapter

    _patch_causal(monkeypatch, HFProjectedAttentionAdapter, False)
    with pytest.raises(AssertionError, match="calls this site bidirectional, but it is causal"):
        check_adapter(tiny_llama, FAMILIES["hf-llama"][1], tmp_dir=str(tmp_path))


def test_the_kit_catches_a_bidirectional_model_reported_causal(monkeypatch, tmp_path):
    from replacer_transformers.adapters import HFSelfAttentionAdapter

    _patch_causal(monkeypatch, HFSelfAttentionAdapter, True)
    with pytest.raises(AssertionError, match="calls this site causal, but it is bidirectional"):
        check_adapter(tiny_bert, FAMILIES["hf-bert"][1], tmp_dir=str(tmp_path))


class Wrapped(torch.nn.Module):
    """A model of a class no plugin describes: reloading it needs base=."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = tiny_bert()

    def forward(self, input_ids):
        return self.inner(input_ids=input_ids).last_hidden_state


def test_the_kit_names_the_hook_a_model_without_an_origin_lacks(tmp_path):
    inputs = FAMILIES["hf-bert"][1]
    with pytest.raises(AssertionError, match="without base= cannot rebuild a Wrapped: .*replacer_describe_model"):
        check_adapter(Wrapped, inputs, tmp_dir=str(tmp_path))
    check_adapter(Wrapped, inputs, tmp_dir=str(tmp_path), rebuild=False)  # users who always pass base= may say so


@pytest.mark.parametrize("method, broken, rule", [
    ("describe", lambda site: dataclasses.asdict(site), "describe must return a Site"),
    ("value_projection", lambda value: value.weight, "value_projection must return LinearWeights or None"),
    ("matches", lambda answer: "yes" if answer else "", "matches must return a bool"),
])
def test_the_kit_names_the_method_that_returns_the_wrong_type(monkeypatch, tmp_path, method, broken, rule):
    from replacer_timm.adapters import TimmAttentionAdapter

    original = getattr(TimmAttentionAdapter, method)
    monkeypatch.setattr(TimmAttentionAdapter, method, lambda self, *a, **k: broken(original(self, *a, **k)))
    with pytest.raises(AssertionError, match=rule):
        check_adapter(tiny_deit, FAMILIES["timm-deit"][1], tmp_dir=str(tmp_path))


def test_the_kit_names_a_read_call_that_returns_the_wrong_type(monkeypatch, tmp_path):
    from replacer_timm.adapters import TimmReplacedAttention

    original = TimmReplacedAttention.read_call
    monkeypatch.setattr(TimmReplacedAttention, "read_call", lambda self, a, k: original(self, a, k)[0])
    with pytest.raises(AssertionError, match="read_call must return \\(input, padding mask\\)"):
        check_adapter(tiny_deit, FAMILIES["timm-deit"][1], tmp_dir=str(tmp_path))


def test_integer_four_dimensional_masks_read_as_padding():
    """DeBERTa hands its layers a (B, 1, N, N) integer mask, 1 where a query may attend a key."""
    from replacer.graph.adapter import padding_from_attention_mask

    keep = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    square = (keep[:, None, :, None] * keep[:, None, None, :]).to(torch.uint8)
    assert padding_from_attention_mask(square, 2, 4).tolist() == keep.bool().tolist()
    assert padding_from_attention_mask(torch.ones(2, 1, 4, 4, dtype=torch.long), 2, 4) is None
