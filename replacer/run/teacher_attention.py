"""Running an analyzer plugin on the teacher: statistics to JSON, a heatmap, a table for the terminal."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.table import Table
from torch import nn

from replacer.train.batches import BatchPlan
from replacer.errors import ReplacerError
from replacer.graph.scan import scan
from replacer.files import read_or_explain, write_text_atomically
from replacer.plugins import get_registry
from replacer.recipe import AnalyzeSection
from replacer.tasks import Task

RESULT = "attention.json"


def analyze_teacher(teacher: nn.Module, task: Task, plan: BatchPlan, spec: AnalyzeSection, folder: Path) -> dict[str, Any]:
    """Statistics per site of the teacher on `spec.batches` training batches, cached in `folder`."""
    cached = folder / RESULT
    if cached.is_file():
        return read_or_explain(cached, lambda f: json.loads(f.read_text()), "delete it to analyse the teacher again")
    analyzer = get_registry().analyzer(spec.analyzer)
    sites = scan(teacher).sites
    if not sites:
        raise ReplacerError("the teacher has no attention site to analyse")
    passes = [lambda k=k: task.run(teacher, plan.batch(k)) for k in range(min(spec.batches, len(plan)))]
    try:
        statistics = analyzer(teacher, sites, passes, **spec.options)
    except TypeError as exc:
        raise ReplacerError(f"analyze.options {spec.options} do not suit analyzer '{spec.analyzer}': {exc}") from None
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomically(cached, json.dumps(statistics, indent=2))
    return statistics


def layer_table(statistics: dict[str, Any], title: str = "Teacher attention per layer (means over heads)") -> Table:
    metrics = list(next(iter(statistics.values()))["mean"])
    table = Table(title=title)
    for column in ("layer", "site", *metrics):
        table.add_column(column, justify="right" if column != "site" else "left")
    for site, stats in sorted(statistics.items(), key=lambda kv: kv[1]["layer_index"]):
        table.add_row(str(stats["layer_index"]), site, *(f"{stats['mean'][m]:.3f}" for m in metrics))
    return table
