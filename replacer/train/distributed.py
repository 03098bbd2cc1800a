"""torchrun support: which process this is, and the few collectives a run needs.

The same recipe runs under `replacer run` (one process) and under
`torchrun --nproc-per-node N -m replacer run` (N processes, on one machine or several sharing the
run directory): block-wise sites are dealt out across ranks, the end-to-end stage runs under
DistributedDataParallel with each rank taking its share of every batch, and rank 0 alone writes
the run's bookkeeping, evaluates and exports.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist

from replacer.errors import ReplacerError

T = TypeVar("T")

WAIT = datetime.timedelta(hours=12)
"""How long a rank waits at a barrier: others may be training a teacher or evaluating meanwhile."""


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def mine(self, items: Sequence[T]) -> list[T]:
        """This rank's share of `items` (round robin, so every rank gets nearly as many)."""
        return list(items[self.rank :: self.size])

    def mean(self, value: torch.Tensor) -> float:
        """The mean of a scalar over ranks (what a single process would log for the whole batch)."""
        if not self.distributed:
            return value.item()
        total = value.detach().clone().reshape(1)
        dist.all_reduce(total)
        return total.item() / self.size

    def merge(self, part: dict[str, T]) -> dict[str, T]:
        """Every rank's dict merged (each rank contributes what it computed)."""
        if not self.distributed:
            return dict(part)
        parts: list[dict[str, T] | None] = [None] * self.size
        dist.all_gather_object(parts, part)
        return {k: v for p in parts for k, v in (p or {}).items()}

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (e.g. trains and caches something); the others then run it."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()


SINGLE = World()


@contextlib.contextmanager
def world_from_environment() -> Iterator[World]:
    """The process group torchrun describes (RANK, WORLD_SIZE, ...), or one process when it describes none.

    Recipe runs train on the CPU, so the backend is gloo; a group created here is torn down on exit.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        yield SINGLE
        return
    if "MASTER_ADDR" not in os.environ:
        raise ReplacerError("WORLD_SIZE is set but MASTER_ADDR is not: launch several processes with torchrun")
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", timeout=WAIT)
    try:
        yield World(dist.get_rank(), dist.get_world_size())
    finally:
        if created:  # a group the caller set up is the caller's to tear down
            dist.destroy_process_group()
