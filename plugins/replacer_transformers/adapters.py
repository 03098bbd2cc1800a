"""Adapters for the transformers families with their own layout: BERT-style self-attention (the output
projection in a sibling module), Llama-style q/k/v/o projections, GPT-2's fused Conv1D projection.
These also build head-level hybrids; every other family goes through `structural`."""

from __future__ import annotations

from torch import nn

from replacer.graph.adapter import ReplacedAttention
from replacer.graph.site import LinearWeights, Site
from replacer.mixer import Mixer
from replacer_transformers.convention import (
    HFAdapter, HFReplacedAttention, expand_kv_heads, first_parameter, from_transformers, reject_cross_attention, rope_note,
)
from replacer_transformers.hybrid import HFHybridAttention


class HFSelfAttentionAdapter(HFAdapter):
    """BERT-style `*SelfAttention` (query/key/value; the output projection lives in a sibling module)."""

    name = "hf-self-attention"

    def matches(self, module: nn.Module) -> bool:
        """BERT's layout and convention exactly; look-alikes that differ (an output projection inside, other
        head attributes, another call) are left to the structural adapter, which says what differs."""
        return (
            from_transformers(module) and not isinstance(getattr(module, "dense", None), nn.Linear)
            and all(isinstance(getattr(module, p, None), nn.Linear) for p in ("query", "key", "value"))
            and all(isinstance(getattr(module, a, None), int) for a in ("num_attention_heads", "attention_head_size"))
            and first_parameter(module) == "hidden_states"
        )

    def describe(self, name: str, module: nn.Module, layer_index: int) -> Site:
        reject_cross_attention(name, module)
        return Site(
            name=name, cls=type(module).__name__, adapter=self.name, layer_index=layer_index,
            d_model=module.query.in_features, num_heads=module.num_attention_heads,
            head_dim=module.attention_head_size, num_kv_heads=module.num_attention_heads,
            causal=bool(getattr(module, "is_causal", False)),
        )

    def value_projection(self, module: nn.Module, site: Site) -> LinearWeights:
        v = module.value
        return LinearWeights(v.weight.detach(), None if v.bias is None else v.bias.detach())

    def wrap(self, site: Site, module: nn.Module, mixer: Mixer) -> ReplacedAttention:
        return HFReplacedAttention(site, mixer, module)

    def wrap_heads(self, site: Site, module: nn.Module, mixer: Mixer, heads: list[int]) -> ReplacedAttention:
        return HFHybridAttention(site, mixer, module, heads, projections=("query", "key", "value"), kept=())


class HFProjectedAttentionAdapter(HFAdapter):
    """Llama-style attention with q/k/v/o projections (Llama, Mistral, Qwen, ViT/DeiT in transformers 5, ...)."""

    name = "hf-qkvo-attention"

    def matches(self, module: nn.Module) -> bool:
        return from_transformers(module) and all(
            isinstance(getattr(module, p, None), nn.Linear) for p in ("q_proj", "k_proj", "v_proj", "o_proj")
        )

    def describe(self, name: str, module: nn.Module, layer_index: int) -> Site:
        reject_cross_attention(name, module)
        config = module.config
        heads = getattr(module, "num_heads", None) or getattr(module, "num_attention_heads", None)
        heads = heads or config.num_attention_heads
        head_dim = getattr(module, "head_dim", None) or module.q_proj.out_features // heads
        kv_heads = module.v_proj.out_features // head_dim
        return Site(
            name=name, cls=type(module).__name__, adapter=self.name, layer_index=layer_index,
            d_model=module.q_proj.in_features, num_heads=heads, head_dim=head_dim, num_kv_heads=kv_heads,
            causal=bool(getattr(module, "is_causal", False)),
            note=rope_note(module),
        )

    def value_projection(self, module: nn.Module, site: Site) -> LinearWeights:
        v = module.v_proj
        weight = expand_kv_heads(v.weight.detach(), site.num_kv_heads, site.num_heads)
        bias = None if v.bias is None else expand_kv_heads(v.bias.detach(), site.num_kv_heads, site.num_heads)
        return LinearWeights(weight, bias)

    def wrap(self, site: Site, module: nn.Module, mixer: Mixer) -> ReplacedAttention:
        return HFReplacedAttention(site, mixer, module, kept=("o_proj",))

    def wrap_heads(self, site: Site, module: nn.Module, mixer: Mixer, heads: list[int]) -> ReplacedAttention:
        return HFHybridAttention(site, mixer, module, heads)


class GPT2AttentionAdapter(HFAdapter):
    """GPT-2 attention: fused `c_attn` and `c_proj` Conv1D (weights stored as in x out)."""

    name = "hf-gpt2-attention"

    def matches(self, module: nn.Module) -> bool:
        return from_transformers(module) and type(module).__name__ == "GPT2Attention"

    def describe(self, name: str, module: nn.Module, layer_index: int) -> Site:
        reject_cross_attention(name, module)
        return Site(
            name=name, cls="GPT2Attention", adapter=self.name, layer_index=layer_index,
            d_model=module.embed_dim, num_heads=module.num_heads, head_dim=module.head_dim,
            num_kv_heads=module.num_heads, causal=True,
        )

    def value_projection(self, module: nn.Module, site: Site) -> LinearWeights:
        width = site.out_dim
        weight = module.c_attn.weight[:, 2 * width : 3 * width].detach().t()
        return LinearWeights(weight, module.c_attn.bias[2 * width : 3 * width].detach())

    def wrap(self, site: Site, module: nn.Module, mixer: Mixer) -> ReplacedAttention:
        return HFReplacedAttention(site, mixer, module, kept=("c_proj", "resid_dropout"))
