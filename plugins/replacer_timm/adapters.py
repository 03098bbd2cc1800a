"""Adapters for timm's attention classes."""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Iterator

import torch
from torch import nn

from replacer.errors import UnsupportedCallError
from replacer.graph.adapter import Adapter, ReplacedAttention, padding_from_attention_mask
from replacer.graph.site import LinearWeights, Site
from replacer.mixer import Mixer


def _is_timm(module: nn.Module, names: set[str]) -> bool:
    cls = type(module)
    return cls.__module__.startswith("timm.") and cls.__name__ in names


@contextlib.contextmanager
def _on_probabilities(module: nn.Module, hook: Callable[[nn.Module, tuple], tuple | None]) -> Iterator[None]:
    """timm's unfused path applies `attn_drop` to the probabilities: turn fusing off and hook its input."""
    fused = module.fused_attn
    module.fused_attn = False
    handle = module.attn_drop.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()
        module.fused_attn = fused


@contextlib.contextmanager
def _record_probabilities(module: nn.Module) -> Iterator[list[torch.Tensor]]:
    recorded: list[torch.Tensor] = []

    def keep(_module: nn.Module, args: tuple) -> None:
        recorded.append(args[0].detach())

    with _on_probabilities(module, keep):
        yield recorded


@contextlib.contextmanager
def _top_k_probabilities(module: nn.Module, top_k: int) -> Iterator[None]:
    """Each row of probabilities cut to its k largest entries and renormalised."""

    def sparsify(_module: nn.Module, args: tuple) -> tuple:
        probs = args[0]
        k = min(top_k, probs.shape[-1])
        kept = probs * (probs >= probs.topk(k, dim=-1).values[..., -1:])
        return (kept / kept.sum(-1, keepdim=True),)

    with _on_probabilities(module, sparsify):
        yield


class TimmAdapter(Adapter):
    """What timm adapters share: probabilities recorded and sparsified on the unfused path."""

    def record_attention(self, module: nn.Module) -> ContextManager[list[torch.Tensor]]:
        return _record_probabilities(module)

    def sparsify_attention(self, module: nn.Module, top_k: int) -> ContextManager[None]:
        return _top_k_probabilities(module, top_k)


class TimmAttentionAdapter(TimmAdapter):
    """vit / deit / deit3 `Attention` and eva `EvaAttention`: fused or split qkv, optional norm and gate."""

    name = "timm-attention"
    classes = {"Attention", "EvaAttention"}

    def matches(self, module: nn.Module) -> bool:
        return _is_timm(module, self.classes)

    def describe(self, name: str, module: nn.Module, layer_index: int) -> Site:
        qkv = module.qkv if getattr(module, "qkv", None) is not None else module.q_proj
        note = "rotary embedding dropped: the recurrence carries order" if type(module).__name__ == "EvaAttention" else ""
        return Site(
            name=name, cls=f"timm.{type(module).__name__}", adapter=self.name, layer_index=layer_index,
            d_model=qkv.in_features, num_heads=module.num_heads, head_dim=module.head_dim,
            num_kv_heads=module.num_heads, causal=False, note=note,
        )

    def value_projection(self, module: nn.Module, site: Site) -> LinearWeights:
        width = site.out_dim
        if getattr(module, "qkv", None) is not None:
            weight = module.qkv.weight[2 * width : 3 * width]
            bias = getattr(module, "v_bias", None)
            if bias is None and module.qkv.bias is not None:
                bias = module.qkv.bias[2 * width : 3 * width]
            return LinearWeights(weight.detach(), None if bias is None else bias.detach())
        v = module.v_proj
        return LinearWeights(v.weight.detach(), None if v.bias is None else v.bias.detach())

    def wrap(self, site: Site, module: nn.Module, mixer: Mixer) -> ReplacedAttention:
        return TimmReplacedAttention(site, mixer, module, kept=("norm", "gate", "proj", "proj_drop"))


class TimmReplacedAttention(ReplacedAttention):
    def read_call(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        call = self.arguments(args, kwargs)
        x = call["x"]
        if call.get("is_causal") and not self.mixer.causal:
            raise UnsupportedCallError(
                f"site '{self.site.name}' was called with is_causal=True but its mixer is bidirectional; "
                "replace it with a causal mixer"
            )
        return x, padding_from_attention_mask(call.get("attn_mask"), x.shape[0], x.shape[1])

    def mix(self, x: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
        y = self.norm(self.mixer(x, padding))
        if self.gate is not None:
            y = y * self.gate(x).sigmoid()
        return self.proj_drop(self.proj(y))

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.mix(*self.read_call(args, kwargs))


class TimmWindowAttentionAdapter(TimmAdapter):
    """swin `WindowAttention`: each window is a short sequence in raster order."""

    name = "timm-window-attention"

    def matches(self, module: nn.Module) -> bool:
        return _is_timm(module, {"WindowAttention"})

    def describe(self, name: str, module: nn.Module, layer_index: int) -> Site:
        head_dim = module.qkv.out_features // 3 // module.num_heads
        return Site(
            name=name, cls="timm.WindowAttention", adapter=self.name, layer_index=layer_index,
            d_model=module.qkv.in_features, num_heads=module.num_heads, head_dim=head_dim,
            num_kv_heads=module.num_heads, causal=False,
            note="windows read in raster order; shift mask and relative position bias dropped",
        )

    def value_projection(self, module: nn.Module, site: Site) -> LinearWeights:
        width = site.out_dim
        bias = module.qkv.bias
        return LinearWeights(
            module.qkv.weight[2 * width :].detach(), None if bias is None else bias[2 * width :].detach()
        )

    def wrap(self, site: Site, module: nn.Module, mixer: Mixer) -> ReplacedAttention:
        return TimmReplacedWindowAttention(site, mixer, module, kept=("proj", "proj_drop"))


class TimmReplacedWindowAttention(ReplacedAttention):
    def read_call(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, None]:
        return self.arguments(args, kwargs)["x"], None  # the shift mask is not padding: see the site note

    def mix(self, x: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
        return self.proj_drop(self.proj(self.mixer(x, padding)))

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.mix(*self.read_call(args, kwargs))
