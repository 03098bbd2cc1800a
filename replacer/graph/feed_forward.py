"""Where a block's feed-forward network (its MLP) is, and which slices make up one of its hidden channels.

A transformer block's MLP expands the model width `d` to `m` hidden channels, applies an elementwise
activation (and, in gated MLPs, multiplies by a second expansion), and projects back to `d`. Hidden
channel `j` is then exactly: row `j` of every input projection (rows `j` and `j + m` of a fused
gate-and-up projection), its bias, and column `j` of the output projection. Removing those slices
removes the channel and nothing else, which is what makes MLP channels prunable groups.

The structure is found from shapes, not class names, so families no adapter was written for still
work: among the projections of the block around an attention site (outside every attention
module), exactly one maps some width `m != d` back to `d`, and every projection that maps `d` to `m`
(or to `2 m`, fused) feeds it. Anything else in the block that holds a tensor over the `m` channels
(a norm over the hidden channels, a depthwise convolution) mixes channels or needs its own cut, so
such an MLP is refused with the reason rather than cut wrongly.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from replacer.mixer import PruneGroup


class NoFeedForward(LookupError):
    """No MLP whose channels can be cut one by one was found; the text says why."""


@dataclass(frozen=True)
class Projection:
    """One linear map of an MLP, named relative to its block."""

    name: str
    channel_dim: int  # the dim of `weight` that runs over the hidden channels
    chunks: int = 1  # a fused projection holds the hidden channels this many times (gate and up: 2)
    bias: bool = False  # a bias over the hidden channels (input projections only)


@dataclass(frozen=True)
class FeedForward:
    """A block's MLP: input projections (`d -> m`, or `d -> 2 m` fused), one output projection (`m -> d`)."""

    block: str  # the module that holds the projections, named in the model
    width: int  # hidden channels `m`
    inputs: tuple[Projection, ...]
    output: Projection

    def groups(self) -> list[PruneGroup]:
        """One group per hidden channel, slices named relative to `block`; the MLP always keeps one channel."""
        family = f"{self.block} feed-forward"
        groups = []
        for j in range(self.width):
            slices = []
            for p in self.inputs:
                rows = tuple(j + c * self.width for c in range(p.chunks))
                slices.append((f"{p.name}.weight", p.channel_dim, rows))
                if p.bias:
                    slices.append((f"{p.name}.bias", 0, rows))
            slices.append((f"{self.output.name}.weight", self.output.channel_dim, (j,)))
            groups.append(PruneGroup(f"channel {j}", family, tuple(slices), "channels"))
        return groups


def linear_shape(module: nn.Module, transposed: tuple[type, ...] = ()) -> tuple[int, int] | None:
    """(in, out) features of a linear map whose weight is `(out, in)` (`nn.Linear`), or `(in, out)` for the
    classes in `transposed`; None for anything else."""
    weight = getattr(module, "weight", None)
    if isinstance(module, transposed) and weight is not None and weight.dim() == 2:
        return weight.shape[0], weight.shape[1]
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return None


def find_feed_forward(
    model: nn.Module, site: str, d_model: int, sites: set[str], attention: set[str] = frozenset(),
    transposed: tuple[type, ...] = (),
) -> FeedForward:
    """The MLP of the block around attention site `site` (width `d_model`). `sites` names every attention
    site of the model (a block holds one: a module around two is past the block); `attention` names other
    attention-like modules (a decoder's cross-attention), whose projections are not the MLP's either.
    Raises `NoFeedForward` with the reason when there is none that can be cut channel by channel."""
    parts = site.split(".")
    for depth in range(len(parts) - 1, 0, -1):
        block_name = ".".join(parts[:depth])
        if sum(name.startswith(block_name + ".") for name in sites) > 1:
            break  # past the block: this module holds other sites too
        inside = {n[len(block_name) + 1:] for n in sites | set(attention) if n.startswith(block_name + ".")}
        found = _in_block(block_name, model.get_submodule(block_name), d_model, inside, transposed)
        if found is not None:
            return found
    raise NoFeedForward(f"no feed-forward network in the block of {site}: nothing maps back to width {d_model} "
                        "before the next attention site")


def _in_block(
    block_name: str, block: nn.Module, d: int, attention: set[str], transposed: tuple[type, ...]
) -> FeedForward | None:
    """The MLP among `block`'s projections outside its attention module, None when it has no projection back to `d`."""
    maps = {}
    for name, module in block.named_modules():
        if _within(name, attention):
            continue
        shape = linear_shape(module, transposed)
        if shape is not None:
            maps[name] = (shape, isinstance(module, transposed), module)
    outputs = [n for n, ((i, o), _, _) in maps.items() if o == d and i != d]
    if not outputs:
        return None
    where = f"the block {block_name}"
    if len(outputs) > 1:
        raise NoFeedForward(f"{where} has {len(outputs)} projections back to width {d} ({', '.join(outputs)}): "
                            "an MLP with experts or several branches is not cut channel by channel")
    out_name = outputs[0]
    (m, _), out_transposed, _ = maps[out_name]
    inputs = []
    for name, ((i, o), is_transposed, module) in maps.items():
        if name == out_name or (i == d and o == d):
            continue
        if i != d or o % m or o // m > 2:
            raise NoFeedForward(f"{where}: {name} maps {i} -> {o}, which does not feed {out_name} ({m} -> {d})")
        inputs.append(Projection(name, 1 if is_transposed else 0, o // m, getattr(module, "bias", None) is not None))
    if not inputs:
        raise NoFeedForward(f"{where}: nothing maps width {d} to the {m} channels {out_name} reads")
    projections = {p.name for p in inputs} | {out_name}
    for name, tensor in [*block.named_parameters(), *block.named_buffers()]:
        owner = name.rpartition(".")[0]
        if owner in projections or _within(owner, attention):
            continue
        if m in tensor.shape:
            raise NoFeedForward(f"{where}: {name} {tuple(tensor.shape)} runs over the {m} hidden channels (a norm or "
                                "convolution between the projections), so channels cannot be cut one by one")
    return FeedForward(block_name, m, tuple(inputs), Projection(out_name, 0 if out_transposed else 1))


def _within(name: str, modules: set[str]) -> bool:
    """`name` is one of `modules` or inside one of them."""
    return any(name == m or name.startswith(m + ".") for m in modules)
