"""Which sites to replace: the recipe's explicit choice, or a policy over the teacher's attention statistics."""

from __future__ import annotations

import random
from dataclasses import dataclass

from replacer.errors import ReplacerError
from replacer.graph.site import Site
from replacer.recipe import Recipe, SitePolicy


def needs_analysis(recipe: Recipe) -> bool:
    policy = recipe.sites
    return recipe.analyze.enabled or (isinstance(policy, SitePolicy) and not policy.policy.startswith("random"))


@dataclass(frozen=True)
class Selection:
    """What `replacer.replace` gets: sites (None: all) and, for head-level hybrids, heads per site."""

    sites: list[str | int] | None
    heads: dict[str, list[int]] | None = None


def choose_sites(recipe: Recipe, sites: list[Site], statistics: dict | None) -> Selection:
    """The recipe's choice. Layer policies rank layers by mean attention entropy over heads; head
    policies take single heads by their recency ratio (RecurFormer), or at random."""
    policy = recipe.sites
    if policy == "all":
        return Selection(None)
    if not isinstance(policy, SitePolicy):
        return Selection(policy)
    if statistics is None and not policy.policy.startswith("random"):
        raise ReplacerError(f"sites.policy {policy.policy} ranks by the teacher's attention: the analysis is missing")
    if policy.by_heads:
        return _heads(policy, sites, statistics)
    count = policy.layers if policy.layers is not None else max(1, round(policy.fraction * len(sites)))
    if count > len(sites):
        raise ReplacerError(f"sites.layers={count} but the model has {len(sites)} replaceable layers")
    if policy.policy == "random":
        chosen = random.Random(policy.seed).sample(sites, count)
    else:
        entropy = {s.name: statistics[s.name]["mean"]["entropy"] for s in sites}
        ranked = sorted(sites, key=lambda s: entropy[s.name], reverse=policy.policy == "densest")
        chosen = ranked[:count]
    return Selection([s.name for s in sorted(chosen, key=lambda s: s.layer_index)])


def _heads(policy: SitePolicy, sites: list[Site], statistics: dict | None) -> Selection:
    """recent-heads: heads whose recency ratio passes the threshold, or the given fraction of all heads, most
    recent first. random-heads: the same fraction of heads, drawn with the policy's seed."""
    every = [(site.name, head) for site in sites for head in range(site.num_heads)]
    if policy.policy == "random-heads":
        ranked = [(0.0, name, head) for name, head in random.Random(policy.seed).sample(every, len(every))]
    else:
        recency = {(s.name, h): r for s in sites for h, r in enumerate(statistics[s.name]["heads"]["recency"])}
        ranked = sorted(((recency[key], *key) for key in every), reverse=True)
    if policy.threshold is not None:
        taken = [(name, head) for ratio, name, head in ranked if ratio >= policy.threshold]
    else:
        taken = [(name, head) for _, name, head in ranked[: max(1, round(policy.fraction * len(ranked)))]]
    if not taken:
        raise ReplacerError(f"no head reaches recency {policy.threshold}; lower sites.threshold")
    heads: dict[str, list[int]] = {}
    for name, head in taken:
        heads.setdefault(name, []).append(head)
    order = {s.name: s.layer_index for s in sites}
    names = sorted(heads, key=order.__getitem__)
    return Selection(names, {n: sorted(heads[n]) for n in names})
