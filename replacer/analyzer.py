"""The record an analyzer plugin registers: something that scores sites (or heads) on calibration data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

from torch import nn

from replacer.graph.site import Site

ForwardPass = Callable[[], Any]
"""Runs the model once on one calibration batch."""

AnalyzerFn = Callable[..., dict[str, Any]]


@dataclass(frozen=True)
class AnalyzerSpec:
    """`run(model, sites, passes, **options)` runs every forward pass and returns statistics keyed by site name."""

    name: str
    run: AnalyzerFn
    summary: str = ""

    def __call__(self, model: nn.Module, sites: list[Site], passes: Iterable[ForwardPass], **options: Any) -> dict[str, Any]:
        return self.run(model, sites, passes, **options)
