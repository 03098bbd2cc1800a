"""Resumable training state (parameters, Adam moments, step) as safetensors plus JSON, written atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn


def _files(path: Path) -> tuple[Path, Path]:
    """The tensor and JSON files of a state; suffixes are appended, since names may contain dots."""
    return path.with_name(path.name + ".safetensors"), path.with_name(path.name + ".json")


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_state(path: Path, params: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer, meta: dict[str, Any]) -> None:
    """`<path>.safetensors` holds parameters and optimizer tensors; `<path>.json` the step and the rest."""
    tensors = {f"param.{k}": v.detach().contiguous() for k, v in params.items()}
    index = {id(p): i for i, p in enumerate(params.values())}
    scalars: dict[str, Any] = {}
    for p, st in optimizer.state.items():
        for key, value in st.items():
            name = f"opt.{index[id(p)]}.{key}"
            if torch.is_tensor(value):
                tensors[name] = value.detach().contiguous()
            else:
                scalars[name] = value
    weights, meta_file = _files(path)
    _atomic(weights, lambda t: save_file(tensors, str(t)))
    _atomic(meta_file, lambda t: t.write_text(json.dumps({**meta, "optimizer_scalars": scalars})))


def load_state(path: Path, params: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
    """Restore what `save_state` wrote into `params` and `optimizer`; None when there is nothing to resume."""
    weights, meta_path = _files(path)
    if not (weights.is_file() and meta_path.is_file()):
        return None
    tensors = load_file(str(weights))
    meta = json.loads(meta_path.read_text())
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(tensors[f"param.{k}"])
    plist = list(params.values())
    for name, value in list(tensors.items()) + list(meta.pop("optimizer_scalars").items()):
        if name.startswith("opt."):
            _, i, key = name.split(".", 2)
            optimizer.state[plist[int(i)]][key] = value
    return meta


def clear_state(path: Path) -> None:
    for file in _files(path):
        file.unlink(missing_ok=True)
