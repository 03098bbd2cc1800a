"""Global structural pruning of replaced models: rank every mixer's groups across all sites, remove the
least important physically, and keep a record so `replacer.load` rebuilds the smaller shapes.

    from replacer.pruning import prune
    result = prune(student, params=0.7)          # 70% of the mixers' parameters stay
    replacer.save(student, "pruned")              # loads back with the pruned shapes
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from replacer.distill.blockwise import site_wrappers
from replacer.errors import ReplacerError
from replacer.pruning.groups import GroupIndex, apply_shapes, shrink
from replacer.pruning.importance import Importance, hoyer_square, magnitude, taylor
from replacer.pruning.ranking import choose


@dataclass(frozen=True)
class PruneResult:
    mixer_params_before: int
    mixer_params_after: int
    removed_groups: int
    removed_by_site: dict[str, int]


def mixer_parameters(model: nn.Module) -> int:
    """Parameters of every replaced site's mixer (what pruning budgets are fractions of)."""
    return sum(p.numel() for w in site_wrappers(model).values() for p in w.mixer.parameters())


def prune(
    model: nn.Module,
    params: float | int,
    importance: Importance = "magnitude",
    losses: Iterable[Callable[[], torch.Tensor]] | None = None,
    uniform: bool = False,
) -> PruneResult:
    """Shrink `model`'s mixers in place to `params`: a fraction (0, 1] of their current parameters, or a count.

    `importance`: `magnitude` (group L2 norm; after Hoyer-regularised training this is FAR's single
    threshold across layers, hence `hoyer` ranks the same way) or `taylor`, which needs `losses`
    (callables returning a loss on one batch) to estimate each group's effect on the loss.
    `uniform` cuts every head and direction of a site by the same number of members, so widths stay
    equal and compute falls with parameters (ranking single groups keeps more of what matters).
    """
    if getattr(model, "replacer_record", None) is None:
        raise ReplacerError("prune works on models returned by replacer.replace (or replacer.load)")
    index = GroupIndex.of(model)
    before = mixer_parameters(model)
    if isinstance(params, float):
        if not 0 < params <= 1:
            raise ReplacerError(f"params={params}: give a fraction in (0, 1] of the mixers' parameters or a count")
        target = round(params * before)
    else:
        target = params
    if importance == "taylor":
        if losses is None:
            raise ReplacerError("importance='taylor' needs losses: callables that return a loss on a batch")
        scores = taylor(index, losses)
    elif importance in ("magnitude", "hoyer"):
        scores = magnitude(index)
    else:
        raise ReplacerError(f"unknown importance {importance!r}; choose magnitude, taylor or hoyer")
    remove = choose(index, scores, target, uniform)
    model.replacer_record.setdefault("shapes", {}).update(shrink(model, index, remove))
    return PruneResult(
        mixer_params_before=before,
        mixer_params_after=mixer_parameters(model),
        removed_groups=len(remove),
        removed_by_site=dict(Counter(index.sites[g] for g in remove)),
    )


__all__ = ["GroupIndex", "Importance", "PruneResult", "apply_shapes", "hoyer_square", "mixer_parameters", "prune"]
