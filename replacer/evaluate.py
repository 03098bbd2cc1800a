"""Evaluation: fidelity to the teacher, task metrics, per-site and per-layer similarity, params, CPU latency, figures."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from replacer import analysis
from replacer.errors import DivergedError
from replacer.models import count_parameters
from replacer.pruning import mixer_parameters
from replacer.pruning.stage import budget_family
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


def interleaved_median_ms(calls: dict[str, Callable[[], Any]], repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median wall-clock milliseconds of each call over `repeats` rounds, after `warmup` calls of each.

    The calls are timed in turns, one of each per round with the order rotating: a machine whose
    speed drifts (shared CPUs do, by 2-4x within an hour) then slows every call alike, so the ratios
    between them hold where medians taken one after the other do not.
    """
    names = list(calls)
    for name in names:
        for _ in range(warmup):
            calls[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            calls[name]()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def median_ms(fn: Callable[[], Any], repeats: int, warmup: int = 2) -> float:
    """Median wall-clock milliseconds of `fn` over `repeats` calls, after `warmup` calls."""
    return interleaved_median_ms({"call": fn}, repeats, warmup)["call"]


@torch.no_grad()
def median_latency_ms(fn: Callable[[], Any], repeats: int, warmup: int = 2) -> float:
    """`median_ms` of inference: no autograd graph is built."""
    return median_ms(fn, repeats, warmup)


@torch.no_grad()
def interleaved_latency_ms(calls: dict[str, Callable[[], Any]], repeats: int, warmup: int = 2) -> dict[str, float]:
    """`interleaved_median_ms` of inference: no autograd graph is built."""
    return interleaved_median_ms(calls, repeats, warmup)


def evaluate(
    teacher: nn.Module, models: dict[str, nn.Module], task: Task, batches: list[Batch], timed: dict[int, Batch],
    latency_repeats: int | None, site_error_batches: int,
) -> dict[str, Any]:
    """Metrics of every model in `models` (e.g. distilled student, undistilled baseline) against the teacher.

    `timed` maps batch sizes to the batches whose CPU latency is measured (median of `latency_repeats`).
    """
    teacher_out = outputs(task, teacher, batches, "teacher")
    result: dict[str, Any] = {
        "params": {"teacher": count_parameters(teacher), **{k: count_parameters(m) for k, m in models.items()}},
        "mixer_params": {k: mixer_parameters(m) for k, m in models.items()},
        "fidelity": {k: task.compare(teacher_out, outputs(task, m, batches, k), batches) for k, m in models.items()},
    }
    footprints = {k: task.cache_footprint(m, batches[0]) for k, m in {"teacher": teacher, **models}.items()}
    if footprints["teacher"] is not None:
        result["cache_bytes"] = footprints
    probe = batches[:site_error_batches]
    per_model = {k: analysis.site_similarity(teacher, m, task, probe) for k, m in models.items()}
    result["site_similarity"] = {site: {k: stats[site] for k, stats in per_model.items()} for site in next(iter(per_model.values()))}
    result["layer_cka"] = {k: analysis.layer_cka(teacher, m, task, probe) for k, m in models.items()}
    if latency_repeats:
        result["latency_ms"] = {
            str(size): interleaved_latency_ms(
                {name: lambda m=m, b=batch: task.run(m, b) for name, m in {"teacher": teacher, **models}.items()},
                latency_repeats,
            )
            for size, batch in timed.items()
        }
    return result


def write_figures(
    folder: Path, metrics: dict[str, Any], teacher: nn.Module, student: nn.Module, task: Task, batch: Batch,
    metrics_jsonl: Path, examples: int = 3,
) -> list[Path]:
    """The run's pictures: loss curves, per-site and per-layer similarity, token-similarity matrices of
    a few held-out examples at the middle replaced site, and quality against parameter count."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    if metrics_jsonl.is_file() and analysis.read_losses(metrics_jsonl):  # worker processes log no steps
        written.append(analysis.plot_loss_curves(metrics_jsonl, folder / "loss_curves.png"))
    sites = list(metrics["site_similarity"])  # sites that run from their input alone (not hybrids)
    if sites:
        per_site = {k: {site: v[k] for site, v in metrics["site_similarity"].items()} for k in metrics["layer_cka"]}
        written.append(analysis.plot_layer_similarity(
            per_site, folder / "site_similarity.png", title="Each replaced site on the teacher's inputs"))
        middle = sites[len(sites) // 2]
        count = min(examples, next(iter(batch.values())).shape[0])
        pairs = [(*analysis.token_similarity(teacher, student, task, batch, middle, i), f"example {i}") for i in range(count)]
        written.append(analysis.plot_token_similarity(
            pairs, folder / "token_similarity.png", title=f"Token-to-token cosine similarity at {middle}"))
    written.append(analysis.plot_layer_similarity(
        metrics["layer_cka"], folder / "layer_cka.png", title="Hidden states after each block (errors compound)"))
    name, teacher_value, _ = task.quality(next(iter(metrics["fidelity"].values())))
    points = [{"label": "teacher", "params": metrics["params"]["teacher"], "value": teacher_value}]
    points += [{"label": k, "params": metrics["params"][k], "value": task.quality(f)[2]} for k, f in metrics["fidelity"].items()]
    written.append(analysis.plot_accuracy_vs_params([p for p in points if p["value"] == p["value"]], folder / "quality_vs_params.png", name))
    budgets = budget_rows(metrics, task)
    if len(budgets) > 1:
        written.append(analysis.plot_budgets(budgets, folder / "pruning_budgets.png", name, task.higher_is_better))
    return written


def budget_rows(metrics: dict[str, Any], task: Task) -> list[dict[str, Any]]:
    """The teacher, then the tuned student and its pruned students: parameters (and x teacher), quality, and
    CPU latency (and x teacher) at the first timed batch size."""
    names = budget_family(list(metrics["fidelity"]))
    if not names:
        return []
    size, latency = next(iter(metrics.get("latency_ms", {}).items()), (None, None))
    params = metrics["params"]
    teacher_value = task.quality(metrics["fidelity"][names[0]])[1]
    rows = [{"label": "teacher", "params": params["teacher"], "params_x": 1.0, "value": teacher_value}]
    for name in names:
        rows.append({"label": name, "params": params[name], "params_x": params[name] / params["teacher"],
                     "value": task.quality(metrics["fidelity"][name])[2]})
    if latency:
        for row in rows:
            ms = latency[row["label"]]
            row.update(latency_ms=ms, latency_x=ms / latency["teacher"], latency_batch=size)
    return [r for r in rows if r["value"] == r["value"]]  # a task without a teacher value plots the students
