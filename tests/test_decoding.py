"""generate() on replaced causal LMs: the mixer state lives in the model's cache and decoding is exact."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import replacer
from conftest import tiny_gpt2, tiny_llama
from replacer_transformers.cache import MixerStateLayer, cache_argument_name, cache_bytes

FACTORIES = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def greedy_by_full_recompute(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    for _ in range(steps):
        logits = model(ids, use_cache=False).logits
        ids = torch.cat((ids, logits[:, -1:].argmax(-1)), dim=1)
    return ids


@pytest.mark.parametrize("plugin", ["lstm", "gru", "ssm"])
@pytest.mark.parametrize("family", sorted(FACTORIES))
@pytest.mark.parametrize("sites", [None, [1]], ids=["all", "half"])
def test_greedy_generate_equals_full_recompute(family, sites, plugin):
    torch.manual_seed(0)
    student = replacer.replace(FACTORIES[family]().eval(), plugin=plugin, sites=sites)
    ids = torch.randint(1, 100, (1, 6))
    generated = student.generate(ids, max_new_tokens=8, do_sample=False, min_new_tokens=8)
    assert generated.shape == (1, 14)
    torch.testing.assert_close(generated, greedy_by_full_recompute(student, ids, 8))


def test_cache_holds_mixer_state_not_keys():
    torch.manual_seed(0)
    student = replacer.replace(tiny_llama().eval(), sites=[0])
    cache = DynamicCache(config=student.config)
    student(torch.randint(1, 100, (2, 5)), use_cache=True, **{cache_argument_name(student): cache})
    assert isinstance(cache.layers[0], MixerStateLayer) and cache.layers[0].keys is None
    assert cache.layers[0].get_seq_length() == cache.layers[1].get_seq_length() == 5
    h, c = cache.layers[0].state
    assert h.shape == c.shape == (2, 4, 8)  # batch, heads, hidden: constant in the sequence length
    held = cache_bytes(cache)
    assert held["mixer_state"] == 2 * 2 * 4 * 8 * 4  # h and c, fp32
    assert held["kv"] == 2 * 2 * 2 * 5 * 8 * 4  # keys and values of layer 1: batch 2, 2 KV heads, 5 tokens, dim 8


@pytest.mark.parametrize("plugin", ["lstm", "gru", "ssm"])
def test_left_padded_batch_generates_like_each_row_alone(plugin):
    torch.manual_seed(0)
    student = replacer.replace(tiny_llama().eval(), plugin=plugin)
    short, long = torch.randint(1, 100, (1, 3)), torch.randint(1, 100, (1, 6))
    ids = torch.cat((torch.cat((torch.zeros(1, 3, dtype=torch.long), short), 1), long))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    batch = student.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, min_new_tokens=5)
    alone = student.generate(short, max_new_tokens=5, do_sample=False, min_new_tokens=5)
    torch.testing.assert_close(batch[0, 3:], alone[0])


@pytest.mark.parametrize("plugin", ["lstm", "ssm"])
@pytest.mark.parametrize("family", sorted(FACTORIES))
@pytest.mark.parametrize("sites", [None, [1]], ids=["all", "half"])
def test_beam_search_with_the_cache_equals_beam_search_recomputing(family, sites, plugin):
    """Beam search reorders the cache by beam after every step; without a cache every step recomputes the
    whole prefix, so the two agree only if each beam's mixer state follows its beam."""
    torch.manual_seed(0)
    student = replacer.replace(FACTORIES[family]().eval(), plugin=plugin, sites=sites)
    ids = torch.randint(1, 100, (2, 4))
    options = dict(max_new_tokens=6, min_new_tokens=6, num_beams=3, num_return_sequences=2, do_sample=False,
                   return_dict_in_generate=True, output_scores=True)
    cached = student.generate(ids, use_cache=True, **options)
    recomputed = student.generate(ids, use_cache=False, **options)
    assert cached.sequences.shape == (4, 10)
    torch.testing.assert_close(cached.sequences, recomputed.sequences)
    torch.testing.assert_close(cached.sequences_scores, recomputed.sequences_scores, atol=1e-4, rtol=1e-4)


def test_reordering_the_cache_moves_each_rows_state_with_it():
    torch.manual_seed(0)
    student = replacer.replace(tiny_llama().eval(), sites=[0])
    cache = DynamicCache(config=student.config)
    student(torch.randint(1, 100, (3, 5)), use_cache=True, **{cache_argument_name(student): cache})
    before = [t.clone() for t in cache.layers[0].state]
    cache.reorder_cache(torch.tensor([2, 2, 0]))
    for old, new in zip(before, cache.layers[0].state):
        torch.testing.assert_close(new, old[[2, 2, 0]])
