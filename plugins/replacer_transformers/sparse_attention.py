"""Top-k attention for transformers models: each query keeps its k highest-scoring keys (teacher
sparsification before distillation, after "Sparsity to Simplicity"). Registered with transformers'
attention and mask interfaces under one name, so a model's config can switch to it."""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

NAME = "replacer_top_k"


def top_k_probabilities(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Softmax over each row's k largest scores (ties at the k-th score are kept); the rest get zero."""
    k = min(k, scores.shape[-1])
    threshold = scores.topk(k, dim=-1).values[..., -1:]
    kept = scores.masked_fill(scores < threshold, torch.finfo(scores.dtype).min)
    return torch.softmax(kept, dim=-1, dtype=torch.float32).to(scores.dtype)


def top_k_attention(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
    scaling: float | None = None, dropout: float = 0.0, **_: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention with `module.replacer_top_k` keys per query; returns `(output (B, N, H, hd), probabilities)`."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scores = query @ key.transpose(-1, -2) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
    if attention_mask is not None:
        mask = attention_mask[..., : key.shape[-2]]
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool else scores + mask
    probs = top_k_probabilities(scores, module.replacer_top_k)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    return (probs @ value).transpose(1, 2).contiguous(), probs


AttentionInterface.register(NAME, top_k_attention)
AttentionMaskInterface.register(NAME, eager_mask)  # additive masks, padding and causality included
