"""One recipe run: a directory that holds everything, stages that resume, and a report.

Stages: teacher (only when the recipe trains one) -> analyze (when asked for, or when a site
policy ranks layers by the teacher's attention) -> sparsify (when enabled: the students then learn a
top-k-attention teacher) -> distill (block-wise) -> tune (end-to-end)
-> prune (when enabled) -> evaluate -> export. Each finished stage is recorded in `state.json`
with its output on disk, so running the same command again after a crash or Ctrl-C skips finished
stages and resumes the interrupted one from its last checkpoint. Changing the tune, prune, evaluate
or export section of a finished run redoes that stage and the ones after it; any other change is refused.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from replacer.report.figures import plot_head_heatmaps
from replacer.run.teacher_attention import analyze_teacher
from replacer.train.batches import BatchPlan
from replacer.run.components import check_components
from replacer.train.distributed import SINGLE, World
from replacer.graph.scan import scan
from replacer.run.inputs import is_text, load_example_parts, load_examples, load_tokenizer, max_text_length, preflight
from replacer.progress import for_console
from replacer.recipe import Recipe
from replacer.report.markdown import write_report
from replacer.run.layout import RunDir, check_run_dir
from replacer.run.stages import STAGES, RunContext, example_lengths, read_evaluation
from replacer.tasks import Task, resolve_task
from replacer.run.teacher import obtain_teacher


def prepare(recipe: Recipe) -> tuple[nn.Module, Task, BatchPlan]:
    """The teacher as loaded (seeded: a randomly initialised one is the same in every run and on every
    rank), the task it computes and the training batches; every missing input fails here, at once."""
    check_components(recipe)
    torch.manual_seed(recipe.seed)
    teacher, kind = preflight(recipe)
    task = resolve_task(kind, load_tokenizer(recipe), is_text(recipe), max_text_length(recipe))
    train = load_examples(recipe.data.train, recipe.seed)
    return teacher, task, BatchPlan(train, recipe.data.batch_size, task.collate, seed=recipe.seed, lengths=example_lengths(train))


def analyze_recipe(recipe: Recipe, folder: Path, console: Console) -> dict[str, Any]:
    """`replacer analyze`: the teacher's attention statistics (JSON) and heatmap, without converting anything."""
    teacher, task, plan = prepare(recipe)
    progress = for_console(console)
    with progress:
        if recipe.teacher.train:
            with progress.task("teacher: train from scratch", recipe.teacher.steps) as advance:
                teacher, _ = obtain_teacher(recipe, teacher, task, plan, advance, lambda _: None)
        with progress.task(f"analyze: {recipe.analyze.analyzer}", 1) as advance:
            statistics = analyze_teacher(teacher, task, plan, recipe.analyze, folder)
            advance()
    plot_head_heatmaps(statistics, folder / "teacher_attention.png")
    return statistics


def run_recipe(
    recipe: Recipe, restart: bool = False, console: Console | None = None, world: World = SINGLE,
    recipe_file: Path | None = None,
) -> dict[str, Any] | None:
    """Run (or resume) every stage of `recipe`; returns the report dict (None on ranks other than 0).

    Under torchrun (`world`), ranks share the block-wise sites and the tuning batches; rank 0 alone
    trains the teacher, evaluates and exports, while the others wait or, after tuning, stop.
    `recipe_file` is where the recipe was read from: a run directory may never hold it.
    """
    console = console or Console()
    if not world.is_main:
        console = Console(quiet=True)
    check_run_dir(recipe.directory, recipe_file)
    teacher, task, plan = prepare(recipe)
    with RunDir(recipe, restart, world, recipe_file) as run:
        return run_stages(recipe, run, teacher, task, plan, console, world)


def run_stages(
    recipe: Recipe, run: RunDir, teacher: nn.Module, task: Task, plan: BatchPlan, console: Console, world: World
) -> dict[str, Any] | None:
    """Every stage in order over one context; the timing and the bookkeeping are done here, once."""
    progress = for_console(console)
    with progress, contextlib.ExitStack() as stack:
        ctx = RunContext(recipe, run, task, plan, load_example_parts(recipe.data.eval, recipe.seed + 1), progress, world, stack, teacher)
        for stage in STAGES:
            if not stage.wanted(ctx):
                continue
            if stage.main_only and not world.is_main:
                return None
            if not stage.recorded:
                stage.run(ctx)
                continue
            if stage.resumable and stage.finished(ctx):
                continue
            start = time.time()
            info = stage.run(ctx)
            if stage.resumable or not run.done(stage.name):
                run.finish(stage.name, time.time() - start, **info)
    return _report(ctx)


def _report(ctx: RunContext) -> dict[str, Any]:
    """The evaluation's figures with what the run chose (sites, heads, teacher statistics), written as the report."""
    metrics = read_evaluation(ctx.layout.evaluation)
    if ctx.statistics is not None:
        metrics["teacher_attention"] = ctx.statistics
        if (ctx.layout.figures / "teacher_attention.png").is_file():
            metrics.setdefault("figures", []).insert(0, "figures/teacher_attention.png")
    replaced = scan(ctx.trained_student()).replaced
    heads = ctx.selection.heads or {}
    metrics["replaced_sites"] = [s.name for s in replaced]
    metrics["replaced_heads"] = {s.name: heads.get(s.name, list(range(s.num_heads))) for s in replaced}
    return write_report(ctx.layout, ctx.recipe, ctx.task, ctx.run.state, metrics)
