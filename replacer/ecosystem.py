"""What a plugin implements to put converted models where their users already work: write them in
another ecosystem's format (`Exporter`: a sentence-transformers folder beside replacer's own
safetensors + manifest) and measure them with that ecosystem's own tools (`Evaluation`:
sentence-transformers' evaluators, lm-evaluation-harness)."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn


@dataclass(frozen=True)
class ModelContext:
    """What an exporter or evaluation may need beyond the model: where the teacher came from and how it is fed."""

    teacher_source: str
    """The teacher's model source as a recipe names it (an alias, a folder, `hf:ID`)."""
    tokenizer_source: str | None
    """Where its tokenizer comes from (text models); None for image models."""
    task: str
    """`embedding`, `classification` or `causal-lm`."""
    max_length: int
    """The longest input the model was trained on, in tokens (text models)."""


class Exporter(abc.ABC):
    """One export format. `name` is what recipes (`export.formats`) and `replacer export --format` say;
    `folder` names its directory inside a run; formats listed in `default_for` are written by default
    for those tasks."""

    name: str = ""
    folder: str = ""
    default_for: tuple[str, ...] = ()
    writes_atomically: bool = False
    """True when `export` itself leaves `out` either whole or as it was; otherwise the caller writes into a
    temporary folder and renames it into place."""

    def check(self, context: ModelContext) -> None:
        """Raise `ReplacerError` (one line: the problem and the fix) if this format cannot be written for
        `context`. Runs in the preflight, before any work."""

    @abc.abstractmethod
    def export(self, model: nn.Module, out: Path, context: ModelContext) -> None:
        """Write `model` (a replaced model, as `replacer.replace` or `replacer.load` return it) into the
        directory `out` (new, unless `writes_atomically`)."""


class Evaluation(abc.ABC):
    """A held-out evaluation by another ecosystem's own tools, run on the teacher and its students alike
    for the tasks in `tasks` (where `available` says it can run): by the evaluate stage when `automatic`,
    and by `replacer evaluate RUN --with NAME` always."""

    name: str = ""
    tasks: tuple[str, ...] = ()
    automatic: bool = True

    def available(self) -> str | None:
        """None when it can run here; else the one-line reason (a package to install)."""
        return None

    @abc.abstractmethod
    def evaluate(self, models: dict[str, nn.Module], examples: list, context: ModelContext, **options: Any) -> dict[str, dict[str, float]]:
        """Figures by model name (the names of `models`, "teacher" among them), each a dict of metric -> value,
        measured on the held-out `examples`; `options` are the evaluation's own (`replacer evaluate --option`)."""
