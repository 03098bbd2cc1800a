"""The adapter conformance kit on every built-in family, and that it catches a broken adapter."""

from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES, tiny_bert, tiny_deit
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
