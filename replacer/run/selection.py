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
    policies take single heads by their recency ratio (RecurFormer) or entropy, or at random."""
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


HEAD_RANKINGS = {"recent-heads": ("recency", True), "sparse-heads": ("entropy", False)}
"""Head policies that rank by a statistic of the teacher's attention: which one, and whether highest first."""


def _heads(policy: SitePolicy, sites: list[Site], statistics: dict | None) -> Selection:
    """recent-heads: units (heads, or with `kv_groups` whole key/value groups) whose recency ratio passes
    the threshold, or the given fraction of all units, most recent first. sparse-heads: the fraction whose
    attention entropy is lowest. random-heads: the fraction drawn with the policy's seed. A unit of several
    heads ranks by their mean. `per_layer` caps how many units one layer gives."""
    every = _units(policy, sites)
    if policy.policy == "random-heads":
        ranked = [(0.0, name, heads) for name, heads in random.Random(policy.seed).sample(every, len(every))]
    else:
        metric, highest_first = HEAD_RANKINGS[policy.policy]
        values = {s.name: statistics[s.name]["heads"][metric] for s in sites}
        ranked = sorted(((sum(values[name][h] for h in heads) / len(heads), name, heads) for name, heads in every),
                        reverse=highest_first)
    if policy.threshold is not None:
        wanted = [(name, heads) for ratio, name, heads in ranked if ratio >= policy.threshold]
        if not wanted:
            raise ReplacerError(f"no head reaches recency {policy.threshold}; lower sites.threshold")
        count = len(wanted)
    else:
        wanted, count = [(name, heads) for _, name, heads in ranked], max(1, round(policy.fraction * len(ranked)))
    taken = _capped(policy, sites, wanted, count, strict=policy.threshold is None)
    chosen: dict[str, list[int]] = {}
    for name, heads in taken:
        chosen.setdefault(name, []).extend(heads)
    order = {s.name: s.layer_index for s in sites}
    names = sorted(chosen, key=order.__getitem__)
    return Selection(names, {n: sorted(chosen[n]) for n in names})


def _units(policy: SitePolicy, sites: list[Site]) -> list[tuple[str, tuple[int, ...]]]:
    """What a head policy takes: single heads, or with `kv_groups` each key/value group's query heads
    (head h reads group h // (heads per group), as grouped-query attention repeats them)."""
    units = []
    for site in sites:
        size = site.num_heads // site.num_kv_heads if policy.kv_groups else 1
        units += [(site.name, tuple(range(g * size, (g + 1) * size))) for g in range(site.num_heads // size)]
    return units


def _capped(policy: SitePolicy, sites: list[Site], wanted: list, count: int, strict: bool) -> list:
    """The first `count` of the ranked `wanted` units, at most `per_layer` of each layer's units; `strict`
    (a fraction budget): fewer than `count` is an error, not a smaller selection."""
    if policy.per_layer is None:
        return wanted[:count]
    per_site = {}
    for name, _ in _units(policy, sites):
        per_site[name] = per_site.get(name, 0) + 1
    caps = {name: int(policy.per_layer * n + 1e-9) for name, n in per_site.items()}
    taken, used = [], dict.fromkeys(caps, 0)
    for name, heads in wanted:
        if len(taken) == count:
            break
        if used[name] < caps[name]:
            used[name] += 1
            taken.append((name, heads))
    if strict and len(taken) < count:
        unit = "key/value groups" if policy.kv_groups else "heads"
        raise ReplacerError(
            f"sites.per_layer={policy.per_layer} allows {len(taken)} {unit} but the policy asks for {count}: "
            "raise per_layer or lower fraction"
        )
    return taken
