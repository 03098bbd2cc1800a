"""One recipe run: a directory that holds everything, stages that resume, and a report.

Stages: teacher (only when the recipe trains one) -> analyze (when asked for, or when a site
policy ranks layers by the teacher's attention) -> sparsify (when enabled: the students then learn a
top-k-attention teacher) -> distill (block-wise) -> tune (end-to-end)
-> prune (when enabled) -> evaluate -> export. Each finished stage is recorded in `state.json`
with its output on disk, so running the same command again after a crash or Ctrl-C skips finished
stages and resumes the interrupted one from its last checkpoint. Changing the prune, evaluate or
export section of a finished run redoes that stage and the ones after it; any other change is refused.
"""

from __future__ import annotations

import contextlib
import copy
import json
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

import replacer
from replacer.batches import BatchPlan
from replacer.components import check_components
from replacer.distill.blockwise import distill_blockwise
from replacer.distill.end_to_end import tune_end_to_end
from replacer.distributed import SINGLE, World
from replacer import analysis
from replacer.attention_analysis import analyze_teacher
from replacer.evaluate import evaluate, median_latency_ms, outputs, write_figures
from replacer.graph.scan import scan
from replacer.inputs import is_text, load_examples, load_tokenizer, preflight
from replacer.pruning.latency import Measure
from replacer.progress import for_console
from replacer.pruning.stage import budget_name, prune_budgets
from replacer.recipe import Recipe
from replacer.run_dir import RunDir, check_run_dir
from replacer.files import write_text_atomically
from replacer.report import write_report
from replacer.selection import Selection, choose_sites, needs_analysis
from replacer.sparsify import sparsified_teacher
from replacer.tasks import Batch, Task, resolve_task
from replacer.teacher import obtain_teacher
from replacer.training_state import clear_state

STAGES = ("teacher", "analyze", "sparsify", "distill", "tune", "prune", "evaluate", "export")


def _student(recipe: Recipe, teacher: nn.Module, selection: Selection) -> nn.Module:
    """The replaced model before training; seeded, so the undistilled baseline starts identically."""
    torch.manual_seed(recipe.seed)
    return replacer.replace(
        teacher, recipe.mixer.plugin, sites=selection.sites, options=recipe.mixer.options, heads=selection.heads
    ).eval()


def prepare(recipe: Recipe) -> tuple[nn.Module, Task, BatchPlan]:
    """The teacher as loaded (seeded: a randomly initialised one is the same in every run and on every
    rank), the task it computes and the training batches; every missing input fails here, at once."""
    check_components(recipe)
    torch.manual_seed(recipe.seed)
    teacher = preflight(recipe)
    task = resolve_task(recipe.model.task, teacher, load_tokenizer(recipe), is_text(recipe), _max_length(recipe))
    train = load_examples(recipe.data.train, recipe.seed)
    return teacher, task, BatchPlan(train, recipe.data.batch_size, task.collate, seed=recipe.seed, lengths=_lengths(train))


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
    analysis.plot_head_heatmaps(statistics, folder / "teacher_attention.png")
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
        return _run_stages(recipe, run, teacher, task, plan, console, world)


def _run_stages(
    recipe: Recipe, run: RunDir, teacher: nn.Module, task: Task, plan: BatchPlan, console: Console, world: World
) -> dict[str, Any] | None:
    held_out = load_examples(recipe.data.eval, recipe.seed + 1)
    progress = for_console(console)
    layout = run.layout
    with progress, contextlib.ExitStack() as stack:
        if recipe.teacher.train:
            start = time.time()
            # rank 0 trains (or finds) the teacher; the others then read its cache
            with progress.task("teacher: train from scratch", recipe.teacher.steps) as advance, world.main_first():
                teacher, trained = obtain_teacher(recipe, teacher, task, plan, advance, run.log)
            if not run.done("teacher"):
                run.finish("teacher", time.time() - start, trained_now=trained)
        statistics = None
        if needs_analysis(recipe):
            start = time.time()
            with progress.task(f"analyze: {recipe.analyze.analyzer}", 1) as advance, world.main_first():
                statistics = analyze_teacher(teacher, task, plan, recipe.analyze, layout.analysis)
                if recipe.evaluate.figures and world.is_main:
                    analysis.plot_head_heatmaps(statistics, layout.figures / "teacher_attention.png")
                advance()
            if not run.done("analyze"):
                run.finish("analyze", time.time() - start)
        dense = base = teacher  # dense: the function to keep; base: what students are built on
        if recipe.sparsify.enabled:
            start = time.time()
            teacher, base = sparsified_teacher(
                dense, task, plan, recipe.sparsify, recipe.tune, layout.sparse_teacher, progress, run.log, stack, world
            )
            if not run.done("sparsify"):
                run.finish("sparsify", time.time() - start)
        sites = choose_sites(recipe, scan(base).sites, statistics)
        student = _student(recipe, base, sites)
        if recipe.distill.enabled and not run.done("distill"):
            start = time.time()
            losses = distill_blockwise(
                student, teacher, task, plan, recipe.distill, layout.distill, recipe.seed, progress, run.log, world
            )
            if world.is_main:
                replacer.save(student, layout.distilled)
            run.finish("distill", time.time() - start, final_loss=losses)
            world.barrier()
        if recipe.tune.enabled and not run.done("tune"):
            student = _resume_from(student, base, layout.distilled)
            start = time.time()
            state = layout.tune_state
            state.parent.mkdir(exist_ok=True)
            with progress.task("tune: end-to-end", recipe.tune.steps) as advance:
                loss = tune_end_to_end(student, teacher, task, plan, recipe.tune, state, advance, run.log, world)
            if world.is_main:
                replacer.save(student, layout.tuned)
                clear_state(state)
            run.finish("tune", time.time() - start, final_loss=loss)
        student = _resume_from(student, base, layout.tuned, layout.distilled)
        if recipe.prune.enabled and not run.done("prune"):
            start = time.time()
            budgets = prune_budgets(
                copy.deepcopy(student), teacher, base, task, plan, recipe.prune, recipe.tune, layout.prune,
                layout.students, progress, run.log, world, _latency_measure(recipe, task, held_out),
            )
            run.finish("prune", time.time() - start, budgets=budgets)
        if not world.is_main:
            return None
        if not run.done("evaluate") or _read_evaluation(layout.evaluation) is None:
            start = time.time()
            eval_plan = BatchPlan(held_out, recipe.data.batch_size, task.collate, shuffle=False, lengths=_lengths(held_out))
            batches = [eval_plan.batch(k) for k in range(len(eval_plan))]
            models = {"distilled": student}
            if recipe.prune.enabled:
                for budget in sorted(recipe.prune.budgets, reverse=True):
                    name = budget_name(budget)
                    models[name] = replacer.load(layout.students / name, base=base)
            if recipe.evaluate.baseline:
                models["undistilled"] = _student(recipe, base, sites)
            with progress.task("evaluate", 1) as advance:
                metrics = evaluate(
                    dense, models, task, batches, _timed_batches(recipe, task, held_out),
                    recipe.evaluate.latency_repeats if recipe.evaluate.latency else None,
                    recipe.evaluate.site_error_batches,
                )
                advance()
            if recipe.sparsify.enabled:  # what sparsifying cost the teacher itself
                metrics["sparse_teacher"] = task.compare(outputs(task, dense, batches), outputs(task, teacher, batches), batches)
            if recipe.evaluate.figures:
                figures = write_figures(layout.figures, metrics, dense, student, task, batches[0], layout.metrics)
                metrics["figures"] = [str(f.relative_to(run.path)) for f in figures]
            write_text_atomically(layout.evaluation, json.dumps(metrics, indent=2))
            run.finish("evaluate", time.time() - start)
        if recipe.export.enabled and not run.done("export"):
            start = time.time()
            replacer.save(student, layout.model)
            run.finish("export", time.time() - start)
    metrics = _read_evaluation(layout.evaluation)
    if statistics is not None:
        metrics["teacher_attention"] = statistics
        if (layout.figures / "teacher_attention.png").is_file():
            metrics.setdefault("figures", []).insert(0, "figures/teacher_attention.png")
    replaced = replacer.scan(student).replaced
    metrics["replaced_sites"] = [s.name for s in replaced]
    metrics["replaced_heads"] = {s.name: (sites.heads or {}).get(s.name, list(range(s.num_heads))) for s in replaced}
    return write_report(layout, recipe, task, run.state, metrics)


def _read_evaluation(path: Path) -> dict[str, Any] | None:
    """The evaluate stage's figures; None when they are missing or damaged, so the stage runs again."""
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return metrics if isinstance(metrics, dict) and "fidelity" in metrics else None


def _timed_batches(recipe: Recipe, task: Task, held_out: list) -> dict[int, Batch]:
    """The held-out batches CPU latency is measured on, by batch size (evaluation and latency budgets alike)."""
    return {k: task.collate([held_out[i % len(held_out)] for i in range(k)]) for k in recipe.evaluate.latency_batch_sizes}


def _latency_measure(recipe: Recipe, task: Task, held_out: list) -> Measure:
    """Median CPU milliseconds of one call at the first timed batch size (what latency budgets are fractions of)."""
    batch = next(iter(_timed_batches(recipe, task, held_out).values()))
    return lambda model: median_latency_ms(lambda: task.run(model, batch), recipe.evaluate.latency_repeats)


def _resume_from(student: nn.Module, teacher: nn.Module, *candidates: Path) -> nn.Module:
    """The student saved by the latest finished stage, if any (`load` builds it on a copy of the teacher)."""
    for path in candidates:
        if (path / "manifest.json").is_file():
            return replacer.load(path, base=teacher)
    return student


def _lengths(examples: Any) -> list[int] | None:
    """Character counts of texts (a cheap proxy for token counts); images need no bucketing."""
    return [len(e) for e in examples] if isinstance(examples, list) and examples and isinstance(examples[0], str) else None


def _max_length(recipe: Recipe) -> int:
    from replacer.recipe import TextData

    lengths = [s.max_length for s in recipe.data.train + recipe.data.eval if isinstance(s, TextData)]
    return max(lengths, default=128)
