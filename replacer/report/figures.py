"""The run's figures: loss curves, per-site and per-layer similarity, token-similarity matrices, quality
against size and the pruning family's Pareto plot, and the teacher's attention per head.

Figures are drawn on `matplotlib.figure.Figure` objects with the Agg canvas, never through pyplot,
so plotting changes no global matplotlib state.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from replacer.run.layout import budget_family
from replacer.metrics.similarity import SiteStats, token_similarity
from replacer.tasks import Batch, Task

DPI = 120


def write_figures(
    folder: Path, metrics: dict[str, Any], teacher: nn.Module, student: nn.Module, task: Task, batch: Batch,
    metrics_jsonl: Path, examples: int = 3,
) -> list[Path]:
    """The run's pictures: loss curves, per-site and per-layer similarity, token-similarity matrices of
    a few held-out examples at the middle replaced site, and quality against parameter count."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    if metrics_jsonl.is_file() and read_losses(metrics_jsonl):  # worker processes log no steps
        written.append(plot_loss_curves(metrics_jsonl, folder / "loss_curves.png"))
    sites = list(metrics["site_similarity"])  # sites that run from their input alone (not hybrids)
    if sites:
        per_site = {k: {site: v[k] for site, v in metrics["site_similarity"].items()} for k in metrics["layer_cka"]}
        written.append(plot_layer_similarity(
            per_site, folder / "site_similarity.png", title="Each replaced site on the teacher's inputs"))
        middle = sites[len(sites) // 2]
        count = min(examples, next(iter(batch.values())).shape[0])
        pairs = [(*token_similarity(teacher, student, task, batch, middle, i), f"example {i}") for i in range(count)]
        written.append(plot_token_similarity(
            pairs, folder / "token_similarity.png", title=f"Token-to-token cosine similarity at {middle}"))
    written.append(plot_layer_similarity(
        metrics["layer_cka"], folder / "layer_cka.png", title="Hidden states after each block (errors compound)"))
    name, teacher_value, _ = task.quality(next(iter(metrics["fidelity"].values())))
    points = [{"label": "teacher", "params": metrics["params"]["teacher"], "value": teacher_value}]
    points += [{"label": k, "params": metrics["params"][k], "value": task.quality(f)[2]} for k, f in metrics["fidelity"].items()]
    written.append(plot_accuracy_vs_params([p for p in points if p["value"] == p["value"]], folder / "quality_vs_params.png", name))
    budgets = budget_rows(metrics, task)
    if len(budgets) > 1:
        written.append(plot_budgets(budgets, folder / "pruning_budgets.png", name, task.higher_is_better))
    return written



def _figure(width: float, height: float, layout: str = "tight"):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout=layout)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def plot_layer_similarity(
    values: Mapping[str, Sequence[float] | Mapping[str, SiteStats]], path: str | Path,
    title: str = "Similarity to the teacher per layer", names: Sequence[str] | None = None,
) -> Path:
    """One line per student: a list is per-block CKA (`layer_cka`); a per-site dict (`site_similarity`)
    draws its CKA (solid) and mean cosine (dashed) per site. `names` labels the x ticks (default: the
    site names of a per-site dict, else block numbers)."""
    fig = _figure(7.5, 4.2)
    ax = fig.add_subplot()
    for colour, (label, series) in zip(_colours(len(values), "tab10"), values.items()):
        if isinstance(series, Mapping):
            names = names or list(series)
            x = range(len(series))
            ax.plot(x, [v["cka"] for v in series.values()], "o-", color=colour, label=f"{label}: CKA")
            ax.plot(x, [v["cosine"] for v in series.values()], "s--", color=colour, alpha=0.8, label=f"{label}: cosine")
        else:
            ax.plot(range(len(series)), list(series), "o-", color=colour, label=f"{label}: CKA")
    ax.set_xticks(range(max(len(s) for s in values.values())))
    if names:
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize="small")
    ax.set_xlabel("layer")
    ax.set_ylabel("similarity to teacher")
    lowest = min(line.get_ydata().min() for line in ax.get_lines())
    ax.set_ylim(max(-1.05, min(0.9, lowest - 0.05)), 1.02)  # zoomed enough to tell close students apart
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, path)


def plot_token_similarity(
    pairs: Sequence[tuple[torch.Tensor | np.ndarray, torch.Tensor | np.ndarray, str]], path: str | Path,
    title: str = "Token-to-token cosine similarity",
) -> Path:
    """One row per example: teacher | student matrices on one shared colour scale, with one colourbar."""
    from matplotlib.ticker import MaxNLocator

    fig = _figure(7.0, 3.0 * len(pairs) + 0.8, layout="constrained")
    axes = fig.subplots(len(pairs), 2, squeeze=False)
    matrices = [np.asarray(m, dtype=float) for t, s, _ in pairs for m in (t, s)]
    low, high = min(m.min() for m in matrices), max(m.max() for m in matrices)
    image = None
    for row, (t, s, label) in zip(axes, pairs):
        for ax, matrix in zip(row, (t, s)):
            image = ax.imshow(np.asarray(matrix, dtype=float), vmin=low, vmax=high, cmap="viridis", interpolation="nearest")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("token", fontsize="small")
        row[0].set_ylabel(f"{label}\ntoken", fontsize="small")
    axes[0][0].set_title("teacher attention output")
    axes[0][1].set_title("student mixer output")
    fig.colorbar(image, ax=axes.ravel().tolist(), label="cosine similarity", shrink=0.9)
    fig.suptitle(title)
    return _save(fig, path)


def read_losses(metrics_jsonl: str | Path) -> dict[str, dict[str, dict[int, float]]]:
    """{"distill": {site: {step: loss}}, stage: {stage: {step: loss}}} from a run's metrics.jsonl.

    A resumed run logs the steps after its last checkpoint again; the last record of a step wins. It is
    a log: a line a kill cut short (or any line that is not a JSON record) is one lost point, skipped.
    """
    series: dict[str, dict[str, dict[int, float]]] = {}
    for line in Path(metrics_jsonl).read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "step" not in record or "loss" not in record:
                continue
            step, loss = int(record["step"]), float(record["loss"])
        except (ValueError, TypeError):
            continue
        if "site" in record:
            panel, name = "distill", str(record["site"])
        else:
            panel = name = str(record.get("stage", "train"))
        series.setdefault(panel, {}).setdefault(name, {})[step] = loss
    return series


def _moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean; the first points average what exists so far."""
    sums = np.cumsum(np.insert(values, 0, 0.0))
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(0, ends - window)
    return (sums[ends] - sums[starts]) / (ends - starts)


def plot_loss_curves(metrics_jsonl: str | Path, path: str | Path, title: str = "Training loss") -> Path:
    """One panel per stage (block-wise: one line per site), moving average over the faint raw loss, log y."""
    series = read_losses(metrics_jsonl)
    if not series:
        raise ValueError(f"{metrics_jsonl} has no loss records")
    fig = _figure(6.0 * len(series), 4.4)
    axes = fig.subplots(1, len(series), squeeze=False)[0]
    for ax, (panel, lines) in zip(axes, series.items()):
        for colour, (name, points) in zip(_colours(len(lines), "viridis"), lines.items()):
            steps = np.array(sorted(points))
            raw = np.array([points[s] for s in steps])
            ax.plot(steps, raw, color=colour, alpha=0.2, lw=0.8)
            ax.plot(steps, _moving_average(raw, max(1, len(raw) // 20)), color=colour, lw=1.6, label=name)
        if all(v > 0 for points in lines.values() for v in points.values()):
            ax.set_yscale("log")
        ax.set_title("block-wise distillation" if panel == "distill" else f"{panel} (end-to-end)")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3, which="both")
        if panel == "distill":
            ax.legend(fontsize="x-small", ncol=math.ceil(len(lines) / 12), title="site", title_fontsize="small")
    fig.suptitle(title)
    return _save(fig, path)


def _labelled_points(ax, xs: list[float], ys: list[float], labels: list[str], xlabel: str, ylabel: str, joined: bool) -> None:
    """Points against a parameter count, each with its label; joined by a line for a series."""
    from matplotlib.ticker import EngFormatter

    if joined:
        ax.plot(xs, ys, marker="o", color="tab:blue", zorder=3)
    else:
        ax.scatter(xs, ys, s=40, color="tab:blue", zorder=3)
    for label, x, y in zip(labels, xs, ys):
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(6, 5), fontsize="small")
    ax.xaxis.set_major_formatter(EngFormatter())
    ax.yaxis.get_major_formatter().set_useOffset(False)
    ax.margins(x=0.15, y=0.15)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def plot_accuracy_vs_params(
    points: Sequence[Mapping[str, object]], path: str | Path, metric_name: str, title: str | None = None
) -> Path:
    """A labelled scatter of `value` against `params`, e.g. pruning budgets or teacher vs students."""
    fig = _figure(6.5, 4.5)
    ax = fig.add_subplot()
    _labelled_points(ax, [float(p["params"]) for p in points], [float(p["value"]) for p in points],
                     [str(p["label"]) for p in points], "parameters", metric_name, joined=False)
    ax.set_title(title or f"{metric_name} vs parameters")
    return _save(fig, path)


def plot_budgets(
    rows: Sequence[Mapping[str, Any]], path: str | Path, metric_name: str, higher_is_better: bool = True
) -> Path:
    """The family a pruned run produces: quality against parameters and against CPU latency, both as
    multiples of the teacher (the row labelled teacher, starred where present), with the Pareto front
    (no other model is smaller, or faster, and better) drawn through the models on it."""
    costs = [("params_x", "parameters (x teacher)")]
    if rows and "latency_x" in rows[0]:
        costs.append(("latency_x", f"CPU latency, batch {rows[0]['latency_batch']} (x teacher)"))
    fig = _figure(5.5 * len(costs), 4.4)
    values = [float(r["value"]) for r in rows]
    for i, (key, label) in enumerate(costs):
        ax = fig.add_subplot(1, len(costs), i + 1)
        xs = [float(r[key]) for r in rows]
        _labelled_points(ax, xs, values, [str(r["label"]) for r in rows], label, metric_name, joined=False)
        ax.xaxis.set_major_formatter("{x:.3g}")
        front = pareto_front(xs, values if higher_is_better else [-v for v in values])
        ax.plot([xs[j] for j in front], [values[j] for j in front], color="tab:orange", lw=1.2, zorder=2, label="Pareto front")
        teacher = [j for j, r in enumerate(rows) if r["label"] == "teacher"]
        ax.scatter([xs[j] for j in teacher], [values[j] for j in teacher], marker="*", s=160, color="tab:red", zorder=4, label="teacher")
        ax.legend(fontsize="small")
    fig.suptitle("The student family: quality against cost")
    return _save(fig, path)


def pareto_front(costs: Sequence[float], values: Sequence[float]) -> list[int]:
    """Indices of the points no other point dominates (costs no more and is worth at least as much,
    strictly better in one; higher values are better), ordered by cost."""
    points = list(zip(costs, values))
    front = [
        i for i, (c, v) in enumerate(points)
        if not any(c2 <= c and v2 >= v and (c2, v2) != (c, v) for c2, v2 in points)
    ]
    return sorted(front, key=lambda i: costs[i])


def plot_head_heatmaps(statistics: Mapping[str, Mapping], path: str | Path, title: str = "Teacher attention per layer and head") -> Path:
    """One heatmap per metric: layers down, heads across (blank where a layer has fewer heads)."""
    from matplotlib.ticker import MaxNLocator

    ordered = sorted(statistics.values(), key=lambda s: s["layer_index"])
    metrics = list(ordered[0]["heads"])
    heads = max(len(s["heads"][metrics[0]]) for s in ordered)
    fig = _figure(3.2 * len(metrics) + 1, 0.35 * len(ordered) + 2)
    for i, metric in enumerate(metrics):
        grid = np.full((len(ordered), heads), np.nan)
        for row, stats in enumerate(ordered):
            values = stats["heads"][metric]
            grid[row, : len(values)] = values
        ax = fig.add_subplot(1, len(metrics), i + 1)
        image = ax.imshow(grid, aspect="auto", cmap="viridis")
        ax.set_title(metric.replace("_", " "))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_yticks(range(len(ordered)), [str(s["layer_index"]) for s in ordered])
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.suptitle(title)
    return _save(fig, path)


def _colours(n: int, cmap: str) -> list:
    from matplotlib import colormaps

    colours = colormaps[cmap]
    if cmap == "tab10":
        return [colours(i % 10) for i in range(n)]
    return [colours(i / max(1, n - 1) * 0.9) for i in range(n)]


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
