"""The adapter: how replacer recognises, measures, initialises from and stands in for TinyFormer's
attention. Everything replacer does to a model (scan, replace, distill block by block, analyse,
prune, save and load) goes through these few methods."""

from __future__ import annotations

import torch
from torch import nn

from replacer import Adapter, LinearWeights, ReplacedAttention, Site
from replacer.mixer import Mixer
from replacer_tinyformer.model import SelfAttention


class TinyFormerAttention(ReplacedAttention):
    """Stands where `SelfAttention` stood: same call (`x, keep`), same return (a bare tensor). The
    output projection `out` is kept under its own name, so its state-dict keys do not change."""

    def read_call(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        call = self.arguments(args, kwargs)  # the original signature, bound: positional or keyword alike
        return call["x"], call.get("keep")

    def mix(self, x: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
        return self.out(self.mixer(x, padding))

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.mix(*self.read_call(args, kwargs))


class TinyFormerAdapter(Adapter):
    name = "tinyformer"
    priority = 10  # asked before the built-in structural adapters, were they ever to match too

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, SelfAttention)

    def describe(self, name: str, module: nn.Module, layer_index: int) -> Site:
        width = module.query.in_features
        return Site(
            name=name, cls=type(module).__name__, adapter=self.name, layer_index=layer_index, d_model=width,
            num_heads=module.heads, head_dim=module.query.out_features // module.heads, num_kv_heads=module.heads,
            causal=module.causal,
        )

    def value_projection(self, module: nn.Module, site: Site) -> LinearWeights:
        rows = slice(site.out_dim, 2 * site.out_dim)  # the values are the second half of the fused projection
        return LinearWeights(module.key_value.weight[rows].detach(), module.key_value.bias[rows].detach())

    def wrap(self, site: Site, module: nn.Module, mixer: Mixer) -> ReplacedAttention:
        return TinyFormerAttention(site, mixer, module, kept=("out",))
