"""One global ranking of every group of every site, cut at a parameter budget."""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Iterable, Iterator

import torch

from replacer.errors import ReplacerError
from replacer.pruning.groups import GroupIndex, ParameterCount


def choose(
    index: GroupIndex, scores: torch.Tensor, target_params: int, uniform: bool = False, strict: bool = True
) -> list[int]:
    """The least important groups, across all sites at once, whose removal brings the mixers' parameters
    to `target_params` or below. The last group of each family (one head's units, ...) always stays;
    when that makes the target unreachable, `strict` raises, otherwise the deepest possible cut is returned.

    `uniform`: cut the families of one kind at a site in lockstep (each loses its own least important
    member), so they keep equal widths and the site's compute shrinks with its parameters. Steps rank by
    their members' summed scores; when the index mixes part kinds (a step of one MLP channel against one
    of six LSTM units) by the mean, so a step is not dearer for cutting more families at once.
    """
    if uniform:
        return _choose_in_lockstep(index, scores, target_params, strict)
    count = ParameterCount(index)
    remove: list[int] = []
    for gid in removable(index, torch.argsort(scores.detach().cpu(), stable=True).tolist()):
        if count.total <= target_params:
            break
        count.remove(gid)
        remove.append(gid)
    if strict:
        _check_reached(count, target_params)
    return remove


def removable(index: GroupIndex, order: Iterable[int]) -> Iterator[int]:
    """The groups of `order` that may go, in that order: the last member of each family stays."""
    family = [(site, group.family) for site, group in zip(index.sites, index.groups)]
    members = Counter(family)
    for gid in order:
        if members[family[gid]] > 1:
            members[family[gid]] -= 1
            yield gid


def _choose_in_lockstep(index: GroupIndex, scores: torch.Tensor, target_params: int, strict: bool) -> list[int]:
    """Steps of one member per family of a (site, kind), ranked globally by the members' summed scores."""
    score = scores.detach().cpu().tolist()
    mixed = len(set(index.kinds)) > 1
    families: dict[tuple[str, str], dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for gid, (site, group) in enumerate(zip(index.sites, index.groups)):
        families[(site, group.kind or group.family)][group.family].append(gid)
    steps = []
    for key, members in families.items():
        ranked = [sorted(gids, key=score.__getitem__) for gids in members.values()]
        for depth in range(min(len(r) for r in ranked) - 1):  # every family keeps one member
            gids = [r[depth] for r in ranked]
            total = sum(score[g] for g in gids)
            steps.append((total / len(gids) if mixed else total, depth, key, gids))
    count = ParameterCount(index)
    remove: list[int] = []
    for _, _, _, gids in sorted(steps, key=lambda step: step[:2]):  # a kind's steps come in depth order
        if count.total <= target_params:
            break
        for gid in gids:
            count.remove(gid)
        remove.extend(gids)
    if strict:
        _check_reached(count, target_params)
    return remove


def _check_reached(count: ParameterCount, target_params: int) -> None:
    if count.total > target_params:
        raise ReplacerError(
            f"cannot prune the prunable groups' tensors to {target_params:,} parameters: {count.total:,} remain when "
            "every structure keeps one member; ask for a larger budget"
        )
