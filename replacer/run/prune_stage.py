"""The recipe's prune stage: one tuned student in, a family of smaller students out, one per budget.

Budgets are fractions of the tuned student's parameters (its mixers', or with `scope: model` the whole
model's, MLP channels and hybrids' kept heads then cut too), or (`target: latency`) of its CPU latency, met by timing pruned copies (`replacer.pruning.latency`). The largest budget is cut from the tuned
student, each smaller one from the recovered student of the budget above it (gradual pruning loses
less than one deep cut), and every cut is followed by end-to-end recovery distillation. Each
budget's student is saved under `students/pruned-<percent>`, so a resumed run skips finished budgets.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from replacer.train.batches import BatchPlan
from replacer.checkpoint import load, save
from replacer.distill.end_to_end import student_loss, tune_end_to_end
from replacer.train.distributed import SINGLE, World
from replacer.errors import ReplacerError
from replacer.pruning import (
    GroupIndex, cut, factorise_token_embeddings, hoyer_square, importance_scores, index_target, mixer_parameters, model_parameters,
    token_use,
)
from replacer.pruning.latency import Measure, fit_latency
from replacer.recipe import PruneSection, TuneSection
from replacer.run.layout import HOYER, budget_name
from replacer.tasks import Task
from replacer.train.state import clear_state

if TYPE_CHECKING:
    from replacer.progress import Progress


def prune_budgets(
    student: nn.Module, teacher: nn.Module, base: nn.Module, task: Task, plan: BatchPlan, spec: PruneSection, tune: TuneSection,
    folder: Path, students: Path, progress: "Progress", log: Callable[[dict], None], world: World = SINGLE,
    measure: Measure | None = None,
) -> dict[str, dict]:
    """Prune `student` (modified in place) to every budget; returns per budget what was cut and how long it took.

    `teacher` is the distillation target; `base` the model students are built on (the same, unless the
    teacher's attention was sparsified). `measure` times a model (latency budgets only); under torchrun
    rank 0 alone times, and every rank cuts to the parameter count it found.
    """
    if spec.target == "latency" and measure is None:
        raise ValueError("latency budgets need a measure")
    folder.mkdir(parents=True, exist_ok=True)
    trained = "mixers" if spec.scope == "mixers" else "all"  # cut MLPs and heads recover too
    recovery = tune.model_copy(update={"steps": spec.recovery_steps, "lr": spec.lr, "train": trained,
                                       "checkpoint_every": spec.checkpoint_every})
    tuned_params = mixer_parameters(student)
    tuned_total = model_parameters(student)
    tuned_ms = measure(student) if spec.target == "latency" and world.is_main else None
    counts = None
    if spec.scope == "model" and spec.embeddings:
        batches = range(min(len(plan), spec.frequency_batches))
        # whole batches on every rank: each must factorise alike
        counts = token_use(teacher, [lambda k=k: task.run(teacher, plan.batch(k)) for k in batches])
    factorise = (lambda model: factorise_token_embeddings(model, counts)) if counts is not None else (lambda model: None)
    if spec.importance == "hoyer":
        student = _hoyer_regularised(student, teacher, base, task, plan, spec, recovery, folder, students, progress, log, world,
                                     factorise)
    results = {}
    for budget in sorted(spec.budgets, reverse=True):
        name = budget_name(budget)
        saved = students / name
        if (saved / "manifest.json").is_file():  # finished before an interruption
            student = load(saved, base=base)
            results[name] = {"budget": budget, "scope": spec.scope, "mixer_params": mixer_parameters(student),
                             "mixer_params_tuned": tuned_params, "params": model_parameters(student), "params_tuned": tuned_total}
            continue
        start = time.time()
        factorise(student)
        student.eval()  # deterministic losses for the taylor importance and the measured balance
        index = GroupIndex.of(student, spec.scope)
        taylor = _losses(student, teacher, task, plan, recovery, spec.taylor_batches) if spec.importance == "taylor" else None
        scores = importance_scores(index, spec.importance, taylor, spec.balance,
                                   _losses(student, teacher, task, plan, recovery, spec.balance_batches))
        timing = {}
        if spec.target == "latency":
            timing = _fit_on_main(student, index, scores, spec, budget * tuned_ms if world.is_main else 0.0, measure, world)
            params = timing.pop("params")
            timing["tuned_ms"] = tuned_ms
        else:
            params = index_target(student, index, round(budget * (tuned_params if spec.scope == "mixers" else tuned_total)), spec.scope)
        result = cut(student, index, scores, params, spec.uniform)
        log({"stage": "prune", "budget": budget, "mixer_params": result.mixer_params_after, "params": result.params_after,
             "removed_by_kind": result.removed_by_kind, "removed_by_site": result.removed_by_site, **timing})
        state = folder / f"{name}.state"
        if spec.recovery_steps:
            with progress.task(f"prune: recover {name}", spec.recovery_steps) as advance:
                tune_end_to_end(student, teacher, task, plan, recovery, state, advance, log, world, record={"stage": name})
        if world.is_main:
            save(student, saved)
            clear_state(state)
        world.barrier()
        results[name] = {
            "budget": budget, "scope": spec.scope, "mixer_params": result.mixer_params_after, "mixer_params_tuned": tuned_params,
            "params": result.params_after, "params_tuned": tuned_total, "removed_groups": result.removed_groups,
            "removed_by_kind": result.removed_by_kind, "seconds": round(time.time() - start, 1), **timing,
        }
    return results


def _losses(
    student: nn.Module, teacher: nn.Module, task: Task, plan: BatchPlan, recovery: TuneSection, batches: int
) -> list[Callable[[], torch.Tensor]]:
    """The student's distillation loss on each of the first `batches` training batches, as callables."""
    return [lambda k=k: student_loss(student, teacher, task, plan.batch(k), recovery) for k in range(min(batches, len(plan)))]


def _fit_on_main(
    student: nn.Module, index: GroupIndex, scores: torch.Tensor, spec: PruneSection, target_ms: float, measure: Measure, world: World
) -> dict:
    """Rank 0 times pruned copies to find the parameter count within `target_ms`; every rank gets its answer
    (or its error, so no rank waits for an answer that never comes)."""
    found: dict = {}
    if world.is_main:
        try:
            fit = fit_latency(student, index, scores, target_ms, measure, spec.uniform)
            found = {"params": fit.params, "latency_ms": fit.latency_ms, "target_ms": fit.target_ms}
        except ReplacerError as exc:
            found = {"error": str(exc)}
    found = world.merge({"fit": found} if world.is_main else {})["fit"]
    if "error" in found:
        raise ReplacerError(found["error"])
    return found


def _hoyer_regularised(
    student: nn.Module, teacher: nn.Module, base: nn.Module, task: Task, plan: BatchPlan, spec: PruneSection, recovery: TuneSection,
    folder: Path, students: Path, progress: "Progress", log: Callable[[dict], None], world: World,
    factorise: Callable[[nn.Module], object],
) -> nn.Module:
    """The tuned student trained on with FAR's Hoyer-square group penalty, so group norms separate
    (factorised first where embeddings are pruned, so their components separate too)."""
    saved = students / HOYER
    if (saved / "manifest.json").is_file():
        return load(saved, base=base)
    factorise(student)
    index = GroupIndex.of(student, spec.scope)
    state = folder / "hoyer.state"
    steps = recovery.model_copy(update={"steps": spec.hoyer_steps})
    with progress.task("prune: Hoyer-square group penalty", spec.hoyer_steps) as advance:
        tune_end_to_end(student, teacher, task, plan, steps, state, advance, log, world,
                        penalty=lambda: spec.hoyer_weight * hoyer_square(index), record={"stage": "hoyer"})
    if world.is_main:
        save(student, saved)
        clear_state(state)
    world.barrier()
    return student
