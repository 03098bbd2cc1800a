"""Pruning to a latency budget: the largest parameter count whose pruned model is fast enough, found by timing.

Latency is not a sum over groups: a recurrence's cost follows its widest head and its per-step
overhead, so no per-group cost model predicts it. The search instead times pruned copies of the model
(bisection over the parameter count of the same ranking), which measures exactly what will run.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from replacer.errors import ReplacerError
from replacer.pruning.groups import GroupIndex, ParameterCount, shrink
from replacer.pruning.ranking import choose

Measure = Callable[[nn.Module], float]
"""Milliseconds one call of the model takes (a median over repeats, on fixed inputs)."""


@dataclass(frozen=True)
class LatencyFit:
    params: int  # the parameters of the index's tensors to prune to
    latency_ms: float  # measured on a copy pruned to `params`
    target_ms: float


def fit_latency(
    model: nn.Module, index: GroupIndex, scores: torch.Tensor, target_ms: float, measure: Measure,
    uniform: bool = False, tolerance: float = 0.01, current_ms: float | None = None,
) -> LatencyFit:
    """The largest parameter count of `index`'s tensors (within `tolerance` of all of them) whose pruned copy
    runs within `target_ms`; raises when even the deepest cut is too slow. `model` is not changed;
    `current_ms` is its latency when the caller has already timed it."""
    total = ParameterCount(index).total

    def timed(params: int) -> tuple[float, int]:
        remove = choose(index, scores, params, uniform, strict=False)
        pruned = copy.deepcopy(model)
        shrink(pruned, index, remove)
        count = ParameterCount(index)
        for gid in remove:
            count.remove(gid)
        return measure(pruned), count.total

    current_ms = measure(model) if current_ms is None else current_ms
    if current_ms <= target_ms:
        return LatencyFit(total, current_ms, target_ms)
    floor_ms, floor_params = timed(0)
    if floor_ms > target_ms:
        raise ReplacerError(
            f"a latency of {target_ms:.2f} ms is out of reach: pruned as far as it goes ({floor_params:,} parameters "
            f"left in its prunable groups) the model still takes {floor_ms:.2f} ms (unpruned {current_ms:.2f} ms); ask for a larger "
            "latency budget, or time a larger batch (evaluate.latency_batch_sizes), where widths matter more"
        )
    low, low_ms, high = floor_params, floor_ms, total  # low meets the target, high does not
    while high - low > max(1, round(tolerance * total)):
        middle = (low + high) // 2
        ms, _ = timed(middle)
        if ms <= target_ms:
            low, low_ms = middle, ms
        else:
            high = middle
    return LatencyFit(low, low_ms, target_ms)
