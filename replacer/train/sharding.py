"""Fully sharded tuning under torchrun (`tune.parallel: fsdp`): PyTorch FSDP2's `fully_shard`.

Under DistributedDataParallel every rank holds the whole student four times over while it trains
(weights, gradients, two Adam moments). Sharded, each rank keeps 1/N of each: the student to train is
a copy built on the meta device (no memory), sharded block by block, filled from the student's
weights, and the student's own weights are released while it trains; when training ends the trained
weights are gathered back into the student on every rank, so saving, merging adapters and evaluating
see a plain module again. Blocks are the model's repeated layers (the children of a module list or
sequential that share one class), the units FSDP gathers one at a time during the forward and backward.
"""

from __future__ import annotations

import contextlib
import copy
import sys
from typing import Iterator

import torch
from torch import nn

from replacer.train.distributed import World


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's layers: children of a ModuleList or Sequential, at least two, all of one class."""
    blocks = []
    for module in model.modules():
        if isinstance(module, (nn.ModuleList, nn.Sequential)):
            children = list(module.children())
            if len(children) > 1 and len({type(c) for c in children}) == 1:
                blocks += children
    inner = {id(m) for b in blocks for m in b.modules() if m is not b}
    return [b for b in blocks if id(b) not in inner]  # the outermost layers only (blocks nest lists of their own)


def _meta_copy(model: nn.Module) -> nn.Module:
    """`model`'s structure with every parameter on the meta device (tied parameters stay tied)."""
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad) for p in model.parameters()}
    return copy.deepcopy(model, memo)


@contextlib.contextmanager
def sharded(student: nn.Module, world: World) -> Iterator[nn.Module]:
    """A copy of `student` sharded across `world`'s ranks to train; on leaving, its weights are `student`'s."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard  # imported here: over a second of start-up every run would pay

    whole = StateDictOptions(full_state_dict=True)
    mesh = init_device_mesh("cpu", (world.size,))
    shadow = _meta_copy(student)
    for block in repeated_blocks(shadow):
        fully_shard(block, mesh=mesh)
    fully_shard(shadow, mesh=mesh)
    shadow.to_empty(device="cpu")
    with torch.no_grad():
        for name, buffer in student.named_buffers():  # buffers are not sharded; to_empty left them unset
            shadow.get_buffer(name).copy_(buffer)
    set_model_state_dict(shadow, student.state_dict(), options=whole)
    own = dict(student.named_parameters())
    for p in own.values():  # released while the shards train; gathered back below
        p.data = torch.empty(0, dtype=p.dtype)
    try:
        yield shadow
    finally:
        trained = get_model_state_dict(shadow, options=whole)
        for name, p in own.items():
            p.data = trained[name].detach().clone()


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is a shard (a DTensor; none exists unless something imported DTensor)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor a rank's shard belongs to (a collective: every rank calls it); plain tensors as they are."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`value` (a whole tensor) laid out as `param` is: this rank's shard when `param` is sharded."""
    if is_sharded(param) and value.shape == param.shape and not is_sharded(value):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(value, param.device_mesh, param.placements)
    return value
