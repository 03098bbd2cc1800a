"""Which formats a run writes its final model in, checked before any work: replacer's own (safetensors
plus manifest, always) and the formats plugins provide (`replacer_exporters`), by default those made
for the recipe's task (sentence-transformers for embedding models)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from torch import nn

from replacer.checkpoint import save
from replacer.ecosystem import Exporter, ModelContext
from replacer.errors import ReplacerError
from replacer.files import temporary_name
from replacer.plugins import get_registry

logger = logging.getLogger(__name__)

REPLACER = "replacer"


class ReplacerFormat(Exporter):
    """replacer's own: what `replacer.load` reads."""

    name, folder, writes_atomically = REPLACER, "model", True

    def export(self, model: nn.Module, out: Path, context: ModelContext) -> None:
        save(model, out)


def export_formats(asked: list[str] | None, context: ModelContext) -> list[Exporter]:
    """The exporters for `asked` (None: replacer's own plus the task's defaults that can be written here),
    each checked against `context`; an unknown or impossible format is a `ReplacerError`."""
    registry = get_registry()
    if asked is None:
        chosen = [ReplacerFormat()]
        for name in registry.exporter_names:
            exporter = registry.exporter(name)
            if context.task in exporter.default_for:
                try:
                    exporter.check(context)
                except ReplacerError as exc:
                    logger.warning("the default export '%s' is skipped: %s", name, exc)
                    continue
                chosen.append(exporter)
        return chosen
    chosen = []
    for name in dict.fromkeys(asked):
        if name == REPLACER:
            chosen.append(ReplacerFormat())
            continue
        try:
            exporter = registry.exporter(name)
        except ReplacerError:
            known = ", ".join([REPLACER, *registry.exporter_names])
            raise ReplacerError(f"export.formats: unknown format '{name}'; known: {known}") from None
        exporter.check(context)
        chosen.append(exporter)
    return chosen


def export_into(exporter: Exporter, model: nn.Module, out: Path, context: ModelContext) -> Path:
    """Write one format into `out`, replacing what was there only once the new folder is complete."""
    if exporter.writes_atomically:
        exporter.export(model, out, context)
        return out
    tmp = temporary_name(out)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        exporter.export(model, tmp, context)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
