"""Every prunable group of a replaced model in one index, and physical removal of chosen groups.

Mixers declare groups as parameter slices (`Mixer.prunable_groups`). The index turns them into
one tensor of positions and group ids per (parameter, dimension), so per-group sums over millions
of weights (norms, Taylor terms, the Hoyer penalty) are a few vectorised reductions.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn

from replacer.graph.adapter import site_wrappers
from replacer.errors import ReplacerError
from replacer.mixer import Mixer, PruneGroup


@dataclass
class GroupIndex:
    """All groups of all replaced sites of a model, with global ids in site order."""

    groups: list[PruneGroup]
    sites: list[str]  # the site of each group
    prefixes: dict[str, str]  # site -> where its mixer's parameter names start in the model
    params: dict[str, nn.Parameter]  # every mixer parameter, by its name in the model
    buffers: dict[str, torch.Tensor]  # every mixer buffer (e.g. which output channels remain)
    entries: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    """(parameter, dim) -> (positions along dim, group id of each position)."""

    @classmethod
    def of(cls, model: nn.Module) -> "GroupIndex":
        """Every replaced site of a model; raises when none declares groups."""
        mixers = {site: (f"{site}.mixer.", w.mixer) for site, w in site_wrappers(model).items()}
        index = cls.of_mixers(mixers)
        if not index.groups:
            raise ReplacerError("no replaced site declares prunable groups; prune a model replaced by lstm, gru or ssm")
        return index

    @classmethod
    def of_mixers(cls, mixers: dict[str, tuple[str, Mixer]]) -> "GroupIndex":
        """Mixers by site name, each with the prefix of its parameter names in the model that holds them."""
        groups, sites, params, buffers = [], [], {}, {}
        raw: dict[tuple[str, int], tuple[list[int], list[int]]] = defaultdict(lambda: ([], []))
        for site, (prefix, mixer) in mixers.items():
            params.update({prefix + n: p for n, p in mixer.named_parameters()})
            buffers.update({prefix + n: b for n, b in mixer.named_buffers()})
            for group in mixer.prunable_groups():
                gid = len(groups)
                groups.append(group)
                sites.append(site)
                for name, dim, positions in group.slices:
                    if prefix + name in buffers:
                        continue  # cut with the group, but weighs nothing
                    if prefix + name not in params:
                        raise ReplacerError(f"{type(mixer).__name__} declares a group over unknown tensor {name!r}")
                    pos, ids = raw[(prefix + name, dim)]
                    pos.extend(positions)
                    ids.extend([gid] * len(positions))
        index = cls(groups, sites, {site: prefix for site, (prefix, _) in mixers.items()}, params, buffers)
        index.entries = {key: (torch.tensor(pos), torch.tensor(ids)) for key, (pos, ids) in raw.items()}
        return index

    def __len__(self) -> int:
        return len(self.groups)

    def parameter_name(self, gid: int, name: str) -> str:
        """A group's slice parameter, named as in the model."""
        return self.prefixes[self.sites[gid]] + name

    @torch.no_grad()
    def zero_(self, gids: list[int]) -> None:
        """Set the chosen groups' weights to zero (a zeroed group must be inert: removing it changes nothing)."""
        for gid in gids:
            for name, dim, positions in self.groups[gid].slices:
                full = self.parameter_name(gid, name)
                if full in self.params:
                    self.params[full].index_fill_(dim, torch.tensor(positions, device=self.params[full].device), 0.0)

    def group_sums(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per group, the sum of `values[param]` over the group's slices (differentiable).

        An element in two slices of one group (an LSTM unit's recurrent self-weight) counts twice.
        """
        total = None
        for (name, dim), (positions, ids) in self.entries.items():
            v = values[name]
            other = [d for d in range(v.dim()) if d != dim]
            per_position = v.sum(other) if other else v
            part = per_position.new_zeros(len(self.groups)).index_add(0, ids.to(v.device), per_position[positions.to(v.device)])
            total = part if total is None else total + part
        return total

    def norms(self) -> torch.Tensor:
        """L2 norm of each group's weights (differentiable, for the Hoyer penalty)."""
        return (self.group_sums({n: p.pow(2) for n, p in self.params.items()}) + 1e-12).sqrt()

    def site_ids(self) -> torch.Tensor:
        order = {s: i for i, s in enumerate(dict.fromkeys(self.sites))}
        return torch.tensor([order[s] for s in self.sites])


class ParameterCount:
    """Mixer parameters left after removing groups, kept exact as groups are removed one by one."""

    def __init__(self, index: GroupIndex) -> None:
        self.shapes = {n: list(p.shape) for n, p in index.params.items()}
        self.removed: dict[tuple[str, int], set[int]] = defaultdict(set)
        self.left = {n: p.numel() for n, p in index.params.items()}
        self.total = sum(self.left.values())
        self.slices = []  # parameters only: buffers cut with a group weigh nothing
        for gid, group in enumerate(index.groups):
            named = ((index.parameter_name(gid, n), dim, positions) for n, dim, positions in group.slices)
            self.slices.append([s for s in named if s[0] in self.left])

    def remove(self, gid: int) -> None:
        touched = set()
        for name, dim, positions in self.slices[gid]:
            self.removed[(name, dim)].update(positions)
            touched.add(name)
        for name in touched:
            shape = [size - len(self.removed.get((name, d), ())) for d, size in enumerate(self.shapes[name])]
            left = math.prod(shape)
            self.total += left - self.left[name]
            self.left[name] = left


def shrink(model: nn.Module, index: GroupIndex, remove: list[int]) -> dict[str, list[int]]:
    """Cut the chosen groups' rows and columns out of their tensors; returns the new shapes by tensor name.

    Tensors are replaced by smaller ones (no masks); `requires_grad` is kept, and `nn.Linear`
    modules have their feature counts updated to match.
    """
    cut: dict[str, dict[int, set[int]]] = defaultdict(lambda: defaultdict(set))
    for gid in remove:
        for name, dim, positions in index.groups[gid].slices:
            cut[index.parameter_name(gid, name)][dim].update(positions)
    shapes = {}
    with torch.no_grad():
        for name, dims in cut.items():
            old = index.params.get(name, index.buffers.get(name))
            new = old.detach()
            for dim, positions in dims.items():
                keep = [i for i in range(new.shape[dim]) if i not in positions]
                new = new.index_select(dim, torch.tensor(keep, dtype=torch.long, device=new.device))
            _set_tensor(model, name, old, new.clone())
            shapes[name] = list(new.shape)
    return shapes


def _set_tensor(model: nn.Module, name: str, old: torch.Tensor, new: torch.Tensor) -> None:
    """Put `new` where `old` was: as a parameter (same requires_grad) or a buffer."""
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    if isinstance(old, nn.Parameter):
        setattr(owner, attr, nn.Parameter(new, requires_grad=old.requires_grad))
    else:
        owner.register_buffer(attr, new)
    if isinstance(owner, nn.Linear) and attr == "weight":
        owner.out_features, owner.in_features = new.shape


def apply_shapes(model: nn.Module, shapes: dict[str, list[int]]) -> None:
    """Give tensors the recorded shapes of a pruned model (their values come from its weights file)."""
    tensors = {**dict(model.named_buffers()), **dict(model.named_parameters())}
    for name, shape in shapes.items():
        if name not in tensors:
            raise ReplacerError(f"the checkpoint prunes {name}, which the rebuilt model does not have")
        _set_tensor(model, name, tensors[name], tensors[name].new_zeros(shape))
