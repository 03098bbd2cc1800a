"""Adapters for timm's attention classes."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterator

import torch
from torch import nn

from replacer.errors import UnsupportedCallError
from replacer.graph.adapter import Adapter, ReplacedAttention, Unsupported, padding_from_attention_mask
from replacer.graph.site import LinearWeights, Site
from replacer.mixer import Mixer


def _is_timm(module: nn.Module, names: set[str]) -> bool:
    cls = type(module)
    return cls.__module__.startswith("timm.") and cls.__name__ in names


def _family_key(module: nn.Module) -> str:
    """`module.Class` under `timm.` (`layers.attention.Attention`): class names repeat across timm's
    models with different meanings, so families are told apart by where the class is defined."""
    cls = type(module)
    return f"{cls.__module__.removeprefix('timm.')}.{cls.__name__}"


@contextlib.contextmanager
def _on_probabilities(module: nn.Module, hook: Callable[[nn.Module, tuple], tuple | None]) -> Iterator[None]:
    """timm's unfused path applies `attn_drop` to the probabilities: turn fusing off and hook its input."""
    if not hasattr(module, "fused_attn") or not isinstance(getattr(module, "attn_drop", None), nn.Module):
        raise Unsupported(f"{type(module).__name__} has no unfused path with `attn_drop` to read probabilities from")
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

    def keep(module: nn.Module, args: tuple) -> None:
        probs = args[0]
        if probs.dim() != 4 or probs.shape[-1] != probs.shape[-2]:
            raise Unsupported(f"its probabilities {tuple(probs.shape)} are not (batch, heads, tokens, tokens): keys are subsampled or windowed")
        recorded.append(probs.detach())

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


@dataclass(frozen=True)
class TimmFamily:
    """What differs between timm attention classes that share the projection layout.

    `layout`: how tokens sit in the input: `tokens` (B, N, C); `grid` (B, H, W, C), read in raster
    order; `blocks` (B, T, N, C), each of the T blocks its own sequence; `channels` (B, C, H, W), a
    feature map read in raster order. `input_norm` names a norm the
    class applies to its input before the projections; `output_norm` means `norm` (and `gate`, where
    present) act on the merged heads before `proj`. `unsupported` is the reason a class is refused.
    """

    layout: str = "tokens"
    input_norm: str | None = None
    output_norm: bool = False
    note: str = ""
    unsupported: str = ""
    pools: str | None = None
    """An attribute that, where the module sets it, pools the queries: those modules are refused (`_POOLING`)."""


_CLASS_TOKEN = "class attention: only the class token queries, so the output is one token, not the sequence a mixer produces"
_CHANNELS = "channel attention: it attends across feature channels, not tokens, which a sequence mixer does not model"
_POOLING = "pooling attention: queries are pooled, so the output sequence is shorter than the input"
_DOWNSAMPLE = "downsampling attention: the output has fewer tokens than the input"

FAMILIES: dict[str, TimmFamily] = {
    "layers.attention.Attention": TimmFamily(output_norm=True),
    "models.vision_transformer.Attention": TimmFamily(output_norm=True),
    "models.eva.EvaAttention": TimmFamily(output_norm=True, note="rotary embedding dropped: the recurrence carries order"),
    "models.beit.Attention": TimmFamily(note="relative position bias dropped"),
    "models.swin_transformer.WindowAttention": TimmFamily(note="windows read in raster order; shift mask and relative position bias dropped"),
    "models.swin_transformer_v2.WindowAttention": TimmFamily(note="windows read in raster order; shift mask and continuous position bias dropped"),
    "models.davit.WindowAttention": TimmFamily(note="windows read in raster order"),
    "models.tiny_vit.Attention": TimmFamily(input_norm="norm", note="windows read in raster order; attention biases dropped"),
    "models.efficientformer.Attention": TimmFamily(note="attention biases dropped"),
    "models.levit.Attention": TimmFamily(note="attention biases dropped"),
    "models.nest.Attention": TimmFamily(layout="blocks", note="each block of tokens read in raster order"),
    "models.vision_transformer_sam.Attention": TimmFamily(layout="grid", note="tokens read in raster order; relative position dropped"),
    "models.volo.Attention": TimmFamily(layout="grid", note="tokens read in raster order"),
    "models.fastvit.Attention": TimmFamily(layout="channels", note="feature map read in raster order"),
    "models.hieradet_sam2.MultiScaleAttention": TimmFamily(layout="grid", pools="q_pool", note="windows read in raster order"),
    "models.maxxvit.AttentionCl": TimmFamily(layout="grid", note="windows and grids read in raster order; relative position bias dropped"),
    "models.vision_transformer_relpos.RelPosAttention": TimmFamily(note="relative position bias dropped"),
    "models.pvt_v2.Attention": TimmFamily(note="spatial reduction of keys and values dropped: the mixer reads every token"),
    "models.twins.GlobalSubSampleAttn": TimmFamily(note="subsampled keys and values dropped: the mixer reads every token"),
    "models.twins.LocallyGroupedAttn": TimmFamily(note="local windows dropped: the mixer reads the whole sequence in raster order"),
    "models.nextvit.EfficientAttention": TimmFamily(note="pooled keys and values dropped: the mixer reads every token"),
    "models.coat.FactorAttnConvRelPosEnc": TimmFamily(note="convolutional relative position encoding dropped"),
    "models.convit.GPSA": TimmFamily(note="gated positional attention dropped: the recurrence carries position"),
    "models.cait.TalkingHeadAttn": TimmFamily(note="talking-heads mixing dropped"),
    "models.cait.ClassAttn": TimmFamily(unsupported=_CLASS_TOKEN),
    "models.volo.ClassAttention": TimmFamily(unsupported=_CLASS_TOKEN),
    "models.xcit.ClassAttentionBlock": TimmFamily(unsupported=_CLASS_TOKEN),
    "models.xcit.XCA": TimmFamily(unsupported=_CHANNELS),
    "models.edgenext.CrossCovarianceAttn": TimmFamily(unsupported=_CHANNELS),
    "models.davit.ChannelAttention": TimmFamily(unsupported=_CHANNELS),
    "models.mvitv2.MultiScaleAttention": TimmFamily(unsupported=_POOLING),
    "models.hiera.MaskUnitAttention": TimmFamily(unsupported=_POOLING + " (Hiera's mask units also reorder tokens)"),
    "models.levit.AttentionDownsample": TimmFamily(unsupported=_DOWNSAMPLE),
    "models.efficientformer_v2.Attention2dDownsample": TimmFamily(unsupported=_DOWNSAMPLE),
    "models.efficientformer_v2.Attention2d": TimmFamily(
        unsupported="attention over a (B, C, H, W) feature map through convolutional projections, with talking heads"
    ),
    "models.gcvit.WindowAttentionGlobal": TimmFamily(unsupported="its queries come from a second input (global query tokens), not from the sequence"),
    "models.crossvit.CrossAttention": TimmFamily(unsupported="cross-attention: only the class token queries the other branch"),
    "models.volo.OutlookAttention": TimmFamily(
        unsupported="outlook attention: each token's weights over its local window are predicted from the token, not scored against keys"
    ),
    "models.nextvit.ConvAttention": TimmFamily(unsupported="convolutional attention: a grouped convolution over a (B, C, H, W) map, with no score map"),
    "models.mobilevit.LinearSelfAttention": TimmFamily(
        unsupported="separable linear attention over (B, C, P, N) patches: it has no token-by-token score map to replace"
    ),
}
DEFAULT_FAMILY = TimmFamily()

# input projections, by child names: fused, query + fused key/value, fused query/key + value, separate
_PROJECTIONS = (("qkv",), ("q", "kv"), ("qk", "v"), ("q", "k", "v"), ("q_proj", "k_proj", "v_proj"))


def _first_linear(module: nn.Module | None) -> nn.Linear | None:
    """`module` itself if it is a Linear, else the first Linear inside it (levit's `LinearNorm`, a `Sequential`)."""
    if module is None:
        return None
    return module if isinstance(module, nn.Linear) else next((m for m in module.modules() if isinstance(m, nn.Linear)), None)


def _projections(module: nn.Module) -> tuple[str, ...] | None:
    """The names of the input projections of a timm attention module, or None if it has none of the layouts."""
    for names in _PROJECTIONS:
        if all(_first_linear(getattr(module, n, None)) is not None for n in names):
            return names
    return None


class TimmAttentionAdapter(TimmAdapter):
    """Any timm attention over tokens built from input projections (`qkv`, `q`+`kv`, `qk`+`v`, `q`/`k`/`v`,
    `q_proj`/`k_proj`/`v_proj`) and an output `proj`: sizes are read from the weights, and what differs
    between classes (token layout, norms, what is dropped, what is refused) is one `FAMILIES` entry."""

    name = "timm-attention"

    def matches(self, module: nn.Module) -> bool:
        if not type(module).__module__.startswith("timm."):
            return False
        if _family_key(module) in FAMILIES:
            return True
        return _projections(module) is not None and isinstance(getattr(module, "proj", None), nn.Module)

    def describe(self, name: str, module: nn.Module, layer_index: int) -> Site:
        family = FAMILIES.get(_family_key(module), DEFAULT_FAMILY)
        if family.unsupported:
            raise Unsupported(family.unsupported)
        if family.pools and getattr(module, family.pools, None) is not None:
            raise Unsupported(_POOLING)
        projections, out = _projections(module), _first_linear(getattr(module, "proj", None))
        if projections is None or out is None:
            raise Unsupported("no input projections (qkv, q+kv, qk+v or q/k/v) and output `proj` to read sizes from")
        heads = getattr(module, "num_heads", None)
        if not isinstance(heads, int) or heads < 1 or out.in_features % heads:
            raise Unsupported(f"head count {heads!r} does not divide the output projection's {out.in_features} inputs")
        return Site(
            name=name, cls=f"timm.{type(module).__name__}", adapter=self.name, layer_index=layer_index,
            d_model=_first_linear(getattr(module, projections[0])).in_features, num_heads=heads,
            head_dim=out.in_features // heads, num_kv_heads=heads, causal=False, note=family.note,
        )

    def value_projection(self, module: nn.Module, site: Site) -> LinearWeights | None:
        """The value rows where the layout shows them; None (the mixer starts from its own init) where a
        projection mixes values with a norm or interleaves unequal per-head parts (levit)."""
        width = site.out_dim
        projections = _projections(module)
        source, start = {("qkv",): ("qkv", 2), ("q", "kv"): ("kv", 1)}.get(projections, ("v", 0))
        if projections == ("q_proj", "k_proj", "v_proj"):
            source = "v_proj"
        linear = getattr(module, source)
        if not isinstance(linear, nn.Linear) or linear.out_features != (start + 1) * width:
            return None
        rows = slice(start * width, (start + 1) * width)
        bias = getattr(module, "v_bias", None) if source == "qkv" else None
        if bias is None and linear.bias is not None:
            bias = linear.bias[rows]
        return LinearWeights(linear.weight[rows].detach(), None if bias is None else bias.detach())

    def wrap(self, site: Site, module: nn.Module, mixer: Mixer) -> ReplacedAttention:
        return TimmReplacedAttention(site, mixer, module, FAMILIES.get(_family_key(module), DEFAULT_FAMILY))


class TimmReplacedAttention(ReplacedAttention):
    """The timm call `(x, ...) -> x` with the mixer in place of the projections and attention; the input
    norm, output norm, gate, `proj` and `proj_drop` are the original's where the class has them."""

    def __init__(self, site: Site, mixer: Mixer, original: nn.Module, family: TimmFamily) -> None:
        kept = ["proj", *(a for a in ("proj_drop",) if isinstance(getattr(original, a, None), nn.Module))]
        if family.output_norm:
            kept += [a for a in ("norm", "gate") if isinstance(getattr(original, a, None), nn.Module)]
        if family.input_norm:
            kept.append(family.input_norm)
        super().__init__(site, mixer, original, tuple(kept))
        self.layout, self.input_norm = family.layout, family.input_norm
        self.output_norm = family.output_norm

    def read_call(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self._read(self.arguments(args, kwargs))

    @staticmethod
    def _input(call: dict) -> torch.Tensor:
        """The call's token tensor: the first argument (`x` in timm, whatever a class names it)."""
        return next(iter(call.values()))

    def _read(self, call: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = self._input(call)
        if call.get("is_causal") and not self.mixer.causal:
            raise UnsupportedCallError(
                f"site '{self.site.name}' was called with is_causal=True but its mixer is bidirectional; "
                "replace it with a causal mixer"
            )
        if self.layout != "tokens":
            return self._flat(x), None
        if x.dim() != 3:
            raise UnsupportedCallError(
                f"site '{self.site.name}' ({self.site.cls}) was called with a {tuple(x.shape)} input, not (batch, tokens, "
                "channels): its family needs an entry in replacer_timm's FAMILIES saying how its tokens are laid out"
            )
        # masks of windowed classes are shift masks, not padding: only `attn_mask` is read
        return x, padding_from_attention_mask(call.get("attn_mask"), x.shape[0], x.shape[1])

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "grid":
            return x.flatten(1, 2)
        return x.flatten(0, 1) if self.layout == "blocks" else x.flatten(2).transpose(1, 2)

    def _unflat(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """`mix`'s (sequences, tokens, channels) output in the layout of the call's input `x`."""
        if self.layout == "channels":
            return y.transpose(1, 2).reshape(x.shape[0], y.shape[-1], *x.shape[2:])
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def read_output(self, output: Any) -> torch.Tensor:
        y = super().read_output(output)
        return y if self.layout == "tokens" else self._flat(y)

    def mix(self, x: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
        source = x if self.input_norm is None else getattr(self, self.input_norm)(x)
        y = self.mixer(source, padding)
        if self.output_norm:
            y = self.norm(y) if hasattr(self, "norm") else y
            if getattr(self, "gate", None) is not None:
                y = y * self.gate(x).sigmoid()
        y = self.proj(y)
        return self.proj_drop(y) if hasattr(self, "proj_drop") else y

    def forward(self, *args, **kwargs) -> torch.Tensor:
        call = self.arguments(args, kwargs)
        y = self.mix(*self._read(call))
        return y if self.layout == "tokens" else self._unflat(y, self._input(call))
