"""The optimisation loop both distillation stages share: schedule, clipping, logging, checkpoints, resume."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from replacer.train.distributed import SINGLE, World
from replacer.errors import DivergedError
from replacer.train.sharding import full, is_sharded
from replacer.train.state import load_state, save_state
from replacer.progress import Advance


def lr_at(step: int, total: int, base: float) -> float:
    """Linear warm-up over 5% of the steps, then cosine decay to 10% of the base rate."""
    warmup = max(1, total // 20)
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_loop(
    params: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer, loss_at: Callable[[int], torch.Tensor],
    steps: int, lr: float, checkpoint_every: int, state_path: Path, record: dict,
    advance: Advance, log: Callable[[dict], None], world: World = SINGLE,
) -> float:
    """Run steps [resumed step, steps); returns the mean loss of the last 10% of steps.

    A param group's optional "scale" multiplies the scheduled rate. State is saved every
    `checkpoint_every` steps and at Ctrl-C, and restored from `state_path` when present. Under
    data parallelism (`world`), every rank holds the same state: rank 0 saves it and logs the loss
    averaged over ranks.
    """
    def save(meta: dict) -> None:
        save_state(state_path, params, optimizer, meta, write=world.is_main)

    meta = load_state(state_path, params, optimizer) or {"step": 0, "losses": []}
    losses: list[float] = meta["losses"]
    try:
        for step in range(meta["step"], steps):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, steps, lr) * group.get("scale", 1.0)
            loss = loss_at(step)
            _check_finite(loss, "loss", record, step, meta["step"], checkpoint_every)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(params.values(), 1.0)
            _check_finite(norm, "gradient norm", record, step, meta["step"], checkpoint_every)
            optimizer.step()
            losses.append(world.mean(loss))
            if world.is_main:
                log({**record, "step": step + 1, "loss": losses[-1]})
            advance(losses[-1])
            if (step + 1) % checkpoint_every == 0 and step + 1 < steps:
                for name, p in params.items():
                    _check_finite(p, f"parameter {name}", record, step, meta["step"], checkpoint_every)
                save({"step": step + 1, "losses": losses})
    except KeyboardInterrupt:  # keep every finished step; the loss list says how many
        if not any(map(is_sharded, params.values())):  # shards would need every rank to gather:
            save({"step": len(losses), "losses": losses})  # a sharded run resumes from its last periodic checkpoint
        raise
    tail = losses[-max(1, len(losses) // 10) :]
    return sum(tail) / len(tail) if tail else float("nan")


def _check_finite(value: torch.Tensor, what: str, record: dict, step: int, resumed: int, checkpoint_every: int) -> None:
    """Stop at the first NaN or infinite loss or gradient, naming the stage or site and the step.

    Nothing is saved from a diverged step, so the last checkpoint (if any) stays the last good state.
    """
    value = full(value)  # a sharded parameter or a norm over shards: every rank checks the whole
    if bool(torch.isfinite(value).all()):
        return
    label = ", ".join(f"{k} {v}" for k, v in record.items()) or "training"
    kept = max(resumed, step // checkpoint_every * checkpoint_every)
    checkpoint = f"the checkpoint at step {kept} is kept" if kept else "no checkpoint had been written yet"
    raise DivergedError(
        f"{label}: the {what} is {float(value.detach().float().reshape(-1)[0])} at step {step + 1}; {checkpoint}. "
        "If the teacher's outputs are finite, lower that stage's lr (or check the data), then run again"
    )
