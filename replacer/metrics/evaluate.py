"""Evaluation of a run's students: fidelity to the teacher, task metrics, per-site and per-layer similarity,
parameters and CPU latency, as one dict the report renders."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from replacer.metrics import similarity
from replacer.metrics.timing import interleaved_latency_ms
from replacer.errors import DivergedError
from replacer.models import count_parameters
from replacer.pruning import mixer_parameters
from replacer.tasks import Batch, Task


@torch.no_grad()
def outputs(task: Task, model: nn.Module, batches: list[Batch], name: str = "the model") -> list[dict]:
    """The model's outputs on every batch; NaN or infinity stops evaluation with the model and batch named."""
    model.eval()
    result = []
    for k, batch in enumerate(batches):
        out = task.run(model, batch)
        for key, value in out.items():
            if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise DivergedError(
                    f"{name}'s output '{key}' is not finite on held-out batch {k}; "
                    + ("check the teacher's weights and inputs" if name == "teacher" else "train it again with a lower lr")
                )
        result.append(out)
    return result


def evaluate(
    teacher: nn.Module, models: dict[str, nn.Module], task: Task, batches: list[Batch], timed: dict[int, Batch],
    latency_repeats: int | None, site_error_batches: int, sources: dict[str, list[int]] | None = None,
) -> dict[str, Any]:
    """Metrics of every model in `models` (e.g. the final student, the untrained baseline) against the teacher.

    `timed` maps batch sizes to the batches whose CPU latency is measured (median of `latency_repeats`).
    `sources` maps held-out source names to the indices of their batches; with more than one, fidelity
    is also given per source, since a student can keep one unseen genre far better than another.
    """
    teacher_out = outputs(task, teacher, batches, "teacher")
    model_out = {k: outputs(task, m, batches, k) for k, m in models.items()}
    result: dict[str, Any] = {
        "params": {"teacher": count_parameters(teacher), **{k: count_parameters(m) for k, m in models.items()}},
        "mixer_params": {k: mixer_parameters(m) for k, m in models.items()},
        "fidelity": {k: task.compare(teacher_out, out, batches) for k, out in model_out.items()},
    }
    if sources is not None and len(sources) > 1:
        result["fidelity_by_source"] = {
            name: {k: task.compare(*_picked(indices, teacher_out, out, batches)) for k, out in model_out.items()}
            for name, indices in sources.items()
        }
    footprints = {k: task.cache_footprint(m, batches[0]) for k, m in {"teacher": teacher, **models}.items()}
    if footprints["teacher"] is not None:
        result["cache_bytes"] = footprints
    probe = batches[:site_error_batches]
    per_model = {k: similarity.site_similarity(teacher, m, task, probe) for k, m in models.items()}
    result["site_similarity"] = {site: {k: stats[site] for k, stats in per_model.items()} for site in next(iter(per_model.values()))}
    result["layer_cka"] = {k: similarity.layer_cka(teacher, m, task, probe) for k, m in models.items()}
    if latency_repeats:
        result["latency_ms"] = {
            str(size): interleaved_latency_ms(
                {name: lambda m=m, b=batch: task.run(m, b) for name, m in {"teacher": teacher, **models}.items()},
                latency_repeats,
            )
            for size, batch in timed.items()
        }
    return result


def _picked(indices: list[int], *lists: list) -> tuple[list, ...]:
    return tuple([items[i] for i in indices] for items in lists)
