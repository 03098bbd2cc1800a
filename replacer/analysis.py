"""How closely a student's representations follow its teacher's, per site and per layer, with figures.

The comparisons follow the FAR paper (arXiv 2505.21535): (a) per-layer similarity of token
representations (linear CKA, Kornblith et al. 2019) and (b) token-to-token cosine-similarity
matrices of the teacher's attention output against the mixer's. They work on any replaced model
through the same hooks distillation uses: tokens are the samples, padded tokens are left out, and
at most `max_tokens` tokens are kept (the same seeded choice for teacher and student) to bound memory.

Figures are drawn on `matplotlib.figure.Figure` objects with the Agg canvas, never through pyplot,
so plotting changes no global matplotlib state.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from replacer.graph.adapter import site_wrappers
from replacer.distill.capture import capture_sites
from replacer.tasks import Batch, Task

MAX_TOKENS = 4096
DPI = 120
SiteStats = dict[str, float]


def linear_cka(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray) -> float:
    """Linear CKA between two (samples x features) matrices; feature counts may differ.

    Computed in float64 after centring each feature. Uses the n x n Gram matrices when they are the
    smaller product (few samples, wide features), the feature cross-products otherwise; both give
    ||Y'X||^2 / (||X'X|| ||Y'Y||). NaN when either side is constant over the samples.
    """
    x = torch.as_tensor(x).detach().to("cpu", torch.float64).flatten(1)
    y = torch.as_tensor(y).detach().to("cpu", torch.float64).flatten(1)
    if len(x) != len(y):
        raise ValueError(f"CKA needs the same samples on both sides; got {len(x)} and {len(y)}")
    if len(x) < 2:
        raise ValueError("CKA needs at least 2 samples")
    x, y = x - x.mean(0), y - y.mean(0)
    if len(x) < x.shape[1] + y.shape[1]:
        kx, ky = x @ x.T, y @ y.T
        cross = (kx * ky).sum()
    else:
        kx, ky = x.T @ x, y.T @ y
        cross = (y.T @ x).square().sum()
    scale = torch.linalg.matrix_norm(kx) * torch.linalg.matrix_norm(ky)
    return float(cross / scale) if scale > 0 else float("nan")


def _tokens(h: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """(B, ..., D) -> (real tokens, D): a (B, N) mask applies where the token axes flatten to N."""
    flat = h.reshape(h.shape[0], -1, h.shape[-1])
    if keep is not None and keep.shape == flat.shape[:2]:
        return flat[keep.to(flat.device)]
    return flat.reshape(-1, h.shape[-1])


class _Sampler:
    """A seeded, per-batch bounded choice of token rows: at most `max_tokens` rows per site or block
    and model, so memory stays under sites x 2 x max_tokens x width x 4 bytes."""

    def __init__(self, max_tokens: int, batches: int) -> None:
        self.budget = max(1, math.ceil(max_tokens / max(1, batches)))
        self.max_tokens = max_tokens
        self.generator = torch.Generator().manual_seed(0)

    def pick(self, n: int) -> torch.Tensor:
        if n <= self.budget:
            return torch.arange(n)
        return torch.randperm(n, generator=self.generator)[: self.budget].sort().values

    def stack(self, rows: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(rows)[: self.max_tokens]


def _kept(rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Sampled rows on the CPU in float32 (`linear_cka` upcasts): half the memory of float64, no fp16 overflow."""
    return rows[index.to(rows.device)].to("cpu", torch.float32)


@torch.no_grad()
def site_similarity(
    teacher: nn.Module, student: nn.Module, task: Task, batches: Sequence[Batch], max_tokens: int = MAX_TOKENS
) -> dict[str, SiteStats]:
    """Per replaced site: CKA, mean per-token cosine and relative squared error of the student's mixer
    against the teacher's site output, both on the teacher's own site inputs (so errors do not compound).

    Cosine and relative error use every real token; CKA uses the bounded sample. Head-level hybrids,
    which cannot run from their input alone, are left out (the per-layer CKA covers them).
    """
    wrappers = {name: w for name, w in site_wrappers(student).items() if w.mixes_alone}
    teacher.eval()
    student.eval()
    sampler = _Sampler(max_tokens, len(batches))
    sums = {name: {"err": 0.0, "power": 0.0, "cos": 0.0, "count": 0} for name in wrappers}
    picked: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {name: ([], []) for name in wrappers}
    for batch in batches:
        with capture_sites(teacher, wrappers) as records:
            task.run(teacher, batch)
        for name, pairs in records.items():
            for x, y, keep in pairs:
                t = _tokens(y, keep).float()
                s = _tokens(wrappers[name].mix(x, keep), keep).float()
                acc = sums[name]
                acc["err"] += (s - t).square().sum().item()
                acc["power"] += t.square().sum().item()
                acc["cos"] += F.cosine_similarity(s, t, dim=-1).sum().item()
                acc["count"] += len(t)
                index = sampler.pick(len(t))
                picked[name][0].append(_kept(t, index))
                picked[name][1].append(_kept(s, index))
    return {
        name: {
            "cka": linear_cka(sampler.stack(picked[name][0]), sampler.stack(picked[name][1])),
            "cosine": acc["cos"] / max(acc["count"], 1),
            "relative_error": acc["err"] / max(acc["power"], 1e-12),
        }
        for name, acc in sums.items()
    }


def block_names(model: nn.Module) -> list[str]:
    """The transformer blocks holding the replaced sites of `model`, in model order.

    A site's block is its deepest ancestor that is a numbered entry of an `nn.ModuleList` or
    `nn.Sequential` (timm `blocks.3`, HF `encoder.layer.3`, `model.layers.3`, swin
    `layers.1.blocks.0`); the site's parent when it has no such ancestor. The "smallest ancestor
    returning a (B, N, D) tensor" is not used: in BERT that is `attention`, not the layer.
    """
    modules = dict(model.named_modules())
    blocks: list[str] = []
    for site in site_wrappers(model):
        parts = site.split(".")
        block = ".".join(parts[:-1])
        for end in range(len(parts) - 1, 0, -1):
            parent = modules[".".join(parts[: end - 1])]
            if parts[end - 1].isdigit() and isinstance(parent, (nn.ModuleList, nn.Sequential)):
                block = ".".join(parts[:end])
                break
        if block not in blocks:
            blocks.append(block)
    return blocks


@contextlib.contextmanager
def _block_outputs(model: nn.Module, names: Sequence[str]) -> Iterator[dict[str, list[torch.Tensor]]]:
    """While active, each call of a named block appends its main output tensor."""
    records: dict[str, list[torch.Tensor]] = {name: [] for name in names}

    def hook(_mod, _args, output, name: str) -> None:
        main = output[0] if isinstance(output, (tuple, list)) else output
        if not isinstance(main, torch.Tensor):
            raise ValueError(f"block {name!r} returns {type(output).__name__}, not a tensor; pass blocks= explicitly")
        records[name].append(main.detach())

    handles = [
        model.get_submodule(name).register_forward_hook(lambda m, a, o, name=name: hook(m, a, o, name)) for name in names
    ]
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def layer_cka(
    teacher: nn.Module, student: nn.Module, task: Task, batches: Sequence[Batch],
    blocks: Sequence[str] | None = None, max_tokens: int = MAX_TOKENS,
) -> list[float]:
    """CKA between teacher and student hidden states after each block, each model on its own activations.

    Unlike `site_similarity`, student errors compound through the layers. Blocks default to
    `block_names(student)`. Real tokens are those the padding mask of the block's replaced site marks
    (captured on the teacher); a block without a replaced site (explicit `blocks`) keeps every token.
    """
    names = list(blocks) if blocks is not None else block_names(student)
    wrappers = site_wrappers(student)
    site_in = {b: next((s for s in wrappers if s.startswith(b + ".")), None) for b in names}
    probes = {s: wrappers[s] for s in site_in.values() if s is not None}
    teacher.eval()
    student.eval()
    sampler = _Sampler(max_tokens, len(batches))
    picked: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {b: ([], []) for b in names}
    for batch in batches:
        with capture_sites(teacher, probes) as records, _block_outputs(teacher, names) as t_out:
            task.run(teacher, batch)
        with _block_outputs(student, names) as s_out:
            task.run(student, batch)
        for b in names:
            keeps = [keep for _, _, keep in records[site_in[b]]] if site_in[b] else []
            for call, (t, s) in enumerate(zip(t_out[b], s_out[b])):
                keep = keeps[call] if call < len(keeps) else None
                t, s = _tokens(t, keep), _tokens(s, keep)
                index = sampler.pick(len(t))
                picked[b][0].append(_kept(t, index))
                picked[b][1].append(_kept(s, index))
    return [linear_cka(sampler.stack(picked[b][0]), sampler.stack(picked[b][1])) for b in names]


def _cosine_matrix(tokens: torch.Tensor) -> torch.Tensor:
    unit = F.normalize(tokens.to("cpu", torch.float64), dim=-1)
    return unit @ unit.T


@torch.no_grad()
def token_similarity(
    teacher: nn.Module, student: nn.Module, task: Task, batch: Batch, site: str, index: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """N x N token cosine similarities (real tokens only) of one example at one site: the teacher's
    attention output and the student's mixer output, both on the teacher's site input (first call)."""
    wrapper = site_wrappers(student)[site]
    teacher.eval()
    student.eval()
    with capture_sites(teacher, {site: wrapper}) as records:
        task.run(teacher, batch)
    x, y, keep = records[site][0]
    mine = None if keep is None else keep[index : index + 1]
    t = _tokens(y[index : index + 1], mine)
    s = _tokens(wrapper.mix(x, keep)[index : index + 1], mine)
    return _cosine_matrix(t), _cosine_matrix(s)


# ---- figures ---------------------------------------------------------------------------------------


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
