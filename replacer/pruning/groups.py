"""Every prunable group of a replaced model in one index, and physical removal of chosen groups.

Mixers declare groups as parameter slices (`Mixer.prunable_groups`). The index turns them into
one tensor of positions and group ids per (parameter, dimension), so per-group sums over millions
of weights (norms, Taylor terms, the Hoyer penalty) are a few vectorised reductions.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from replacer.graph.adapter import Unsupported, site_wrappers
from replacer.graph.feed_forward import FeedForward
from replacer.graph.scan import installed_adapter, scan
from replacer.errors import ReplacerError
from replacer.mixer import Mixer, PruneGroup
from replacer.pruning.embeddings import FactorisedEmbedding

Scope = Literal["mixers", "model"]


@dataclass(frozen=True)
class Part:
    """Groups that belong together: one site's mixer, one hybrid's kept heads, one block's MLP, or one
    factorised token embedding's components."""

    owner: str  # the site or block the groups belong to
    kind: str  # what they are (KINDS): their importances are compared after normalising per kind
    prefix: str  # where the groups' tensor names start in the model
    groups: list[PruneGroup]
    tensors: dict[str, torch.Tensor]  # the part's parameters and buffers by name under `prefix`; parameters count


KINDS = ("mixer", "attention heads", "feed-forward", "token embedding")


@dataclass
class GroupIndex:
    """All groups of the parts of a model, with global ids in part order."""

    groups: list[PruneGroup]
    sites: list[str]  # the owner of each group (a site, or a block for MLP channels)
    kinds: list[str]  # the part kind of each group
    prefixes: list[str]  # where each group's tensor names start in the model
    params: dict[str, nn.Parameter]  # every counted parameter, by its name in the model
    buffers: dict[str, torch.Tensor]  # buffers cut with groups (e.g. which output channels remain)
    entries: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    """(parameter, dim) -> (positions along dim, group id of each position)."""

    @classmethod
    def of(cls, model: nn.Module, scope: Scope = "mixers") -> "GroupIndex":
        """The replaced sites' mixers (`scope="mixers"`), or every prunable part of the model (`"model"`:
        also each block's MLP channels and hybrids' kept heads); raises when nothing declares groups."""
        parts = mixer_parts(model) if scope == "mixers" else model_parts(model)
        index = cls.of_parts(parts)
        if not index.groups:
            raise ReplacerError("no replaced site declares prunable groups; prune a model replaced by lstm, gru or ssm")
        return index

    @classmethod
    def of_mixers(cls, mixers: dict[str, tuple[str, Mixer]]) -> "GroupIndex":
        """Mixers by site name, each with the prefix of its parameter names in the model that holds them."""
        return cls.of_parts([_mixer_part(site, prefix, mixer) for site, (prefix, mixer) in mixers.items()])

    @classmethod
    def of_parts(cls, parts: list[Part]) -> "GroupIndex":
        groups, sites, kinds, prefixes, params, buffers = [], [], [], [], {}, {}
        raw: dict[tuple[str, int], tuple[list[int], list[int]]] = defaultdict(lambda: ([], []))
        for part in parts:
            for name, tensor in part.tensors.items():
                (params if isinstance(tensor, nn.Parameter) else buffers)[part.prefix + name] = tensor
            for group in part.groups:
                gid = len(groups)
                groups.append(group)
                sites.append(part.owner)
                kinds.append(part.kind)
                prefixes.append(part.prefix)
                for name, dim, positions in group.slices:
                    if part.prefix + name in buffers:
                        continue  # cut with the group, but weighs nothing
                    if part.prefix + name not in params:
                        raise ReplacerError(f"{part.owner} ({part.kind}) declares a group over unknown tensor {name!r}")
                    pos, ids = raw[(part.prefix + name, dim)]
                    pos.extend(positions)
                    ids.extend([gid] * len(positions))
        index = cls(groups, sites, kinds, prefixes, params, buffers)
        index.entries = {key: (torch.tensor(pos), torch.tensor(ids)) for key, (pos, ids) in raw.items()}
        return index

    def __len__(self) -> int:
        return len(self.groups)

    def parameter_name(self, gid: int, name: str) -> str:
        """A group's slice parameter, named as in the model."""
        return self.prefixes[gid] + name

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

    def group_kinds(self) -> list[tuple[str, str]]:
        """Per group, what it competes as: its part's kind and its own within it (an LSTM's units or input
        channels, MLP channels, kv heads, embedding components)."""
        return [(part, group.kind) for part, group in zip(self.kinds, self.groups)]

    def site_ids(self) -> torch.Tensor:
        """An integer per group: which part (owner and kind) it belongs to."""
        owners = list(zip(self.sites, self.kinds))
        order = {o: i for i, o in enumerate(dict.fromkeys(owners))}
        return torch.tensor([order[o] for o in owners])


def _mixer_part(site: str, prefix: str, mixer: Mixer) -> Part:
    tensors = {**dict(mixer.named_buffers()), **dict(mixer.named_parameters())}
    return Part(site, "mixer", prefix, list(mixer.prunable_groups()), tensors)


def mixer_parts(model: nn.Module) -> list[Part]:
    """Every replaced site's mixer (its parameters all count, grouped or not: budgets are fractions of them)."""
    return [_mixer_part(site, f"{site}.mixer.", w.mixer) for site, w in site_wrappers(model).items()]


def _named_part(owner: str, kind: str, prefix: str, module: nn.Module, groups: list[PruneGroup]) -> Part:
    """A part whose counted tensors are the ones its groups cut (the rest of `module` is not its to budget)."""
    everything = {**dict(module.named_buffers()), **dict(module.named_parameters())}
    named = {name for group in groups for name, _, _ in group.slices}
    return Part(owner, kind, prefix, groups, {n: everything[n] for n in named if n in everything})


def model_parts(model: nn.Module) -> list[Part]:
    """Mixers, the kept heads of head-level hybrids, the MLP of every block with attention (replaced
    or not) that its adapter can find, and the components of factorised token embeddings
    (`replacer.pruning.embeddings`); a block whose MLP cannot be cut channel by channel is left whole."""
    parts = mixer_parts(model)
    for site, wrapper in site_wrappers(model).items():
        groups = wrapper.prunable_groups()
        if groups:
            parts.append(_named_part(site, "attention heads", f"{site}.", wrapper, groups))
    blocks = set()
    for mlp in feed_forwards(model).values():
        if isinstance(mlp, FeedForward) and mlp.block not in blocks:
            blocks.add(mlp.block)
            parts.append(_named_part(mlp.block, "feed-forward", f"{mlp.block}.", model.get_submodule(mlp.block), mlp.groups()))
    for name, module in model.named_modules():
        if isinstance(module, FactorisedEmbedding):
            parts.append(_named_part(name, "token embedding", f"{name}.", module, module.prunable_groups()))
    return parts


def feed_forwards(model: nn.Module) -> dict[str, FeedForward | str]:
    """Per attention site (in layer order), the MLP its adapter finds in the site's block, or why there is none."""
    found = scan(model)
    sites = sorted((*found.sites, *found.replaced), key=lambda s: s.layer_index)
    names, unsupported = {s.name for s in sites}, {u.name for u in found.unsupported}
    result: dict[str, FeedForward | str] = {}
    for site in sites:
        try:
            result[site.name] = installed_adapter(site.adapter).feed_forward(model, site, names, unsupported)
        except Unsupported as why:
            result[site.name] = str(why)
    return result


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
    if attr == "weight" and isinstance(owner, nn.Linear):
        owner.out_features, owner.in_features = new.shape
    elif attr == "weight" and isinstance(getattr(owner, "nf", None), int):  # transformers' Conv1D: (in, out), width nf
        owner.nf = new.shape[1]


def apply_shapes(model: nn.Module, shapes: dict[str, list[int]]) -> None:
    """Give tensors the recorded shapes of a pruned model (their values come from its weights file)."""
    tensors = {**dict(model.named_buffers()), **dict(model.named_parameters())}
    for name, shape in shapes.items():
        if name not in tensors:
            raise ReplacerError(f"the checkpoint prunes {name}, which the rebuilt model does not have")
        _set_tensor(model, name, tensors[name], tensors[name].new_zeros(shape))
