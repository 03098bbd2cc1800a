"""The conv mixer passes replacer's conformance kit and works inside real model families."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import replacer
from replacer.testing import check_mixer


@pytest.mark.parametrize("window", [2, 4, 5])
def test_conformance(window):
    check_mixer("conv", options={"window": window})


def test_generate_with_a_replaced_decoder_equals_full_recompute():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    student = replacer.replace(LlamaForCausalLM(config).eval(), plugin="conv", options={"window": 3})
    ids = torch.randint(1, 100, (1, 5))
    generated = student.generate(ids, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    recomputed = ids
    for _ in range(6):
        next_token = student(recomputed, use_cache=False).logits[:, -1:].argmax(-1)
        recomputed = torch.cat((recomputed, next_token), 1)
    assert torch.equal(generated, recomputed)


def test_bad_option_is_one_clear_error():
    with pytest.raises(replacer.OptionsError, match="window"):
        replacer.replace(LlamaForCausalLM(LlamaConfig(vocab_size=10, hidden_size=8, intermediate_size=8,
                         num_hidden_layers=1, num_attention_heads=2)), plugin="conv", options={"window": 0})
