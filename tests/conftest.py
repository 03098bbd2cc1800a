"""Tiny random-init models, one per supported family, built from configs (no downloads)."""

from __future__ import annotations

import pytest
import timm
import torch
import transformers as T

from replacer.train.allocator import keep_freed_memory
from replacer.testing import main_tensor

T.logging.set_verbosity_error()
keep_freed_memory()  # as the command line does: training tests stop page-faulting their buffers in


def tiny_deit() -> torch.nn.Module:
    return timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10)


def tiny_eva() -> torch.nn.Module:
    return timm.create_model("eva02_tiny_patch14_224", img_size=28, depth=2, num_classes=10)


def tiny_swin() -> torch.nn.Module:
    return timm.create_model(
        "swin_tiny_patch4_window7_224", img_size=56, depths=(1, 1), num_heads=(2, 4), embed_dim=32, num_classes=10
    )


def tiny_bert(**extra) -> T.PreTrainedModel:
    cfg = T.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100, **extra)
    return T.BertModel(cfg)


def tiny_vit() -> T.PreTrainedModel:
    return T.ViTForImageClassification(
        T.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=8, num_labels=3)
    )


def tiny_gpt2() -> T.PreTrainedModel:
    cfg = T.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0)
    return T.GPT2LMHeadModel(cfg)


def tiny_llama() -> T.PreTrainedModel:
    cfg = T.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=100, bos_token_id=0, eos_token_id=None, pad_token_id=0,
    )
    return T.LlamaForCausalLM(cfg)


def image_input(size: int):
    return lambda: ((torch.randn(2, 3, size, size),), {})


def text_input(vocab: int = 100, n: int = 9):
    def make():
        ids = torch.randint(1, vocab, (2, n))
        return (), {"input_ids": ids}

    return make


def vit_input():
    return (), {"pixel_values": torch.randn(2, 3, 32, 32)}


# name -> (factory, inputs, expected sites, causal)
FAMILIES = {
    "timm-deit": (tiny_deit, image_input(32), 2, False),
    "timm-eva": (tiny_eva, image_input(28), 2, False),
    "timm-swin": (tiny_swin, image_input(56), 2, False),
    "hf-bert": (tiny_bert, text_input(), 2, False),
    "hf-vit": (tiny_vit, vit_input, 2, False),
    "hf-gpt2": (tiny_gpt2, text_input(), 2, True),
    "hf-llama": (tiny_llama, text_input(), 2, True),
}


output_tensor = main_tensor  # the kit's reader of a model's main output


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    torch.manual_seed(0)
    factory, inputs, n_sites, causal = FAMILIES[request.param]
    return request.param, factory().eval(), inputs, n_sites, causal


def tiny_text_bert() -> T.PreTrainedModel:
    """A tiny random BERT that reads all-MiniLM-L6-v2's tokenizer (same vocabulary size)."""
    torch.manual_seed(0)
    return tiny_bert_with_vocab(30522)


def tiny_bert_with_vocab(vocab: int) -> T.PreTrainedModel:
    cfg = T.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=vocab)
    return T.BertModel(cfg)


def tiny_text_llama() -> T.PreTrainedModel:
    """A tiny random Llama (4 query heads sharing 2 kv heads) that reads all-MiniLM-L6-v2's tokenizer."""
    torch.manual_seed(0)
    cfg = T.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=30522, bos_token_id=101, eos_token_id=102, pad_token_id=0,
    )
    return T.LlamaForCausalLM(cfg)
