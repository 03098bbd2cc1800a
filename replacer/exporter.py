"""What a plugin implements to write a converted model in another ecosystem's format (a
sentence-transformers folder, ...), beside replacer's own safetensors + manifest."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path

from torch import nn


@dataclass(frozen=True)
class ExportContext:
    """What an exporter may need beyond the model: where the teacher came from and how it is fed."""

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

    def check(self, context: ExportContext) -> None:
        """Raise `ReplacerError` (one line: the problem and the fix) if this format cannot be written for
        `context`. Runs in the preflight, before any work."""

    @abc.abstractmethod
    def export(self, model: nn.Module, out: Path, context: ExportContext) -> None:
        """Write `model` (a replaced model, as `replacer.replace` or `replacer.load` return it) into the
        directory `out` (new, unless `writes_atomically`)."""
