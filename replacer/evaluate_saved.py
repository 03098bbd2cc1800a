"""`replacer evaluate`: a finished run or a saved student measured beside its teacher by an ecosystem
evaluation (lm-evaluation-harness, sentence-transformers' evaluators), with the figures added to the
run's report when the source is a run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from replacer.checkpoint import load
from replacer.ecosystem import ModelContext
from replacer.errors import ReplacerError
from replacer.files import write_text_atomically
from replacer.inputs import export_context, is_text, load_examples, load_teacher
from replacer.plugins import get_registry
from replacer.recipe import ModelSpec, TextData, load_recipe
from replacer.report import render_markdown
from replacer.run_dir import RESOLVED_RECIPE, RunLayout
from replacer.tasks import task_kind


def evaluate_saved(
    source: Path, evaluation: str, options: dict[str, Any], teacher: str | None = None, text: str | None = None,
    limit: int | None = None, max_length: int = 256,
) -> dict[str, dict[str, float]]:
    """Figures by model from `evaluation`: "teacher" and "distilled" (a run's final student, named as its
    report names it) or "student" (a saved model). `source` is a run directory (its recipe names the
    teacher and the held-out text) or a saved student (then `teacher` and `text` are needed)."""
    chosen = get_registry().evaluation(evaluation)
    missing = chosen.available()
    if missing is not None:
        raise ReplacerError(f"the {evaluation} evaluation {missing}")
    models, examples, context = _run_inputs(source, text, limit) if _is_run(source) else _saved_inputs(source, teacher, text, limit, max_length)
    if context.task not in chosen.tasks:
        raise ReplacerError(f"the {evaluation} evaluation measures {' or '.join(chosen.tasks)} models, and {source} holds a {context.task} model")
    figures = chosen.evaluate(models, examples, context, **options)
    if _is_run(source):
        _add_to_report(RunLayout(source), evaluation, figures)
    return figures


def _is_run(source: Path) -> bool:
    return (source / RESOLVED_RECIPE).is_file()


def _texts(source: str, limit: int | None) -> list:
    return list(load_examples([TextData(source=source, limit=limit)], seed=1))


def _run_inputs(source: Path, text: str | None, limit: int | None) -> tuple[dict[str, nn.Module], list, ModelContext]:
    recipe = load_recipe(source / RESOLVED_RECIPE)
    teacher = load_teacher(recipe.model).eval()
    student = load(RunLayout(source).model, base=teacher)
    examples = _texts(text, limit) if text else list(load_examples(recipe.data.eval, recipe.seed + 1))[:limit]
    context = export_context(recipe, task_kind(recipe.model.task, teacher, is_text(recipe)))
    return {"teacher": teacher, "distilled": student}, examples, context


def _saved_inputs(source: Path, teacher: str | None, text: str | None, limit: int | None, max_length: int) -> tuple[dict[str, nn.Module], list, ModelContext]:
    if teacher is None or text is None:
        raise ReplacerError(f"{source} is a saved model, not a run: give --teacher SOURCE and --text SOURCE (held-out text, e.g. fortunes)")
    base = load_teacher(ModelSpec(source=teacher)).eval()
    student = load(source, base=base)
    context = ModelContext(teacher, teacher, task_kind("auto", student, True), max_length)
    return {"teacher": base, "student": student}, _texts(text, limit), context


def _add_to_report(layout: RunLayout, evaluation: str, figures: dict[str, dict[str, float]]) -> None:
    try:
        report = json.loads(layout.report_json.read_text())
    except (OSError, ValueError):
        raise ReplacerError(f"{layout.root} has no readable report.json: finish the run (replacer run) first") from None
    report.setdefault("ecosystem", {})[evaluation] = figures
    write_text_atomically(layout.report_json, json.dumps(report, indent=2))
    write_text_atomically(layout.report_md, render_markdown(report))
