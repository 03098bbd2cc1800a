"""Wall-clock timing of calls, and of models compared with each other in turns."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch


def interleaved_median_ms(calls: dict[str, Callable[[], Any]], repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median wall-clock milliseconds of each call over `repeats` rounds, after `warmup` calls of each.

    The calls are timed in turns, one of each per round with the order rotating: a machine whose
    speed drifts (shared CPUs do, by 2-4x within an hour) then slows every call alike, so the ratios
    between them hold where medians taken one after the other do not.
    """
    names = list(calls)
    for name in names:
        for _ in range(warmup):
            calls[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            calls[name]()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def median_ms(fn: Callable[[], Any], repeats: int, warmup: int = 2) -> float:
    """Median wall-clock milliseconds of `fn` over `repeats` calls, after `warmup` calls."""
    return interleaved_median_ms({"call": fn}, repeats, warmup)["call"]


@torch.no_grad()
def median_latency_ms(fn: Callable[[], Any], repeats: int, warmup: int = 2) -> float:
    """`median_ms` of inference: no autograd graph is built."""
    return median_ms(fn, repeats, warmup)


@torch.no_grad()
def interleaved_latency_ms(calls: dict[str, Callable[[], Any]], repeats: int, warmup: int = 2) -> dict[str, float]:
    """`interleaved_median_ms` of inference: no autograd graph is built."""
    return interleaved_median_ms(calls, repeats, warmup)
