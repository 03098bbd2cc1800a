"""Global structural pruning of replaced models: rank every mixer's groups across all sites, remove the
least important physically, and keep a record so `replacer.load` rebuilds the smaller shapes.

    from replacer.pruning import prune
    result = prune(student, params=0.7)          # 70% of the mixers' parameters stay
    result = prune(student, params=0.7, scope="model")  # 70% of the whole model's: MLP channels, kept heads and
                                                        # token embedding components too
    result = prune(student, latency=0.8, measure=time_it)  # or: as many as run in 80% of the time
    replacer.save(student, "pruned")              # loads back with the pruned shapes
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from replacer.graph.adapter import site_wrappers
from replacer.errors import ReplacerError
from replacer.pruning.groups import GroupIndex, ParameterCount, Scope, apply_shapes, feed_forwards, shrink
from replacer.pruning.embeddings import (
    factorisable, factorise_token_embeddings, full_rank_overhead, merge_full,
    token_use,
)
from replacer.pruning.balance import Balance, balanced
from replacer.pruning.importance import Importance, hoyer_square, magnitude, taylor
from replacer.pruning.latency import LatencyFit, Measure, fit_latency
from replacer.pruning.ranking import choose


@dataclass(frozen=True)
class PruneResult:
    mixer_params_before: int
    mixer_params_after: int
    removed_groups: int
    removed_by_site: dict[str, int]  # by owner: a site, or a block for its MLP channels
    params_before: int = 0  # the whole model's
    params_after: int = 0
    removed_by_kind: dict[str, int] = field(default_factory=dict)  # mixer, attention heads, feed-forward
    latency: LatencyFit | None = None  # with a latency budget: what the search measured


def mixer_parameters(model: nn.Module) -> int:
    """Parameters of every replaced site's mixer (what pruning budgets are fractions of)."""
    return sum(p.numel() for w in site_wrappers(model).values() for p in w.mixer.parameters())


def model_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _outside_groups(model: nn.Module, index: GroupIndex) -> int:
    """Parameters of `model` that no group of `index` holds (embeddings, norms, ...): pruning keeps them."""
    return model_parameters(model) - ParameterCount(index).total


def fixed_fraction(model: nn.Module, embeddings: bool = True) -> float:
    """The share of `model`'s parameters that no prunable group holds (position embeddings, norms,
    projections; token embeddings too unless `embeddings`, which factorises them when pruning):
    whole-model budgets must lie above it."""
    outside = _outside_groups(model, GroupIndex.of(model, "model"))
    if embeddings:
        outside -= sum(table.weight.numel() for table in factorisable(model).values())
    return outside / model_parameters(model)


def importance_scores(
    index: GroupIndex, importance: Importance, losses: Iterable[Callable[[], torch.Tensor]] | None, balance: Balance = "mean",
    balance_losses: Iterable[Callable[[], torch.Tensor]] | None = None,
) -> torch.Tensor:
    """One score per group of `index` (lower goes first), made comparable across part kinds as `balance` says
    (`replacer.pruning.balance`). `losses` feed the taylor importance and, unless `balance_losses` are
    given, the measured balance."""
    losses = None if losses is None else list(losses)
    if importance == "taylor":
        if losses is None:
            raise ReplacerError("importance='taylor' needs losses: callables that return a loss on a batch")
        scores = taylor(index, losses)
    elif importance in ("magnitude", "hoyer"):
        scores = magnitude(index)
    else:
        raise ReplacerError(f"unknown importance {importance!r}; choose magnitude, taylor or hoyer")
    return balanced(index, scores, balance, losses if balance_losses is None else balance_losses)


def _check_budget(budget: float | int, scope: Scope) -> None:
    if isinstance(budget, float) and not 0 < budget <= 1:
        whose = "the whole model's" if scope == "model" else "the mixers'"
        raise ReplacerError(f"params={budget}: give a fraction in (0, 1] of {whose} parameters or a count")


def index_target(model: nn.Module, index: GroupIndex, budget: float | int, scope: Scope) -> int:
    """The parameter count `index`'s tensors must reach so that the model meets `budget`: a fraction in
    (0, 1] or a count, of the mixers' parameters (`scope="mixers"`) or of the whole model's (`"model"`)."""
    _check_budget(budget, scope)
    if scope == "mixers":
        return round(budget * mixer_parameters(model)) if isinstance(budget, float) else budget
    total = model_parameters(model)
    target = round(budget * total) if isinstance(budget, float) else budget
    fixed = _outside_groups(model, index)
    if target <= fixed:
        raise ReplacerError(
            f"cannot prune the model to {target:,} parameters: {fixed:,} ({fixed / total:.0%} of it) sit outside every "
            "prunable group (norms, projections, embeddings not factorised), so ask for a budget above that"
        )
    return target - fixed


def prune(
    model: nn.Module,
    params: float | int | None = None,
    importance: Importance = "magnitude",
    losses: Iterable[Callable[[], torch.Tensor]] | None = None,
    uniform: bool = False,
    latency: float | None = None,
    measure: Measure | None = None,
    scope: Scope = "mixers",
    balance: Balance = "mean",
    embeddings: bool = True,
    token_counts: dict[str, torch.Tensor] | None = None,
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
    `scope="model"` also ranks every block's MLP hidden channels and the kept attention heads of
    head-level hybrids, and `params` is then a fraction (or count) of the whole model's parameters;
    `balance` makes the kinds' importances comparable: `mean` divides each by its kind's mean, `measured`
    ranks groups by the loss per parameter their kind's cut costs, measured on `losses`
    (`replacer.pruning.balance`), `none` compares raw scores. With
    `embeddings` the model's token embedding is factorised (`replacer.pruning.embeddings`) and its
    components ranked too, each token's row weighted by `token_counts` (from `token_use`) where given.
    """
    if getattr(model, "replacer_record", None) is None:
        raise ReplacerError("prune works on models returned by replacer.replace (or replacer.load)")
    if (params is None) == (latency is None):
        raise ReplacerError("prune needs exactly one budget: params (fraction or count) or latency (fraction)")
    if scope not in ("mixers", "model"):
        raise ReplacerError(f"scope={scope!r}: choose mixers (their parameters only) or model (MLP channels and kept heads too)")
    if params is not None:
        _check_budget(params, scope)
    if scope == "model" and embeddings:
        if isinstance(params, float):  # of the model as it is, not of its full-rank factorisation
            params = round(params * model_parameters(model))
        factorise_token_embeddings(model, token_counts)
    index = GroupIndex.of(model, scope)
    scores = importance_scores(index, importance, losses, balance)
    fit = None
    if latency is not None:
        if not 0 < latency <= 1 or measure is None:
            raise ReplacerError(f"latency={latency}: give a fraction in (0, 1] of the current latency and a measure(model) -> ms")
        current_ms = measure(model)
        fit = fit_latency(model, index, scores, latency * current_ms, measure, uniform, current_ms=current_ms)
        target = fit.params
    else:
        target = index_target(model, index, params, scope)
    return cut(model, index, scores, target, uniform, fit)


def cut(
    model: nn.Module, index: GroupIndex, scores: torch.Tensor, params: int, uniform: bool = False, latency: LatencyFit | None = None
) -> PruneResult:
    """Remove the groups `scores` ranks lowest until `index`'s tensors hold at most `params` parameters
    (what `prune` does once it has scores; callers that already scored the groups call it directly).
    A factorised token embedding that lost no component is merged back (at full rank it only costs)."""
    before, model_before = mixer_parameters(model), model_parameters(model) - full_rank_overhead(model)
    remove = choose(index, scores, params, uniform)
    model.replacer_record.setdefault("shapes", {}).update(shrink(model, index, remove))
    merge_full(model)
    return PruneResult(
        mixer_params_before=before,
        mixer_params_after=mixer_parameters(model),
        removed_groups=len(remove),
        removed_by_site=dict(Counter(index.sites[g] for g in remove)),
        params_before=model_before,
        params_after=model_parameters(model),
        removed_by_kind=dict(Counter(index.kinds[g] for g in remove)),
        latency=latency,
    )


__all__ = [
    "Balance", "GroupIndex", "Importance", "LatencyFit", "Measure", "PruneResult", "Scope", "apply_shapes", "cut", "feed_forwards",
    "factorise_token_embeddings", "fit_latency", "hoyer_square", "importance_scores", "index_target", "mixer_parameters",
    "model_parameters", "prune", "token_use",
]
