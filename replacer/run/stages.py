"""The stages of a run as objects with one interface, over one `RunContext`.

Each stage says whether the recipe wants it, whether it is skipped once recorded as finished
(`resumable`) or runs every time and finds its own cached output (the teacher, the analysis, the
sparse teacher: later stages need what they produce), whether only rank 0 runs it, and what it adds
to `state.json`. `run_stages` (in `replacer.run.runner`) does the timing and the bookkeeping for all of them.
"""

from __future__ import annotations

import abc
import contextlib
import copy
import functools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from replacer.report.figures import plot_head_heatmaps, write_figures
from replacer.run.teacher_attention import analyze_teacher
from replacer.train.batches import BatchPlan
from replacer.checkpoint import load, save
from replacer.distill.blockwise import distill_blockwise
from replacer.distill.end_to_end import tune_end_to_end
from replacer.train.distributed import World
from replacer.ecosystem import ModelContext
from replacer.metrics.evaluate import evaluate, outputs
from replacer.metrics.timing import median_latency_ms
from replacer.exporting import export_formats, export_into
from replacer.files import write_text_atomically
from replacer.graph.scan import scan
from replacer.run.inputs import concatenated, export_context
from replacer.plugins import get_registry
from replacer.progress import Progress
from replacer.pruning.latency import Measure
from replacer.run.layout import STUDENT, UNTRAINED, budget_name
from replacer.run.prune_stage import prune_budgets
from replacer.recipe import Recipe
from replacer.replace import replace
from replacer.run.layout import RunDir, RunLayout
from replacer.run.selection import Selection, choose_sites, needs_analysis
from replacer.run.sparse_teacher import sparsified_teacher
from replacer.tasks import Batch, Task
from replacer.run.teacher import obtain_teacher
from replacer.train.state import clear_state

logger = logging.getLogger(__name__)


@dataclass
class RunContext:
    """What the stages of one run share: the inputs, set up once, and what each stage hands on."""

    recipe: Recipe
    run: RunDir
    task: Task
    plan: BatchPlan
    held_out_parts: dict[str, Sequence[Any]]
    """The held-out examples by source name, in the recipe's order."""
    progress: Progress
    world: World
    stack: contextlib.ExitStack
    teacher: nn.Module
    """The distillation target: the teacher as loaded or trained, the sparse teacher after `sparsify`."""
    dense: nn.Module | None = None
    """The function to keep, where it differs from `teacher` (after `sparsify`)."""
    base: nn.Module | None = None
    """What students are built on, where it differs from `teacher` (after `sparsify`)."""
    statistics: dict | None = None
    student: nn.Module | None = None
    _trained: bool = field(default=False, repr=False)

    @property
    def layout(self) -> RunLayout:
        return self.run.layout

    @property
    def reference(self) -> nn.Module:
        return self.dense if self.dense is not None else self.teacher

    @property
    def foundation(self) -> nn.Module:
        return self.base if self.base is not None else self.teacher

    @functools.cached_property
    def held_out(self) -> Sequence[Any]:
        """Every held-out example, the sources one after another."""
        return concatenated(list(self.held_out_parts.values()))

    @functools.cached_property
    def selection(self) -> Selection:
        """The sites (and heads) to replace, chosen once the teacher students are built on is final."""
        return choose_sites(self.recipe, scan(self.foundation).sites, self.statistics)

    def untrained_student(self) -> nn.Module:
        """The replaced model before training; seeded, so the untrained baseline starts identically."""
        recipe = self.recipe
        torch.manual_seed(recipe.seed)
        return replace(
            self.foundation, recipe.mixer.plugin, sites=self.selection.sites, options=recipe.mixer.options,
            heads=self.selection.heads,
        ).eval()

    def resume_student(self, *candidates: Path) -> nn.Module:
        """The student saved by the latest finished stage among `candidates` (else the one in hand)."""
        for path in candidates:
            if (path / "manifest.json").is_file():
                self.student = load(path, base=self.foundation)
                break
        return self.student

    def trained_student(self) -> nn.Module:
        """The student after the training stages (tuned, else distilled, else untrained), read once."""
        if not self._trained:
            self.resume_student(self.layout.tuned, self.layout.distilled)
            self._trained = True
        return self.student


class Stage(abc.ABC):
    """One stage: `run` does its work and returns what `state.json` records beside its time."""

    name: str = ""
    recorded = True
    """Recorded in `state.json`; a step that is not (building the student) runs every time."""
    resumable = True
    """Skipped once recorded as finished; otherwise it runs every time (finding its cached output) and is recorded once."""
    main_only = False
    """Only rank 0 runs it; the other ranks stop before it."""

    def wanted(self, ctx: RunContext) -> bool:
        return True

    def finished(self, ctx: RunContext) -> bool:
        return ctx.run.done(self.name)

    @abc.abstractmethod
    def run(self, ctx: RunContext) -> dict[str, Any]:
        """Do the stage's work on `ctx` (updating what it hands on) and return what `state.json` records."""


class TeacherStage(Stage):
    """Train the teacher from scratch (rank 0; the other ranks then read its cache)."""

    name, resumable = "teacher", False

    def wanted(self, ctx: RunContext) -> bool:
        return ctx.recipe.teacher.train

    def run(self, ctx: RunContext) -> dict[str, Any]:
        with ctx.progress.task("teacher: train from scratch", ctx.recipe.teacher.steps) as advance, ctx.world.main_first():
            ctx.teacher, trained = obtain_teacher(ctx.recipe, ctx.teacher, ctx.task, ctx.plan, advance, ctx.run.log)
        return {"trained_now": trained}


class AnalyzeStage(Stage):
    """The teacher's attention statistics (what site policies rank by, and the report's heatmap)."""

    name, resumable = "analyze", False

    def wanted(self, ctx: RunContext) -> bool:
        return needs_analysis(ctx.recipe)

    def run(self, ctx: RunContext) -> dict[str, Any]:
        spec = ctx.recipe.analyze
        with ctx.progress.task(f"analyze: {spec.analyzer}", 1) as advance, ctx.world.main_first():
            ctx.statistics = analyze_teacher(ctx.teacher, ctx.task, ctx.plan, spec, ctx.layout.analysis)
            if ctx.recipe.evaluate.figures and ctx.world.is_main:
                plot_head_heatmaps(ctx.statistics, ctx.layout.figures / "teacher_attention.png")
            advance()
        return {}


class SparsifyStage(Stage):
    """A top-k-attention teacher for the students to learn; the dense teacher stays the function to keep."""

    name, resumable = "sparsify", False

    def wanted(self, ctx: RunContext) -> bool:
        return ctx.recipe.sparsify.enabled

    def run(self, ctx: RunContext) -> dict[str, Any]:
        recipe = ctx.recipe
        ctx.dense = ctx.teacher
        ctx.teacher, ctx.base = sparsified_teacher(
            ctx.dense, ctx.task, ctx.plan, recipe.sparsify, recipe.tune, ctx.layout.sparse_teacher, ctx.progress,
            ctx.run.log, ctx.stack, ctx.world,
        )
        return {}


class StudentStep(Stage):
    """The sites chosen and the untrained student built on the final teacher (every run, so a resumed
    run draws the same random numbers as an uninterrupted one)."""

    name, recorded = "student", False

    def run(self, ctx: RunContext) -> dict[str, Any]:
        ctx.student = ctx.untrained_student()
        return {}


class DistillStage(Stage):
    """Block-wise distillation of every replaced site from the teacher's captured inputs and outputs."""

    name = "distill"

    def wanted(self, ctx: RunContext) -> bool:
        return ctx.recipe.distill.enabled

    def run(self, ctx: RunContext) -> dict[str, Any]:
        recipe, student = ctx.recipe, ctx.student
        losses = distill_blockwise(
            student, ctx.teacher, ctx.task, ctx.plan, recipe.distill, ctx.layout.distill, recipe.seed, ctx.progress,
            ctx.run.log, ctx.world,
        )
        if ctx.world.is_main:
            save(student, ctx.layout.distilled)
        ctx.world.barrier()
        return {"final_loss": losses}


class TuneStage(Stage):
    """End-to-end tuning of the whole student against the teacher's outputs."""

    name = "tune"

    def wanted(self, ctx: RunContext) -> bool:
        return ctx.recipe.tune.enabled

    def run(self, ctx: RunContext) -> dict[str, Any]:
        student = ctx.resume_student(ctx.layout.distilled)
        state = ctx.layout.tune_state
        state.parent.mkdir(exist_ok=True)
        with ctx.progress.task("tune: end-to-end", ctx.recipe.tune.steps) as advance:
            loss = tune_end_to_end(student, ctx.teacher, ctx.task, ctx.plan, ctx.recipe.tune, state, advance, ctx.run.log, ctx.world)
        if ctx.world.is_main:
            save(student, ctx.layout.tuned)
            clear_state(state)
        return {"final_loss": loss}


class PruneStage(Stage):
    """A family of smaller students, one per parameter or latency budget, cut from the trained student."""

    name = "prune"

    def wanted(self, ctx: RunContext) -> bool:
        return ctx.recipe.prune.enabled

    def run(self, ctx: RunContext) -> dict[str, Any]:
        recipe = ctx.recipe
        budgets = prune_budgets(
            copy.deepcopy(ctx.trained_student()), ctx.teacher, ctx.foundation, ctx.task, ctx.plan, recipe.prune, recipe.tune,
            ctx.layout.prune, ctx.layout.students, ctx.progress, ctx.run.log, ctx.world, latency_measure(ctx),
        )
        return {"budgets": budgets}


class EvaluateStage(Stage):
    """Every student (and the untrained baseline) against the dense teacher on the held-out data."""

    name, main_only = "evaluate", True

    def finished(self, ctx: RunContext) -> bool:
        return ctx.run.done(self.name) and read_evaluation(ctx.layout.evaluation) is not None

    def run(self, ctx: RunContext) -> dict[str, Any]:
        recipe, task, layout = ctx.recipe, ctx.task, ctx.layout
        batches, sources = held_out_batches(ctx)
        student = ctx.trained_student()
        models = {STUDENT: student}
        if recipe.prune.enabled:
            for budget in sorted(recipe.prune.budgets, reverse=True):
                name = budget_name(budget)
                models[name] = load(layout.students / name, base=ctx.foundation)
        if recipe.evaluate.baseline:
            models[UNTRAINED] = ctx.untrained_student()
        with ctx.progress.task("evaluate", 1) as advance:
            metrics = evaluate(
                ctx.reference, models, task, batches, timed_batches(ctx),
                recipe.evaluate.latency_repeats if recipe.evaluate.latency else None, recipe.evaluate.site_error_batches,
                sources,
            )
            advance()
        if recipe.evaluate.ecosystem:
            metrics["ecosystem"] = ecosystem_evaluations({"teacher": ctx.reference, **models}, ctx.held_out, export_context(recipe, task.name))
        if recipe.sparsify.enabled:  # what sparsifying cost the teacher itself
            metrics["sparse_teacher"] = task.compare(outputs(task, ctx.reference, batches), outputs(task, ctx.teacher, batches), batches)
        if recipe.evaluate.figures:
            figures = write_figures(layout.figures, metrics, ctx.reference, student, task, batches[0], layout.metrics)
            metrics["figures"] = [str(f.relative_to(layout.root)) for f in figures]
        write_text_atomically(layout.evaluation, json.dumps(metrics, indent=2))
        return {}


class ExportStage(Stage):
    """The final student in each export format: safetensors plus manifest, and the formats plugins write."""

    name, main_only = "export", True

    def wanted(self, ctx: RunContext) -> bool:
        return ctx.recipe.export.enabled

    def run(self, ctx: RunContext) -> dict[str, Any]:
        context = export_context(ctx.recipe, ctx.task.name)
        student = ctx.trained_student()
        written = {}
        for exporter in export_formats(ctx.recipe.export.formats, context):
            out = export_into(exporter, student, ctx.layout.exported(exporter.folder), context)
            written[exporter.name] = str(out.relative_to(ctx.layout.root))
        return {"formats": written}


STAGES: tuple[Stage, ...] = (
    TeacherStage(), AnalyzeStage(), SparsifyStage(), StudentStep(), DistillStage(), TuneStage(), PruneStage(), EvaluateStage(), ExportStage(),
)


def held_out_batches(ctx: RunContext) -> tuple[list[Batch], dict[str, list[int]]]:
    """The held-out batches, each source batched on its own, with the indices of each source's batches."""
    batches: list[Batch] = []
    sources: dict[str, list[int]] = {}
    for name, examples in ctx.held_out_parts.items():
        plan = BatchPlan(examples, ctx.recipe.data.batch_size, ctx.task.collate, shuffle=False, lengths=example_lengths(examples))
        sources[name] = list(range(len(batches), len(batches) + len(plan)))
        batches += [plan.batch(k) for k in range(len(plan))]
    return batches, sources


def ecosystem_evaluations(models: dict[str, nn.Module], examples: Sequence[Any], context: ModelContext) -> dict[str, dict]:
    """Every installed ecosystem evaluation made for the task, by name (those that cannot run here are noted and skipped)."""
    results = {}
    for evaluation in get_registry().evaluations:
        if not evaluation.automatic or context.task not in evaluation.tasks:
            continue
        missing = evaluation.available()
        if missing is not None:
            logger.warning("the %s evaluation is skipped: %s", evaluation.name, missing)
            continue
        results[evaluation.name] = evaluation.evaluate(models, list(examples), context)
    return results


def read_evaluation(path: Path) -> dict[str, Any] | None:
    """The evaluate stage's figures; None when they are missing or damaged, so the stage runs again."""
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return metrics if isinstance(metrics, dict) and STUDENT in metrics.get("fidelity", {}) else None


def example_lengths(examples: Any) -> list[int] | None:
    """Character counts of texts (a cheap proxy for token counts); images need no bucketing."""
    return [len(e) for e in examples] if isinstance(examples, list) and examples and isinstance(examples[0], str) else None


def timed_batches(ctx: RunContext) -> dict[int, Batch]:
    """The held-out batches CPU latency is measured on, by batch size (evaluation and latency budgets alike)."""
    held_out = ctx.held_out
    return {k: ctx.task.collate([held_out[i % len(held_out)] for i in range(k)]) for k in ctx.recipe.evaluate.latency_batch_sizes}


def latency_measure(ctx: RunContext) -> Measure:
    """Median CPU milliseconds of one call at the first timed batch size (what latency budgets are fractions of)."""
    batch = next(iter(timed_batches(ctx).values()))
    return lambda model: median_latency_ms(lambda: ctx.task.run(model, batch), ctx.recipe.evaluate.latency_repeats)
