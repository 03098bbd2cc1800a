"""Adapters for Hugging Face transformers attention classes (transformers >= 5 calling conventions)."""

from __future__ import annotations

import contextlib
import inspect
from typing import ContextManager, Iterator

import torch
from torch import nn

from replacer.errors import UnsupportedCallError
from replacer.graph.adapter import Adapter, ReplacedAttention, Unsupported, padding_from_attention_mask
from replacer.graph.site import LinearWeights, Site
from replacer.mixer import Mixer
from replacer_transformers.cache import cache_from_call


def _from_transformers(module: nn.Module) -> bool:
    return type(module).__module__.startswith("transformers.")


def _reject_cross_attention(module: nn.Module) -> None:
    if getattr(module, "is_cross_attention", False) or "CrossAttention" in type(module).__name__:
        raise Unsupported("cross-attention reads a second sequence; a sequence mixer has only one input")


def _expand_kv_heads(weight: torch.Tensor, kv_heads: int, heads: int) -> torch.Tensor:
    """(kv_heads * hd, ...) -> (heads * hd, ...): each query head gets the KV head its group shares."""
    grouped = weight.reshape(kv_heads, -1, *weight.shape[1:])
    return grouped.repeat_interleave(heads // kv_heads, dim=0).reshape(-1, *weight.shape[1:])


def _rope_note(module: nn.Module) -> str:
    takes_rope = "position_embeddings" in inspect.signature(module.forward).parameters
    return "rotary position embedding dropped: the recurrence carries order" if takes_rope else ""


@contextlib.contextmanager
def _attention_implementation(module: nn.Module, name: str) -> Iterator[None]:
    """The module's config switched to another registered attention implementation for the duration."""
    config = getattr(module, "config", None)
    if config is None or not hasattr(config, "_attn_implementation"):
        raise Unsupported(f"{type(module).__name__} keeps no config, so its attention implementation cannot be switched")
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous


@contextlib.contextmanager
def _record_eager_attention(module: nn.Module) -> Iterator[list[torch.Tensor]]:
    """transformers attention returns `(output, weights)`; weights are only computed by the eager
    implementation, so the module runs eager for the duration."""
    recorded: list[torch.Tensor] = []

    def keep(module: nn.Module, _args: tuple, output: tuple) -> None:
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if not isinstance(weights, torch.Tensor):
            raise Unsupported(f"{type(module).__name__} returns no attention probabilities, even when run eagerly")
        recorded.append(weights.detach())

    handle = module.register_forward_hook(keep)
    try:
        with _attention_implementation(module, "eager"):
            yield recorded
    finally:
        handle.remove()


@contextlib.contextmanager
def _top_k_attention(module: nn.Module, top_k: int) -> Iterator[None]:
    """replacer's registered top-k attention (and eager-style masks) for the duration."""
    from replacer_transformers.sparse_attention import NAME

    module.replacer_top_k = top_k
    try:
        with _attention_implementation(module, NAME):
            yield
    finally:
        del module.replacer_top_k


class HFAdapter(Adapter):
    """What every transformers adapter shares: attention recorded and sparsified through the model's
    attention interface (eager for recording, replacer's top-k function for sparsifying)."""

    def record_attention(self, module: nn.Module) -> ContextManager[list[torch.Tensor]]:
        return _record_eager_attention(module)

    def sparsify_attention(self, module: nn.Module, top_k: int) -> ContextManager[None]:
        return _top_k_attention(module, top_k)


class HFReplacedAttention(ReplacedAttention):
    """Shared calling convention: `(hidden_states, ..., attention_mask, cache) -> (out, None)`.

    On causal sites called with a cache, the mixer continues from the state kept in that cache
    (one `MixerStateLayer` at this layer's index), so `generate()` decodes at constant cost.
    """

    def __init__(self, site: Site, mixer: Mixer, original: nn.Module, kept: tuple[str, ...] = ()) -> None:
        super().__init__(site, mixer, original, kept)
        self.cache_index = getattr(original, "layer_idx", None)
        self._tail = kept

    def project(self, y: torch.Tensor) -> torch.Tensor:
        """The kept output path, applied in order (empty when the projection lives outside the site)."""
        for attr in self._tail:
            y = getattr(self, attr)(y)
        return y

    def read_call(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self._read(self.arguments(args, kwargs))

    @staticmethod
    def _read(call: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = call["hidden_states"]
        mask = call.get("attention_mask", call.get("mask"))  # T5 names it `mask`
        return x, padding_from_attention_mask(mask, x.shape[0], x.shape[1])

    def complete(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The site's output from its input `x` and the mixer's output `y`: the kept output path."""
        return self.project(y)

    def mix(self, x: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
        return self.complete(x, self.mixer(x, padding))

    def output(self, call: dict) -> torch.Tensor:
        """The main output of one call; with a cache on a causal site, the mixer continues from its state."""
        x, padding = self._read(call)
        cache = cache_from_call(call)
        if cache is not None and self.mixer.causal:
            from replacer_transformers.cache import state_slot

            if self.cache_index is None:
                raise UnsupportedCallError(f"site '{self.site.name}' got a cache but has no layer index to key it")
            layer = state_slot(cache, self.cache_index)
            y, layer.state = self.mixer.forward_stateful(x, layer.state, padding)
            layer.seen += x.shape[1]
            return self.complete(x, y)
        return self.mix(x, padding)

    def forward(self, *args, **kwargs) -> tuple[torch.Tensor, None]:
        return self.output(self.arguments(args, kwargs)), None


class HFSelfAttentionAdapter(HFAdapter):
    """BERT-style `*SelfAttention` (query/key/value; the output projection lives in a sibling module)."""

    name = "hf-self-attention"

    def matches(self, module: nn.Module) -> bool:
        return _from_transformers(module) and not isinstance(getattr(module, "dense", None), nn.Linear) and all(
            isinstance(getattr(module, p, None), nn.Linear) for p in ("query", "key", "value")
        )

    def describe(self, name: str, module: nn.Module, layer_index: int) -> Site:
        _reject_cross_attention(module)
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
        from replacer_transformers.hybrid import HFHybridAttention

        return HFHybridAttention(site, mixer, module, heads, projections=("query", "key", "value"), kept=())


class HFProjectedAttentionAdapter(HFAdapter):
    """Llama-style attention with q/k/v/o projections (Llama, Mistral, Qwen, ViT/DeiT in transformers 5, ...)."""

    name = "hf-qkvo-attention"

    def matches(self, module: nn.Module) -> bool:
        return _from_transformers(module) and all(
            isinstance(getattr(module, p, None), nn.Linear) for p in ("q_proj", "k_proj", "v_proj", "o_proj")
        )

    def describe(self, name: str, module: nn.Module, layer_index: int) -> Site:
        _reject_cross_attention(module)
        config = module.config
        heads = getattr(module, "num_heads", None) or getattr(module, "num_attention_heads", None)
        heads = heads or config.num_attention_heads
        head_dim = getattr(module, "head_dim", None) or module.q_proj.out_features // heads
        kv_heads = module.v_proj.out_features // head_dim
        return Site(
            name=name, cls=type(module).__name__, adapter=self.name, layer_index=layer_index,
            d_model=module.q_proj.in_features, num_heads=heads, head_dim=head_dim, num_kv_heads=kv_heads,
            causal=bool(getattr(module, "is_causal", False)),
            note=_rope_note(module),
        )

    def value_projection(self, module: nn.Module, site: Site) -> LinearWeights:
        v = module.v_proj
        weight = _expand_kv_heads(v.weight.detach(), site.num_kv_heads, site.num_heads)
        bias = None if v.bias is None else _expand_kv_heads(v.bias.detach(), site.num_kv_heads, site.num_heads)
        return LinearWeights(weight, bias)

    def wrap(self, site: Site, module: nn.Module, mixer: Mixer) -> ReplacedAttention:
        return HFReplacedAttention(site, mixer, module, kept=("o_proj",))

    def wrap_heads(self, site: Site, module: nn.Module, mixer: Mixer, heads: list[int]) -> ReplacedAttention:
        from replacer_transformers.hybrid import HFHybridAttention

        return HFHybridAttention(site, mixer, module, heads)


class GPT2AttentionAdapter(HFAdapter):
    """GPT-2 attention: fused `c_attn` and `c_proj` Conv1D (weights stored as in x out)."""

    name = "hf-gpt2-attention"

    def matches(self, module: nn.Module) -> bool:
        return _from_transformers(module) and type(module).__name__ == "GPT2Attention"

    def describe(self, name: str, module: nn.Module, layer_index: int) -> Site:
        _reject_cross_attention(module)
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
