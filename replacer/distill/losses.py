"""Per-token losses between a site's student and teacher outputs, over real tokens only."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def relative_mse(pred: torch.Tensor, target: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error divided by the teacher output's mean square: comparable across sites."""
    err = (pred - target).pow(2).mean(-1)
    power = target.pow(2).mean(-1)
    if keep is not None:
        err, power = err[keep], power[keep]
    return err.mean() / power.mean().clamp(min=1e-12)


def cosine_distance(pred: torch.Tensor, target: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    dist = 1 - F.cosine_similarity(pred, target, dim=-1)
    return (dist[keep] if keep is not None else dist).mean()


def site_loss(kind: str, pred: torch.Tensor, target: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """`mse`, `cosine` (FAR's 1 - cosine) or `mse+cosine`."""
    total = pred.new_zeros(())
    if "mse" in kind:
        total = total + relative_mse(pred, target, keep)
    if "cosine" in kind:
        total = total + cosine_distance(pred, target, keep)
    return total
