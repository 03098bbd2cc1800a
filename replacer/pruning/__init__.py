"""Global structural pruning of replaced models: rank every mixer's groups across all sites, remove the
least important physically, and keep a record so `replacer.load` rebuilds the smaller shapes.

    from replacer.pruning import prune
    result = prune(student, params=0.7)          # 70% of the mixers' parameters stay
    result = prune(student, latency=0.8, measure=time_it)  # or: as many as run in 80% of the time
    replacer.save(student, "pruned")              # loads back with the pruned shapes
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from replacer.graph.adapter import site_wrappers
from replacer.errors import ReplacerError
from replacer.pruning.groups import GroupIndex, apply_shapes, shrink
from replacer.pruning.importance import Importance, hoyer_square, magnitude, taylor
from replacer.pruning.latency import LatencyFit, Measure, fit_latency
from replacer.pruning.ranking import choose


@dataclass(frozen=True)
class PruneResult:
    mixer_params_before: int
    mixer_params_after: int
    removed_groups: int
    removed_by_site: dict[str, int]
    latency: LatencyFit | None = None  # with a latency budget: what the search measured


def mixer_parameters(model: nn.Module) -> int:
    """Parameters of every replaced site's mixer (what pruning budgets are fractions of)."""
    return sum(p.numel() for w in site_wrappers(model).values() for p in w.mixer.parameters())


def importance_scores(index: GroupIndex, importance: Importance, losses: Iterable[Callable[[], torch.Tensor]] | None) -> torch.Tensor:
    """One score per group of `index` (lower goes first)."""
    if importance == "taylor":
        if losses is None:
            raise ReplacerError("importance='taylor' needs losses: callables that return a loss on a batch")
        return taylor(index, losses)
    if importance in ("magnitude", "hoyer"):
        return magnitude(index)
    raise ReplacerError(f"unknown importance {importance!r}; choose magnitude, taylor or hoyer")


def prune(
    model: nn.Module,
    params: float | int | None = None,
    importance: Importance = "magnitude",
    losses: Iterable[Callable[[], torch.Tensor]] | None = None,
    uniform: bool = False,
    latency: float | None = None,
    measure: Measure | None = None,
) -> PruneResult:
    """Shrink `model`'s mixers in place to `params` (a fraction (0, 1] of their current parameters, or a
    count) or to `latency` (a fraction (0, 1] of the model's current latency, as `measure` times it).

    `importance`: `magnitude` (group L2 norm; after Hoyer-regularised training this is FAR's single
    threshold across layers, hence `hoyer` ranks the same way) or `taylor`, which needs `losses`
    (callables returning a loss on one batch) to estimate each group's effect on the loss.
    `uniform` cuts every head and direction of a site by the same number of members, so widths stay
    equal and compute falls with parameters (ranking single groups keeps more of what matters).
    A latency budget keeps the most parameters whose pruned model `measure` (model -> milliseconds)
    times within budget (`replacer.pruning.latency`); with `uniform` latency falls further.
    """
    if getattr(model, "replacer_record", None) is None:
        raise ReplacerError("prune works on models returned by replacer.replace (or replacer.load)")
    if (params is None) == (latency is None):
        raise ReplacerError("prune needs exactly one budget: params (fraction or count) or latency (fraction)")
    index = GroupIndex.of(model)
    scores = importance_scores(index, importance, losses)
    fit = None
    if latency is not None:
        if not 0 < latency <= 1 or measure is None:
            raise ReplacerError(f"latency={latency}: give a fraction in (0, 1] of the current latency and a measure(model) -> ms")
        current_ms = measure(model)
        fit = fit_latency(model, index, scores, latency * current_ms, measure, uniform, current_ms=current_ms)
        target = fit.params
    elif isinstance(params, float):
        if not 0 < params <= 1:
            raise ReplacerError(f"params={params}: give a fraction in (0, 1] of the mixers' parameters or a count")
        target = round(params * mixer_parameters(model))
    else:
        target = params
    return cut(model, index, scores, target, uniform, fit)


def cut(
    model: nn.Module, index: GroupIndex, scores: torch.Tensor, params: int, uniform: bool = False, latency: LatencyFit | None = None
) -> PruneResult:
    """Remove the groups `scores` ranks lowest until the mixers have at most `params` parameters (what
    `prune` does once it has scores; callers that already scored the groups call it directly)."""
    before = mixer_parameters(model)
    remove = choose(index, scores, params, uniform)
    model.replacer_record.setdefault("shapes", {}).update(shrink(model, index, remove))
    return PruneResult(
        mixer_params_before=before,
        mixer_params_after=mixer_parameters(model),
        removed_groups=len(remove),
        removed_by_site=dict(Counter(index.sites[g] for g in remove)),
        latency=latency,
    )


__all__ = [
    "GroupIndex", "Importance", "LatencyFit", "Measure", "PruneResult", "apply_shapes", "cut", "fit_latency",
    "hoyer_square", "importance_scores", "mixer_parameters", "prune",
]
