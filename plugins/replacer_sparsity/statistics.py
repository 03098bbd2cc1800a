"""Per-head statistics of attention probabilities: how concentrated, how local, how recent.

All statistics are averaged over real query tokens. A key is real when some query attends to it
(padding gets exactly zero probability), and queries are the same tokens as keys.
"""

from __future__ import annotations

import torch

METRICS = ("entropy", "top_k_mass", "recency", "distance")
"""entropy: normalised to [0, 1] by the log of the keys a query may see (low = sparse);
top_k_mass: probability on the k largest keys; recency: probability within `window` tokens of the
query (RecurFormer's recency ratio); distance: mean |query - key| in tokens, weighted by probability."""


def head_sums(probs: torch.Tensor, top_k: int, window: int, causal: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Sums of each metric over the real queries of a batch `(B, heads, N, N)`, per head, and how many queries counted."""
    p = probs.float()
    _, _, n, m = p.shape
    if n != m:
        raise ValueError(f"attention with {n} queries over {m} keys: statistics need self-attention over one sequence")
    key_real = p.sum(dim=(1, 2)) > 0  # (B, N)
    offsets = torch.arange(n, device=p.device)
    distance = (offsets[:, None] - offsets[None, :]).abs().float()  # (N, N)
    visible = key_real[:, None, :].expand(-1, n, -1)
    if causal:
        visible = visible & (offsets[None, :, None] >= offsets[None, None, :])
    keys = visible.sum(-1)  # (B, N): keys each query may see
    counted = key_real & (keys > 1)  # one visible key says nothing about sparsity
    entropy = -(p * p.clamp_min(1e-12).log()).sum(-1) / keys.clamp_min(2).log()[:, None, :]
    values = {
        "entropy": entropy,
        "top_k_mass": p.topk(min(top_k, m), dim=-1).values.sum(-1),
        "recency": (p * (distance <= window)).sum(-1),
        "distance": (p * distance).sum(-1),
    }
    weight = counted[:, None, :].float()
    return {k: (v * weight).sum(dim=(0, 2)) for k, v in values.items()}, counted.sum()
