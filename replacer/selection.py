"""Which sites to replace: the recipe's explicit choice, or a policy over the teacher's attention statistics."""

from __future__ import annotations

import random

from replacer.errors import ReplacerError
from replacer.graph.site import Site
from replacer.recipe import Recipe, SitePolicy


def needs_analysis(recipe: Recipe) -> bool:
    policy = recipe.sites
    return recipe.analyze.enabled or (isinstance(policy, SitePolicy) and policy.policy != "random")


def choose_sites(recipe: Recipe, sites: list[Site], statistics: dict | None) -> list[str] | None:
    """Site names to replace (None: all). Policies rank layers by their mean attention entropy over heads."""
    policy = recipe.sites
    if policy == "all":
        return None
    if not isinstance(policy, SitePolicy):
        return policy
    count = policy.layers if policy.layers is not None else max(1, round(policy.fraction * len(sites)))
    if count > len(sites):
        raise ReplacerError(f"sites.layers={count} but the model has {len(sites)} replaceable layers")
    if policy.policy == "random":
        chosen = random.Random(policy.seed).sample(sites, count)
    else:
        if statistics is None or any(s.name not in statistics for s in sites):
            raise ReplacerError(f"sites.policy {policy.policy} ranks layers by the teacher's attention: the analysis is missing")
        entropy = {s.name: statistics[s.name]["mean"]["entropy"] for s in sites}
        ranked = sorted(sites, key=lambda s: entropy[s.name], reverse=policy.policy == "densest")
        chosen = ranked[:count]
    return [s.name for s in sorted(chosen, key=lambda s: s.layer_index)]
