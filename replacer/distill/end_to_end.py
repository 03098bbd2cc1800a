"""End-to-end tuning: the whole student against the teacher, task loss plus knowledge distillation."""

from __future__ import annotations

import contextlib
import fnmatch
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from replacer.train.batches import BatchPlan
from replacer.distill.lora import add_lora, is_lora_parameter, merge_lora
from replacer.train.loop import train_loop
from replacer.train.sharding import sharded
from replacer.train.distributed import SINGLE, World
from replacer.errors import ReplacerError
from replacer.train.optimizers import adam
from replacer.recipe import TuneSection
from replacer.tasks import Batch, Task
from replacer.progress import Advance


def trainable_parameters(student: nn.Module, which: str | list[str]) -> dict[str, nn.Parameter]:
    """`mixers` (default), `all`, `lora` (the mixers and the adapters `add_lora` put in), or glob patterns
    over parameter names."""
    named = dict(student.named_parameters())
    if which == "all":
        return named
    if which == "lora":
        return {n: p for n, p in named.items() if ".mixer." in f".{n}" or is_lora_parameter(n)}
    patterns = ["*.mixer.*"] if which == "mixers" else which
    chosen = {n: p for n, p in named.items() if any(fnmatch.fnmatchcase(n, pat) for pat in patterns)}
    if not chosen:
        raise ReplacerError(f"tune.train {which!r} matches no parameter (names look like {next(iter(named))})")
    return chosen


def student_loss(student: nn.Module, teacher: nn.Module, task: Task, batch: Batch, spec: TuneSection) -> torch.Tensor:
    """Distillation from the teacher plus, where the batch has labels, the task loss, weighted by `spec`."""
    with torch.no_grad():
        target = task.run(teacher, batch)
    out = task.run(student, batch)
    loss = spec.kd_weight * task.distill_loss(out, target, batch, spec.temperature)
    if spec.task_weight > 0 and (supervised := task.task_loss(out, batch)) is not None:
        loss = loss + spec.task_weight * supervised
    return loss


def tune_end_to_end(
    student: nn.Module, teacher: nn.Module, task: Task, plan: BatchPlan, spec: TuneSection, state_path: Path,
    advance: Advance, log: Callable[[dict], None], world: World = SINGLE,
    penalty: Callable[[], torch.Tensor] | None = None, record: dict | None = None,
) -> float:
    """Train the chosen parameters, resuming from `state_path` (the caller clears it once the result is saved).

    `penalty` (a regulariser on the student's weights, e.g. pruning's Hoyer-square) is added to every
    step's loss; `record` labels the logged losses (default: the tune stage). With `spec.train == "lora"`
    the kept linear layers get low-rank adapters, trained beside the mixers at the mixers' learning
    rate and merged into their layers when training ends (`replacer.distill.lora`).

    Returns the mean loss of the last 10% of steps. Under torchrun the student runs under
    DistributedDataParallel, or with `spec.parallel == "fsdp"` sharded across the ranks
    (`replacer.train.sharding`), and each rank takes its share of every batch, so the ranks together
    see exactly the batches one process would.
    """
    if plan.batch_size < world.size:
        raise ReplacerError(f"data.batch_size {plan.batch_size} is smaller than the {world.size} processes: raise it")
    shard = world.distributed and spec.parallel == "fsdp"
    if shard and penalty is not None:
        raise ReplacerError("a penalty on the student's weights (prune.importance: hoyer) needs tune.parallel: ddp")
    saved_flags = {n: p.requires_grad for n, p in student.named_parameters()}
    if spec.train == "lora":
        add_lora(student, spec.lora)
    chosen = trainable_parameters(student, spec.train)
    for name, p in student.named_parameters():
        p.requires_grad_(name in chosen)
    teacher.eval()
    student.eval()  # dropout off: the student should reproduce the teacher's deterministic function
    try:
        with sharded(student, world) if shard else contextlib.nullcontext(student) as trained:
            params = {n: p for n, p in trained.named_parameters() if n in chosen}
            mixers = [p for n, p in params.items() if ".mixer." in f".{n}" or is_lora_parameter(n)]
            others = [p for n, p in params.items() if not (".mixer." in f".{n}" or is_lora_parameter(n))]
            groups = [{"params": mixers, "scale": 1.0}, {"params": others, "scale": spec.other_lr_scale}]
            optimizer = adam([g for g in groups if g["params"]], lr=spec.lr)
            model = DistributedDataParallel(trained, find_unused_parameters=True) if world.distributed and not shard else trained

            def loss_at(step: int) -> torch.Tensor:
                loss = student_loss(model, teacher, task, plan.batch(step, world), spec)
                return loss if penalty is None else loss + penalty()

            loss = train_loop(
                params, optimizer, loss_at, spec.steps, spec.lr, spec.checkpoint_every, state_path,
                record or {"stage": "tune"}, advance, log, world,
            )
        if spec.train == "lora":
            merge_lora(student)
    finally:
        for name, p in student.named_parameters():
            p.requires_grad_(saved_flags.get(name, False))
    return loss
