"""The record an analyzer plugin registers: something that scores sites (or heads) on calibration data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

from torch import nn

from replacer.graph.site import Site

AnalyzerFn = Callable[[nn.Module, list[Site], Iterable[Any]], dict[str, Any]]


@dataclass(frozen=True)
class AnalyzerSpec:
    """`run(model, sites, batches)` returns per-site statistics keyed by site name."""

    name: str
    run: AnalyzerFn
    summary: str = ""
