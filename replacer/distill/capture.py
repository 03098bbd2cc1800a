"""Recording what each selected teacher site receives and returns, and keeping it bounded.

Inputs are read with the replacement wrapper's own `read_call`, so the padding mask comes out
exactly as the student will see it. Pairs are stored in fp16: in memory up to a byte bound, or
on disk one batch per file (memory then holds one batch at a time).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from replacer.files import read_or_explain, write_atomically
from replacer.graph.adapter import ReplacedAttention

Pair = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]
"""(site input, site output, padding mask or None) for one batch."""


@contextlib.contextmanager
def capture_sites(teacher: nn.Module, wrappers: dict[str, ReplacedAttention]) -> Iterator[dict[str, list[Pair]]]:
    """While active, every teacher forward appends one pair per site to the yielded lists: the site's input
    as its wrapper reads it, and the target the wrapper names (`target_in`: the site's output by default,
    a hybrid's replaced heads before the output projection)."""
    records: dict[str, list[Pair]] = {name: [] for name in wrappers}
    pending: dict[str, tuple] = {}
    handles = []
    for name, wrapper in wrappers.items():
        module = teacher.get_submodule(name)
        target_module, target = wrapper.target_in(module)

        def before(_mod, args, kwargs, name=name, wrapper=wrapper):
            pending[name] = wrapper.read_call(args, kwargs)

        def after(_mod, inputs, output, name=name, target=target):
            x, keep = pending.pop(name)
            records[name].append((x.detach(), target(inputs, output).detach(), keep))

        handles.append(module.register_forward_pre_hook(before, with_kwargs=True))
        handles.append(target_module.register_forward_hook(after))
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


def pair_bytes(pair: Pair) -> int:
    return sum(t.numel() * t.element_size() for t in pair if t is not None)


def _compact(pair: Pair) -> dict[str, torch.Tensor]:
    x, y, keep = pair
    out = {"x": x.to(torch.float16).contiguous(), "y": y.to(torch.float16).contiguous()}
    if keep is not None:
        out["keep"] = keep.contiguous()
    return out


def _expand(tensors: dict[str, torch.Tensor]) -> Pair:
    return tensors["x"].float(), tensors["y"].float(), tensors.get("keep")


class MemoryStore:
    """Pairs of one site kept in memory (fp16)."""

    def __init__(self) -> None:
        self._items: list[dict[str, torch.Tensor]] = []

    def add(self, pair: Pair) -> int:
        item = _compact(pair)
        self._items.append(item)
        return sum(t.numel() * t.element_size() for t in item.values())

    def __len__(self) -> int:
        return len(self._items)

    def get(self, index: int) -> Pair:
        return _expand(self._items[index])


class DiskStore:
    """Pairs of one site as one safetensors file per batch; reading loads that batch alone."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self._count = len(list(folder.glob("*.safetensors")))

    def add(self, pair: Pair) -> int:
        tensors = _compact(pair)
        write_atomically(self.folder / f"{self._count:06d}.safetensors", lambda tmp: save_file(tensors, str(tmp)))
        self._count += 1
        return 0  # nothing stays in memory

    def __len__(self) -> int:
        return self._count

    def get(self, index: int) -> Pair:
        fix = f"delete {self.folder.parent} to capture the teacher's pairs again, or run with --restart"
        return _expand(read_or_explain(self.folder / f"{index:06d}.safetensors", lambda f: load_file(str(f)), fix))
