"""TinyFormer: a small transformer family of its own, standing in for the in-house or research model
a plugin author wants replacer to convert. Its attention has a calling convention no built-in
adapter reads: `forward(x, keep)` with a boolean mask (True = real token), one fused key/value
projection, and a bare tensor returned."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class TinyFormerConfig:
    vocab: int = 100
    width: int = 32
    heads: int = 4
    depth: int = 2
    causal: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


class SelfAttention(nn.Module):
    def __init__(self, config: TinyFormerConfig) -> None:
        super().__init__()
        self.heads, self.causal = config.heads, config.causal
        self.query = nn.Linear(config.width, config.width)
        self.key_value = nn.Linear(config.width, 2 * config.width)  # [keys | values]
        self.out = nn.Linear(config.width, config.width)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        b, n, width = x.shape
        split = lambda t: t.view(b, n, self.heads, -1).transpose(1, 2)  # noqa: E731
        q, (k, v) = split(self.query(x)), map(split, self.key_value(x).chunk(2, -1))
        mask = None if keep is None else keep[:, None, None, :]
        if self.causal:
            order = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
            mask = order if mask is None else mask & order
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(b, n, width))


class Block(nn.Module):
    def __init__(self, config: TinyFormerConfig) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(config.width), nn.LayerNorm(config.width)
        self.attention = SelfAttention(config)
        self.mlp = nn.Sequential(nn.Linear(config.width, 2 * config.width), nn.GELU(), nn.Linear(2 * config.width, config.width))

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attention(self.norm1(x), keep)
        return x + self.mlp(self.norm2(x))


class TinyFormer(nn.Module):
    """Token ids (B, N) and an optional (B, N) mask (1 = real token) to hidden states (B, N, width)."""

    def __init__(self, config: TinyFormerConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab, config.width)
        self.position = nn.Parameter(torch.randn(64, config.width) * 0.02)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        keep = None if attention_mask is None else attention_mask.bool()
        x = self.embed(input_ids) + self.position[: input_ids.shape[1]]
        for block in self.blocks:
            x = block(x, keep)
        return x
