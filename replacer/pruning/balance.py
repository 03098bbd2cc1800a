"""Groups of different kinds put on one scale by measuring what cutting them costs.

An importance score orders the groups of one kind well, but says little about how a mixer unit
compares with an MLP channel or a component of the token embedding, and nothing about how many
parameters each frees. Dividing by the kind's mean (`replacer.pruning.importance.per_kind`) makes
every kind lose about the same share of its groups, whatever their size and however much the model
relies on them. Here each kind's least important groups are instead zeroed at a few depths, the loss
increase is measured on a few batches, and the curve of loss against parameters freed is made convex
(its lower hull, after Optimal Brain Damage's per-structure sensitivity and the layer-wise sensitivity
analyses of channel pruning). Cutting the groups in order of their segment's loss per parameter, the
cheapest first, is then the greedy answer to the budget as a knapsack problem, at every budget at once.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from typing import Callable, Iterable, Literal

import torch

from replacer.errors import ReplacerError
from replacer.pruning.groups import GroupIndex, ParameterCount
from replacer.pruning.importance import per_kind
from replacer.pruning.ranking import removable

Balance = Literal["measured", "mean", "none"]
DEPTHS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)
"""Fractions of a kind's removable parameters at which the loss is measured."""


def balanced(
    index: GroupIndex, scores: torch.Tensor, balance: Balance, losses: Iterable[Callable[[], torch.Tensor]] | None = None
) -> torch.Tensor:
    """`scores` made comparable across the kinds of `index` (lower goes first): `measured` (`measured_order`,
    needs `losses`), `mean` (each divided by its kind's mean) or `none` (raw). An index of one part kind
    (mixers alone) keeps its raw scores."""
    if balance not in ("measured", "mean", "none"):
        raise ReplacerError(f"unknown balance {balance!r}; choose measured, mean or none")
    if balance == "none" or len(set(index.kinds)) < 2:
        return scores
    if balance == "mean":
        return per_kind(index, scores)
    if losses is None:
        raise ReplacerError("balance='measured' needs losses: callables that return a loss on a batch")
    return measured_order(index, scores, losses)


@torch.no_grad()
def measured_order(
    index: GroupIndex, scores: torch.Tensor, losses: Iterable[Callable[[], torch.Tensor]], depths: tuple[float, ...] = DEPTHS
) -> torch.Tensor:
    """A rank per group (0 goes first): by the measured loss per parameter of cutting its kind down to it.

    Within a kind, groups keep the order of `scores`. `losses` (callables returning a loss on one batch,
    deterministic: the model in eval mode) are averaged after zeroing each kind's lowest groups to each
    of `depths`; the weights are restored afterwards. The last member of every family (`ranking.removable`)
    ranks after every group that may go.
    """
    losses = list(losses)
    if not losses:
        raise ReplacerError("the measured balance needs at least one loss batch")
    kinds = index.group_kinds()
    order = torch.argsort(scores.detach().cpu(), stable=True).tolist()
    cost = [math.inf] * len(index)
    saved = {name: p.detach().clone() for name, p in index.params.items()}
    base = _mean(losses)
    for kind in sorted(set(kinds)):
        sequence = list(removable(index, (g for g in order if kinds[g] == kind)))
        if not sequence:
            continue
        freed = _freed(index, sequence)
        points, done = [(0, 0.0)], 0
        try:
            for depth in depths:
                upto = max(bisect_right(freed, depth * freed[-1]), 1)
                if upto > done:
                    index.zero_(sequence[done:upto])
                    done = upto
                    points.append((freed[upto - 1], _mean(losses) - base))
        finally:
            _restore(index, saved)
        for gid, slope in zip(sequence, _segment_slopes(points, freed)):
            cost[gid] = slope
    tiebreak = per_kind(index, scores).detach().cpu().tolist()
    ranked = sorted(range(len(index)), key=lambda g: (cost[g], tiebreak[g]))
    rank = torch.empty(len(index), dtype=torch.float64)
    rank[torch.tensor(ranked)] = torch.arange(len(index), dtype=torch.float64)
    return rank


def _mean(losses: list[Callable[[], torch.Tensor]]) -> float:
    return sum(float(loss()) for loss in losses) / len(losses)


def _restore(index: GroupIndex, saved: dict[str, torch.Tensor]) -> None:
    for name, p in index.params.items():
        p.copy_(saved[name])


def _freed(index: GroupIndex, sequence: list[int]) -> list[int]:
    """Parameters freed by cutting each prefix of `sequence` (exact where groups share tensors)."""
    count = ParameterCount(index)
    start, freed = count.total, []
    for gid in sequence:
        count.remove(gid)
        freed.append(start - count.total)
    return freed


def _segment_slopes(points: list[tuple[int, float]], freed: list[int]) -> list[float]:
    """For each position in `freed`, the loss per parameter of the lower convex hull segment above it.

    Losses are first made non-decreasing and non-negative (cutting more cannot honestly help; a lower
    loss is noise), so every slope is >= 0 and slopes rise along the kind's order.
    """
    curve: list[tuple[int, float]] = []
    top = 0.0
    for x, y in points:
        top = max(top, y)
        if curve and curve[-1][0] == x:  # groups that free nothing: one point
            curve.pop()
        curve.append((x, top))
    if len(curve) == 1:
        return [0.0] * len(freed)
    hull: list[tuple[int, float]] = []
    for x, y in curve:
        while len(hull) >= 2 and _below_or_on(hull[-2], hull[-1], (x, y)):
            hull.pop()
        hull.append((x, y))
    slopes, segment = [], 1
    for x in freed:
        while hull[segment][0] < x:
            segment += 1
        (x0, y0), (x1, y1) = hull[segment - 1], hull[segment]
        slopes.append((y1 - y0) / (x1 - x0))
    return slopes


def _below_or_on(a: tuple[int, float], b: tuple[int, float], c: tuple[int, float]) -> bool:
    """Whether `b` lies on or above the line from `a` to `c` (so the lower hull drops it)."""
    return (b[1] - a[1]) * (c[0] - a[0]) >= (c[1] - a[1]) * (b[0] - a[0])
