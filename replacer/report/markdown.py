"""report.json (every number) and report.md (what a person reads) for a finished run."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from replacer.files import write_text_atomically
from replacer.recipe import Recipe
from replacer.run.layout import STUDENT, RunLayout, budget_family
from replacer.tasks import Task


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"  # four significant digits
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(layout: RunLayout, recipe: Recipe, task: Task, state: dict, metrics: dict) -> dict[str, Any]:
    report = {
        "recipe": recipe.name,
        "model": recipe.model.source,
        "plugin": recipe.mixer.plugin,
        "options": recipe.mixer.options,
        "task": task.name,
        "headline_metric": task.headline,
        "stages": state["stages"],
        **metrics,
    }
    write_text_atomically(layout.report_json, json.dumps(report, indent=2))
    write_text_atomically(layout.report_md, render_markdown(report))
    return report


def _by_source(report: dict[str, Any], models: list[str]) -> list[str]:
    """Fidelity on each held-out source apart, where there are several (genres a student keeps unequally)."""
    by_source = report.get("fidelity_by_source")
    if not by_source:
        return []
    rows = [
        [source, metric, *(figures[m][metric] for m in models)]
        for source, figures in by_source.items()
        for metric in figures[models[0]]
    ]
    return ["## Fidelity by held-out source", _table(["source", "metric", *models], rows)]


def _cache(report: dict[str, Any]) -> list[str]:
    """What incremental decoding keeps per model after reading the first held-out batch."""
    held = report.get("cache_bytes")
    if not held:
        return []
    mib = 2.0**20
    teacher = sum(held["teacher"].values())
    rows = [[m, b["kv"] / mib, b["mixer_state"] / mib, sum(b.values()) / teacher] for m, b in held.items()]
    return [
        "## Decoding cache (after the first held-out batch)",
        _table(["model", "KV MiB", "mixer state MiB", "x teacher"], rows),
    ]


def _ecosystem(report: dict[str, Any]) -> list[str]:
    """Each ecosystem evaluation's figures: one row per metric, one column per model (the teacher first)."""
    parts = []
    for name, by_model in (report.get("ecosystem") or {}).items():
        if not by_model:
            continue
        models = list(by_model)
        metrics = list(next(iter(by_model.values())))
        parts += [f"## {name} evaluation (held-out data)", _table(["metric", *models], [[k, *(by_model[m].get(k) for m in models)] for k in metrics])]
    return parts


def _sparse_teacher(report: dict[str, Any]) -> list[str]:
    sparse = report.get("sparse_teacher")
    if not sparse:
        return []
    return [
        "The students learned a sparsified teacher (top-k attention, recovered by distillation); all fidelity "
        "above is to the original dense teacher. The sparsified teacher itself against the dense one:",
        _table(["metric", "sparse teacher"], [[k, v] for k, v in sparse.items()]),
    ]


def _teacher_attention(report: dict[str, Any]) -> list[str]:
    """The analyzer's per-layer means, with the layers that were replaced marked."""
    statistics = report.get("teacher_attention")
    if not statistics:
        return []
    replaced = set(report.get("replaced_sites", []))
    metrics = list(next(iter(statistics.values()))["mean"])
    rows = [
        [stats["layer_index"], site, "yes" if site in replaced else "", *(stats["mean"][m] for m in metrics)]
        for site, stats in sorted(statistics.items(), key=lambda kv: kv[1]["layer_index"])
    ]
    return [
        "## Teacher attention (analysis before distillation)",
        "Means over heads on training batches; per-head values are in report.json and the heatmap figure.",
        _table(["layer", "site", "replaced", *metrics], rows),
    ]


CUT_COLUMNS = ("mixer", "feed-forward", "attention heads", "token embedding")  # the pruning table's order of group kinds


def _pruning(report: dict[str, Any]) -> list[str]:
    """The budgets table: every pruned student beside the tuned one it was cut from."""
    names = budget_family(list(report["fidelity"]))
    if not names or "mixer_params" not in report:
        return []
    mixers, params, headline = report["mixer_params"], report["params"], report["headline_metric"]
    latency = report.get("latency_ms", {})
    size = next(iter(latency), None)
    searched = report["stages"].get("prune", {}).get("budgets", {})
    by_latency = any("target_ms" in b for b in searched.values())
    whole = any(b.get("scope") == "model" for b in searched.values())
    header = ["model", "mixer params", "x tuned mixers", "params", "x teacher", headline]
    header += ["groups cut (mixer / MLP / heads / embedding components)"] if whole else []
    header += [f"CPU ms (batch {size})", "x tuned", "x teacher"] if size else []
    header += ["pruning: target ms", "pruning: timed ms"] if by_latency else []
    teacher = ["teacher", "", "", params["teacher"], 1.0, report["fidelity"][names[0]].get(f"teacher_{headline.removeprefix('student_')}", "")]
    teacher += [""] if whole else []
    teacher += [latency[size]["teacher"], "", 1.0] if size else []
    teacher += ["", ""] if by_latency else []
    rows = [teacher]
    for name in names:
        row = [name, mixers[name], mixers[name] / mixers[STUDENT], params[name], params[name] / params["teacher"],
               report["fidelity"][name][headline]]
        if whole:
            kinds = searched.get(name, {}).get("removed_by_kind", {})
            row.append(" / ".join(str(kinds.get(k, 0)) for k in CUT_COLUMNS) if kinds else "")
        if size:
            ms = latency[size]
            row += [ms[name], ms[name] / ms[STUDENT], ms[name] / ms["teacher"]]
        if by_latency:
            row += [searched.get(name, {}).get("target_ms", ""), searched.get(name, {}).get("latency_ms", "")]
        rows.append(row)
    cut = "the whole model's parameters" if whole else "mixer parameters"
    what = (
        f"the tuned student's CPU latency (the most {cut} whose pruned copy, timed while pruning, ran within "
        "it; evaluation times every model again)" if by_latency else
        "the tuned student's parameters (mixer units, MLP hidden channels, hybrids' kept heads and the components of "
        "the factorised token embedding in one ranking)"
        if whole else "the tuned mixers' parameters"
    )
    return [
        "## Pruning budgets",
        f"Each budget keeps a fraction of {what}; groups are ranked globally across sites, removed physically, then "
        "recovered by distillation, and each smaller budget is cut from the one above.",
        _table(header, rows),
    ]


def render_markdown(report: dict[str, Any]) -> str:
    fidelity = report["fidelity"]
    models = list(fidelity)
    names = list(next(iter(fidelity.values())))
    parts = [
        f"# {report['recipe']}: {report['model']} -> {report['plugin']}",
        f"Task: {report['task']}. Student and baseline share the same mixers and initialisation; "
        "the untrained baseline skips every training stage.",
        "## Fidelity to the teacher (held-out data)",
        _table(["metric", *models], [[n, *(fidelity[m][n] for m in models)] for n in names]),
        *_by_source(report, models),
        *_sparse_teacher(report),
        *_ecosystem(report),
        "## Per-site fidelity on the teacher's own inputs",
        "Relative squared error (lower is better) and linear CKA of the tokens (higher is better) of each "
        "replaced site's output against the teacher attention's output.",
        _table(
            ["site", *(f"{m}: rel. error" for m in models), *(f"{m}: CKA" for m in models)],
            [
                [site, *(stats[m]["relative_error"] for m in models), *(stats[m]["cka"] for m in models)]
                for site, stats in report["site_similarity"].items()
            ],
        ),
        "## Per-layer CKA of hidden states (each model on its own activations)",
        _table(["block", *models], [[i, *(report["layer_cka"][m][i] for m in models)] for i in range(len(next(iter(report["layer_cka"].values()))))]),
    ]
    params = report["params"]
    latency = report.get("latency_ms", {})
    rows = []
    for name, count in params.items():
        row = [name, count, count / params["teacher"]]
        for times in latency.values():
            row += [times[name], times[name] / times["teacher"]]
        rows.append(row)
    header = ["model", "params", "x teacher"]
    for size in latency:
        header += [f"CPU ms (batch {size})", "x teacher"]
    parts += ["## Size and speed", _table(header, rows)]
    parts += _pruning(report)
    parts += _cache(report)
    parts += _teacher_attention(report)
    stage_rows = [[stage, info.get("seconds", float("nan"))] for stage, info in report["stages"].items()]
    parts += ["## Stages", _table(["stage", "seconds"], stage_rows)]
    if report.get("figures"):
        parts += ["## Figures", "\n\n".join(f"![{Path(f).stem.replace('_', ' ')}]({f})" for f in report["figures"])]
    return "\n\n".join(parts) + "\n"
