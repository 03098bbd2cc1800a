"""How much each prunable group matters: weight magnitude, first-order Taylor, and the Hoyer-square
penalty that pushes whole groups towards zero during training so magnitude can then rank them."""

from __future__ import annotations

from typing import Callable, Iterable, Literal

import torch

from replacer.pruning.groups import GroupIndex

Importance = Literal["magnitude", "taylor", "hoyer"]


@torch.no_grad()
def magnitude(index: GroupIndex) -> torch.Tensor:
    """L2 norm of each group's weights."""
    return index.norms()


def taylor(index: GroupIndex, losses: Iterable[Callable[[], torch.Tensor]]) -> torch.Tensor:
    """|sum over a group's weights of weight x gradient|, gradients summed over the given losses.

    First-order estimate of the loss change when the group is zeroed (Molchanov et al., 2019).
    """
    params = index.params
    saved = {n: p.requires_grad for n, p in params.items()}
    grads = {n: torch.zeros_like(p) for n, p in params.items()}
    try:
        for p in params.values():
            p.requires_grad_(True)
        for loss_fn in losses:
            for g, p in zip(grads.values(), torch.autograd.grad(loss_fn(), list(params.values()), allow_unused=True)):
                if p is not None:
                    g += p
    finally:
        for n, p in params.items():
            p.requires_grad_(saved[n])
    with torch.no_grad():
        return index.group_sums({n: p * grads[n] for n, p in params.items()}).abs()


def per_kind(index: GroupIndex, scores: torch.Tensor) -> torch.Tensor:
    """Scores divided by the mean score of their kind: the part's (mixer, attention heads, feed-forward)
    and the group's within it (an LSTM's hidden units and input channels, MLP channels, kv heads).

    Raw scores of different kinds are not on one scale: a weight norm grows with the number of weights
    a group holds, and kinds differ in how their weights are initialised and trained. Normalised, a group
    is ranked by how much it matters among its own kind, and one threshold applies to every kind. An index
    of mixers alone is ranked as it always was, on raw scores.
    """
    if len(set(index.kinds)) < 2:
        return scores
    of_group = index.group_kinds()
    kinds = sorted(set(of_group))
    normalised = scores.clone()
    for kind in kinds:
        members = torch.tensor([k == kind for k in of_group], device=scores.device)
        mean = scores[members].mean()
        if mean > 0:
            normalised[members] = scores[members] / mean
    return normalised


def hoyer_square(index: GroupIndex) -> torch.Tensor:
    """Sum over sites of (sum of group norms)^2 / sum of squared group norms: small when few groups carry
    the weight. Scale-invariant, so it sparsifies without shrinking every weight (FAR, after Yang et al. 2020)."""
    norms = index.norms()
    site = index.site_ids().to(norms.device)
    sites = int(site.max()) + 1
    l1 = norms.new_zeros(sites).index_add(0, site, norms)
    l2 = norms.new_zeros(sites).index_add(0, site, norms.pow(2))
    return (l1.pow(2) / l2).sum()
