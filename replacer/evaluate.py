"""Evaluation: fidelity to the teacher, task metrics, per-site error, params and CPU latency."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch
from torch import nn

from replacer.distill.blockwise import site_wrappers
from replacer.distill.capture import capture_sites
from replacer.models import count_parameters
from replacer.tasks import Batch, Task


@torch.no_grad()
def outputs(task: Task, model: nn.Module, batches: list[Batch]) -> list[dict]:
    model.eval()
    return [task.run(model, b) for b in batches]


@torch.no_grad()
def site_errors(teacher: nn.Module, students: dict[str, nn.Module], batches: list[Batch], task: Task) -> dict[str, dict[str, float]]:
    """Relative squared error of each replaced site on the teacher's own site inputs, per student."""
    reference = next(iter(students.values()))
    wrappers = site_wrappers(reference)
    with capture_sites(teacher, wrappers) as records:
        for b in batches:
            task.run(teacher, b)
    errors: dict[str, dict[str, float]] = {}
    for label, student in students.items():
        theirs = site_wrappers(student)
        for name, pairs in records.items():
            num = den = 0.0
            for x, y, keep in pairs:
                diff = (theirs[name].mix(x, keep) - y).pow(2).sum(-1)
                power = y.pow(2).sum(-1)
                if keep is not None:
                    diff, power = diff[keep], power[keep]
                num, den = num + diff.sum().item(), den + power.sum().item()
            errors.setdefault(name, {})[label] = num / max(den, 1e-12)
    return errors


@torch.no_grad()
def median_latency_ms(fn: Callable[[], Any], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def evaluate(
    teacher: nn.Module, models: dict[str, nn.Module], task: Task, batches: list[Batch], one: Batch,
    latency_repeats: int | None, site_error_batches: int,
) -> dict[str, Any]:
    """Metrics of every model in `models` (e.g. distilled student, undistilled baseline) against the teacher."""
    teacher_out = outputs(task, teacher, batches)
    result: dict[str, Any] = {
        "params": {"teacher": count_parameters(teacher), **{k: count_parameters(m) for k, m in models.items()}},
        "fidelity": {k: task.compare(teacher_out, outputs(task, m, batches), batches) for k, m in models.items()},
        "site_relative_error": site_errors(teacher, models, batches[:site_error_batches], task),
    }
    if latency_repeats:
        result["latency_ms_batch1"] = {
            name: median_latency_ms(lambda m=m: task.run(m, one), latency_repeats)
            for name, m in {"teacher": teacher, **models}.items()
        }
    return result
