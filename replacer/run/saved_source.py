"""What `replacer export` and `replacer evaluate` read: a finished run directory (its recipe names the
teacher, the task and the text lengths) or a model saved by replacer (the user names the teacher)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from replacer.ecosystem import ModelContext
from replacer.errors import ReplacerError
from replacer.run.inputs import export_context, is_text, load_teacher
from replacer.recipe import ModelSection, Recipe, load_recipe
from replacer.run.layout import RESOLVED_RECIPE, RunLayout
from replacer.graph.scan import scan
from replacer.tasks import task_kind


@dataclass(frozen=True)
class SavedSource:
    path: Path
    recipe: Recipe | None  # None: a saved model, not a run
    teacher: str | None  # the teacher's source as the user gave it (overrides the run's)

    @classmethod
    def open(cls, path: Path, teacher: str | None, saved_needs: str) -> "SavedSource":
        """`saved_needs` names the options a saved model (not a run) must come with, for the error."""
        if not path.is_dir():
            raise ReplacerError(f"{path} is not a folder: give a run directory or a model saved by replacer")
        if (path / RESOLVED_RECIPE).is_file():
            return cls(path, load_recipe(path / RESOLVED_RECIPE), teacher)
        if teacher is None:
            raise ReplacerError(f"{path} is a saved model, not a run: give {saved_needs}")
        return cls(path, None, teacher)

    @property
    def is_run(self) -> bool:
        return self.recipe is not None

    @property
    def student_folder(self) -> Path:
        """The student `replacer.load` reads: a run's final model, or the saved model itself."""
        return RunLayout(self.path).model if self.is_run else self.path

    def load_teacher(self) -> nn.Module:
        spec = self.recipe.model if self.is_run and self.teacher is None else ModelSection(source=self.teacher)
        return load_teacher(spec).eval()

    def context(self, student: nn.Module, max_length: int) -> ModelContext:
        """What exporters and evaluations are told: from the run's recipe (the given teacher wins), or from the
        given teacher, the student's own structure and `max_length`."""
        if not self.is_run:
            return ModelContext(self.teacher, self.teacher, task_kind("auto", scan(student), True), max_length)
        recipe = self.recipe
        found = export_context(recipe, task_kind(recipe.model.task, scan(student), is_text(recipe)))
        if self.teacher is None:
            return found
        return ModelContext(self.teacher, self.teacher, found.task, found.max_length)
