"""Mixer state inside a transformers `Cache`, so `generate()` carries it like it carries keys and values.

A replaced causal layer swaps its cache slot for a `MixerStateLayer`: it holds the mixer's state
instead of a growing key/value tensor (a head-level hybrid's `HybridCacheLayer` holds both), and reports how many tokens it has consumed, so the model's
position and mask bookkeeping (which read the cache's sequence length) stay right even when every
attention layer is replaced.
"""

from __future__ import annotations

from typing import TypeVar

import torch
from transformers.cache_utils import Cache, DynamicLayer, EncoderDecoderCache

from replacer.mixer import MixerState, repeat_state, select_state


class MixerStateLayer(DynamicLayer):
    is_croppable = False

    def __init__(self) -> None:
        super().__init__()
        self.state: MixerState | None = None
        self.seen = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        raise RuntimeError("this cache layer belongs to a replaced site: it holds mixer state, not keys and values")

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def reset(self) -> None:
        self.state, self.seen = None, 0

    def crop(self, tokens_to_remove: int) -> None:
        raise RuntimeError("a recurrent state cannot be rewound; assisted decoding needs attention layers")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.state is not None:
            self.state = select_state(self.state, beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.state is not None:
            self.state = select_state(self.state, indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.state is not None:
            self.state = repeat_state(self.state, repeats)

    def offload(self) -> None:
        if self.state is not None:
            self.state = tuple(s.to("cpu", non_blocking=True) for s in self.state)

    def prefetch(self) -> None:
        pass  # the state moves back to the mixer's device on first use


class HybridCacheLayer(DynamicLayer):
    """A head-level hybrid's slot: keys and values of the kept kv heads, plus the mixer's state."""

    is_croppable = False

    def __init__(self) -> None:
        super().__init__()
        self.state: MixerState | None = None

    def reset(self) -> None:
        super().reset()
        self.state = None

    def crop(self, tokens_to_remove: int) -> None:
        raise RuntimeError("a recurrent state cannot be rewound; assisted decoding needs attention layers")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.state is not None:
            self.state = select_state(self.state, beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.state is not None:
            self.state = select_state(self.state, indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.state is not None:
            self.state = repeat_state(self.state, repeats)


SlotT = TypeVar("SlotT", MixerStateLayer, HybridCacheLayer)


def state_slot(cache: Cache, index: int, kind: type[SlotT] = MixerStateLayer) -> SlotT:
    """Layer `index`'s slot, turned into `kind` on first use (before it holds any keys)."""
    if isinstance(cache, EncoderDecoderCache):
        cache = cache.self_attention_cache
    while len(cache.layers) <= index:
        if cache.layer_class_to_replicate is None:
            raise RuntimeError(f"the cache has {len(cache.layers)} layers; layer {index} is out of range")
        cache.layers.append(cache.layer_class_to_replicate())
    layer = cache.layers[index]
    if not isinstance(layer, kind):
        if layer.get_seq_length() > 0:
            raise RuntimeError(f"cache layer {index} already holds keys: it was filled before the site was replaced")
        layer = cache.layers[index] = kind()
    return layer


def cache_bytes(cache: Cache) -> dict[str, int]:
    """Bytes a cache holds: keys and values of attention layers, and mixer state of replaced ones."""
    if isinstance(cache, EncoderDecoderCache):
        cache = cache.self_attention_cache
    held = {"kv": 0, "mixer_state": 0}
    for layer in cache.layers:  # attention layers hold keys and values, replaced ones state, hybrids both
        held["mixer_state"] += sum(s.numel() * s.element_size() for s in getattr(layer, "state", None) or ())
        if not isinstance(layer, MixerStateLayer):
            held["kv"] += sum(t.numel() * t.element_size() for t in (layer.keys, layer.values) if t is not None)
    return held


def cache_argument_name(model: torch.nn.Module) -> str:
    """The keyword a model's forward takes its cache under (`cache` from transformers 5.2x, before: `past_key_values`)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def cache_from_call(call: dict) -> Cache | None:
    """The layer's cache: transformers >= 5.2x passes it as `cache`, earlier 5.x as `past_key_values`."""
    extra = call.get("kwargs") or {}
    for key in ("cache", "past_key_values"):
        found = call.get(key, extra.get(key))
        if found is not None:
            return found
    return None


def cache_footprint(model: torch.nn.Module, batch: dict) -> dict[str, int] | None:
    """Bytes a transformers decoder's cache holds after reading `batch` (None for other models)."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        return None
    out = model(**batch, use_cache=True)
    cache = out.get("cache", out.get("past_key_values"))  # renamed to `cache` in transformers 5.2x
    return None if cache is None else cache_bytes(cache)
