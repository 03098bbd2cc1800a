"""What transformers attention adapters share: the calling convention of transformers 5 (hidden states
in, the attention output first in the returned tuple), recording and sparsifying attention through
the model's attention interface, and small readers of modules and projections."""

from __future__ import annotations

import contextlib
import inspect
from typing import ContextManager, Iterator

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from replacer.errors import UnsupportedCallError
from replacer.graph.adapter import Adapter, ReplacedAttention, Unsupported, padding_from_attention_mask
from replacer.graph.site import Site
from replacer.mixer import Mixer
from replacer_transformers.cache import cache_from_call


def from_transformers(module: nn.Module) -> bool:
    return type(module).__module__.startswith("transformers.")


def first_parameter(module: nn.Module) -> str | None:
    """The name of the first parameter of `module.forward` (`hidden_states` in the shared convention)."""
    params = list(inspect.signature(module.forward).parameters)
    return params[0] if params else None


CROSS_NAMES = ("encoder_attn", "crossattention", "EncDecAttention", "cross_attn", "cross_attention")
"""Attribute names transformers gives cross-attention modules whose class serves self-attention too (BART, T5)."""


def reject_cross_attention(name: str, module: nn.Module) -> None:
    """Refuse cross-attention, told by the module's flag, its class name or the attribute it sits under."""
    flagged = getattr(module, "is_cross_attention", False) or "CrossAttention" in type(module).__name__
    if flagged or name.rpartition(".")[2] in CROSS_NAMES:
        raise Unsupported("cross-attention reads a second sequence; a sequence mixer has only one input")


def expand_kv_heads(weight: torch.Tensor, kv_heads: int, heads: int) -> torch.Tensor:
    """(kv_heads * hd, ...) -> (heads * hd, ...): each query head gets the KV head its group shares."""
    grouped = weight.reshape(kv_heads, -1, *weight.shape[1:])
    return grouped.repeat_interleave(heads // kv_heads, dim=0).reshape(-1, *weight.shape[1:])


def rope_note(module: nn.Module) -> str:
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
    attention interface (eager for recording, replacer's top-k function for sparsifying), and MLPs that may be
    built of transformers' `Conv1D` (GPT-2 and its descendants: a linear map whose weight is (in, out))."""

    linear_classes = (Conv1D,)

    def record_attention(self, module: nn.Module) -> ContextManager[list[torch.Tensor]]:
        return _record_eager_attention(module)

    def sparsify_attention(self, module: nn.Module, top_k: int) -> ContextManager[None]:
        return _top_k_attention(module, top_k)

    def token_embedding(self, model: nn.Module) -> str:
        """The table `get_input_embeddings()` returns, unless the output head shares its weight (a
        factorisation would untie them and change the logits of every token)."""
        getter = getattr(model, "get_input_embeddings", None)
        try:
            table = getter() if getter is not None else None
        except NotImplementedError:
            table = None
        if table is None:
            raise Unsupported(f"{type(model).__name__} names no input embeddings (get_input_embeddings)")
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is not None and getattr(head, "weight", None) is getattr(table, "weight", False):
            raise Unsupported("the token embedding is tied to the output head; a factorisation would untie them")
        name = next((n for n, m in model.named_modules() if m is table), None)
        if name is None:
            raise Unsupported("get_input_embeddings() returns a module outside the model")
        return name


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
