"""One global ranking of every group of every site, cut at a parameter budget."""

from __future__ import annotations

from collections import Counter

import torch

from replacer.errors import ReplacerError
from replacer.pruning.groups import GroupIndex, ParameterCount


def choose(index: GroupIndex, scores: torch.Tensor, target_params: int) -> list[int]:
    """The least important groups, across all sites at once, whose removal brings the mixers' parameters
    to `target_params` or below. The last group of each family (one head's units, ...) always stays."""
    count = ParameterCount(index)
    family = [(site, group.family) for site, group in zip(index.sites, index.groups)]
    members = Counter(family)
    remove: list[int] = []
    for gid in torch.argsort(scores.detach().cpu(), stable=True).tolist():
        if count.total <= target_params:
            break
        if members[family[gid]] == 1:
            continue
        members[family[gid]] -= 1
        count.remove(gid)
        remove.append(gid)
    if count.total > target_params:
        raise ReplacerError(
            f"cannot prune the mixers to {target_params:,} parameters: {count.total:,} remain when every structure "
            "keeps one member; ask for a larger budget"
        )
    return remove
