"""The `sparsity` analyzer: per layer and head, how sparse, local and recent the teacher's attention is.

Probabilities are recorded through each site's adapter, which computes them eagerly even where the
model normally runs a fused kernel (SDPA) that returns none. The statistics rank layers and heads
for replacement: sparse, local heads are what a recurrence reproduces best.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable

import torch
from torch import nn

from replacer.analyzer import AnalyzerSpec, ForwardPass
from replacer.errors import SiteSelectionError
from replacer.graph.adapter import Unsupported
from replacer.graph.site import Site
from replacer.hookspecs import hookimpl
from replacer_sparsity.statistics import METRICS, head_sums


@torch.no_grad()
def analyze_sparsity(
    model: nn.Module, sites: list[Site], passes: Iterable[ForwardPass], top_k: int = 8, window: int = 16
) -> dict[str, Any]:
    """Per site: `heads` (each metric per head) and `mean` (over heads), averaged over every real query."""
    from replacer.plugins import get_registry

    adapters = {a.name: a for a in get_registry().adapters}
    sums: dict[str, dict[str, torch.Tensor]] = {}
    counts: dict[str, torch.Tensor] = {}
    was_training = model.training
    model.eval()
    try:
        with contextlib.ExitStack() as stack:
            try:
                records = {
                    s.name: stack.enter_context(adapters[s.adapter].record_attention(model.get_submodule(s.name))) for s in sites
                }
                for run in passes:
                    run()
                    for site in sites:
                        for probs in records[site.name]:
                            part, count = head_sums(probs, top_k, window, site.causal)
                            total = sums.setdefault(site.name, {k: torch.zeros_like(v) for k, v in part.items()})
                            for k, v in part.items():
                                total[k] += v
                            counts[site.name] = counts.get(site.name, 0) + count
                        records[site.name].clear()
            except Unsupported as why:
                raise SiteSelectionError(
                    f"the sparsity analysis cannot read attention probabilities here ({why}); analyse with another "
                    "analyzer, or choose layers without analysis"
                ) from None
    finally:
        model.train(was_training)
    result = {}
    for site in sites:
        if site.name not in sums:
            raise RuntimeError(f"site {site.name} was never called: the forward passes do not reach it")
        heads = {k: (v / counts[site.name].clamp_min(1)).tolist() for k, v in sums[site.name].items()}
        result[site.name] = {
            "layer_index": site.layer_index,
            "heads": heads,
            "mean": {k: sum(v) / len(v) for k, v in heads.items()},
        }
    return result


@hookimpl
def replacer_analyzers() -> list[AnalyzerSpec]:
    return [
        AnalyzerSpec(
            name="sparsity",
            run=analyze_sparsity,
            summary="attention entropy, top-k mass, recency ratio and mean distance per layer and head",
        )
    ]


__all__ = ["METRICS", "analyze_sparsity", "head_sums"]
