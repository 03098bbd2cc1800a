"""One rank of the sharding test: `torchrun --nproc-per-node 2 -m shard_worker FOLDER`.

Trains a small stack of layers sharded (`replacer.train.sharding.sharded`) and checks what each rank
holds, then saves a checkpoint, restores it into a second sharded copy and compares; rank 0 writes the
gathered weights and the step losses to FOLDER for the test to hold against one process.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn
from torch.distributed.tensor import DTensor

from replacer.train.distributed import World
from replacer.train.optimizers import adam
from replacer.train.sharding import full, sharded
from replacer.train.state import load_state, save_state


class Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 10)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(10, 10), nn.Tanh()) for _ in range(3))
        self.head = nn.Linear(10, 2)
        self.head.bias.requires_grad_(False)  # a frozen parameter inside a sharded unit
        self.register_buffer("scale", torch.tensor(0.5), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for layer in self.layers:
            x = x + layer(x)
        return self.head(x) * self.scale


def data(rank: int, size: int, step: int) -> torch.Tensor:
    """This rank's share of batch `step` (the whole batch when size is 1)."""
    batch = torch.randn(8, 6, generator=torch.Generator().manual_seed(step))
    return batch[rank::size]


def train(model: nn.Module, params: dict[str, nn.Parameter], rank: int, size: int, steps: range, optimizer) -> list[float]:
    losses = []
    for step in steps:
        loss = model(data(rank, size, step)).pow(2).sum(-1).mean()  # equal shares: the mean of the means is the mean
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total = loss.detach().clone()
        if size > 1:
            dist.all_reduce(total)
        losses.append(total.item() / size)
    return losses


def main() -> None:
    folder = Path(sys.argv[1])
    dist.init_process_group("gloo")
    world = World(dist.get_rank(), dist.get_world_size())
    torch.manual_seed(0)
    student = Stack()
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    with sharded(student, world) as shards:
        named = dict(shards.named_parameters())
        assert all(isinstance(p, DTensor) for p in named.values())
        assert all(p.numel() == 0 for p in student.parameters())  # the student's own weights are released
        assert sum(p.to_local().numel() for p in named.values()) < sum(t.numel() for t in before.values())
        assert not named["head.bias"].requires_grad and named["head.weight"].requires_grad
        for name, p in named.items():
            torch.testing.assert_close(full(p), before[name], atol=0, rtol=0)
        params = {n: p for n, p in named.items() if p.requires_grad}
        optimizer = adam(params.values(), lr=0.05)
        losses = train(shards, params, world.rank, world.size, range(3), optimizer)
        state = folder / "state"
        save_state(state, params, optimizer, {"step": 3, "losses": losses}, write=world.is_main)
        dist.barrier()
        twin = Stack()
        with sharded(twin, world) as other:
            again = {n: p for n, p in other.named_parameters() if p.requires_grad}
            restored = adam(again.values(), lr=0.05)
            assert load_state(state, again, restored)["step"] == 3
            for name in params:
                torch.testing.assert_close(full(again[name]), full(params[name]), atol=0, rtol=0)
            for p, q in zip(params.values(), again.values()):
                for key in ("exp_avg", "exp_avg_sq"):
                    torch.testing.assert_close(full(restored.state[q][key]), full(optimizer.state[p][key]), atol=0, rtol=0)
            losses += train(shards, params, world.rank, world.size, range(3, 5), optimizer)
    assert all(p.numel() > 0 for p in student.parameters())
    if world.is_main:
        save_file({n: p.detach().contiguous() for n, p in student.named_parameters()}, str(folder / "trained.safetensors"))
        (folder / "losses.txt").write_text("\n".join(map(str, losses)))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
