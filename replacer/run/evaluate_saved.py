"""`replacer evaluate`: a finished run or a saved student measured beside its teacher by an ecosystem
evaluation (lm-evaluation-harness, sentence-transformers' evaluators), with the figures added to the
run's report when the source is a run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from replacer.checkpoint import load
from replacer.errors import ReplacerError
from replacer.files import write_text_atomically
from replacer.run.inputs import load_examples
from replacer.plugins import get_registry
from replacer.recipe import TextData
from replacer.report.markdown import render_markdown
from replacer.run.layout import STUDENT, RunLayout
from replacer.run.saved_source import SavedSource


def evaluate_saved(
    source: Path, evaluation: str, options: dict[str, Any], teacher: str | None = None, text: str | None = None,
    limit: int | None = None, max_length: int = 256,
) -> dict[str, dict[str, float]]:
    """Figures by model from `evaluation`: "teacher" and "student" (a run's final student, or a saved model).
    `source` is a run directory (its recipe names the teacher and the held-out text) or a saved student
    (then `teacher` and `text` are needed)."""
    found = SavedSource.open(source, teacher, "--teacher SOURCE and --text SOURCE (held-out text, e.g. fortunes)")
    if not found.is_run and text is None:
        raise ReplacerError(f"{source} is a saved model, not a run: give --text SOURCE (held-out text, e.g. fortunes)")
    chosen = get_registry().evaluation(evaluation)
    missing = chosen.available()
    if missing is not None:
        raise ReplacerError(f"the {evaluation} evaluation {missing}")
    base = found.load_teacher()
    student = load(found.student_folder, base=base)
    context = found.context(student, max_length)
    if context.task not in chosen.tasks:
        raise ReplacerError(f"the {evaluation} evaluation measures {' or '.join(chosen.tasks)} models, and {source} holds a {context.task} model")
    if text is not None:
        examples = list(load_examples([TextData(source=text, limit=limit)], seed=1))
    else:
        examples = list(load_examples(found.recipe.data.eval, found.recipe.seed + 1))[:limit]
    figures = chosen.evaluate({"teacher": base, STUDENT: student}, examples, context, **options)
    if found.is_run:
        _add_to_report(RunLayout(source), evaluation, figures)
    return figures


def _add_to_report(layout: RunLayout, evaluation: str, figures: dict[str, dict[str, float]]) -> None:
    try:
        report = json.loads(layout.report_json.read_text())
    except (OSError, ValueError):
        raise ReplacerError(f"{layout.root} has no readable report.json: finish the run (replacer run) first") from None
    report.setdefault("ecosystem", {})[evaluation] = figures
    write_text_atomically(layout.report_json, json.dumps(report, indent=2))
    write_text_atomically(layout.report_md, render_markdown(report))
