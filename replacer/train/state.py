"""Resumable training state (parameters, Adam moments, step) as one safetensors file, written atomically.

Tensors and counters live in the same file (the counters in its JSON metadata), so a kill at any
moment leaves either the previous state or the new one: never the tensors of one step with the
step counter of another.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from replacer.files import read_or_explain, remove_leftovers, temporary_name, write_atomically  # noqa: F401
from replacer.train.sharding import full, like

META = "replacer_training_state"


def _file(path: Path) -> Path:
    """The state's file; the suffix is appended, since names may contain dots."""
    return path.with_name(path.name + ".safetensors")


def save_state(
    path: Path, params: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer, meta: dict[str, Any], write: bool = True,
) -> None:
    """`<path>.safetensors` holds parameters and optimizer tensors, and in its metadata the step and the rest.

    Sharded tensors (`tune.parallel: fsdp`) are gathered whole first, so every rank calls this and the
    file is the same whatever the number of ranks; only a caller with `write` writes it.
    """
    tensors = {f"param.{k}": full(v).detach().contiguous() for k, v in params.items()}
    index = {id(p): i for i, p in enumerate(params.values())}
    scalars: dict[str, Any] = {}
    for p, st in optimizer.state.items():
        for key, value in st.items():
            name = f"opt.{index[id(p)]}.{key}"
            if torch.is_tensor(value):
                tensors[name] = full(value).detach().contiguous()
            else:
                scalars[name] = value
    if write:
        metadata = {META: json.dumps({**meta, "optimizer_scalars": scalars})}
        write_atomically(_file(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def _read(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    with safe_open(str(file), "pt") as f:
        meta = json.loads((f.metadata() or {})[META])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if not isinstance(meta.get("step"), int) or not isinstance(meta.get("losses"), list):
        raise ValueError("no step counter")
    return tensors, meta


def load_state(path: Path, params: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
    """Restore what `save_state` wrote into `params` and `optimizer`; None when there is nothing to resume."""
    file = _file(path)
    remove_leftovers(file.parent)
    if not file.is_file():
        return None
    fix = "delete it to train this part again from its start, or run with --restart to redo the whole run"
    tensors, meta = read_or_explain(file, _read, fix)
    plist = list(params.values())

    def restore(_: Path) -> None:
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(like(tensors[f"param.{k}"], p))
        for name, value in list(tensors.items()) + list(meta.pop("optimizer_scalars").items()):
            if name.startswith("opt."):
                _, i, key = name.split(".", 2)
                param = plist[int(i)]
                optimizer.state[param][key] = like(value, param) if torch.is_tensor(value) else value

    read_or_explain(file, restore, fix)
    return meta


def clear_state(path: Path) -> None:
    _file(path).unlink(missing_ok=True)
    path.with_name(path.name + ".json").unlink(missing_ok=True)  # the counters' file of older versions
