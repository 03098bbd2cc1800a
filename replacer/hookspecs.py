"""The hooks a replacer plugin may implement (pluggy project name: "replacer").

A plugin is any importable object named by an entry point in the group `replacer`; its
`@hookimpl` functions are collected. Each hook returns a list, so one plugin can provide several
mixers, adapters or analyzers.
"""

from __future__ import annotations

from typing import Any

import pluggy

PROJECT = "replacer"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def replacer_mixers() -> list:
    """Return `replacer.MixerSpec` records for the sequence modules this plugin provides."""


@hookspec
def replacer_adapters() -> list:
    """Return `replacer.Adapter` instances for the attention families this plugin understands."""


@hookspec
def replacer_analyzers() -> list:
    """Return `replacer.AnalyzerSpec` records for analyzers that rank sites or heads for replacement."""


@hookspec
def replacer_exporters() -> list:
    """Return `replacer.Exporter` instances for the formats (beyond replacer's own) this plugin writes."""


@hookspec
def replacer_evaluations() -> list:
    """Return `replacer.Evaluation` instances: held-out evaluations by another ecosystem's tools."""


@hookspec(firstresult=True)
def replacer_describe_model(model: Any) -> dict | None:
    """If this plugin's family owns `model`, return a JSON-able origin that `replacer_build_model` rebuilds."""


@hookspec(firstresult=True)
def replacer_build_model(origin: dict) -> Any:
    """Rebuild a freshly initialised model from an origin this plugin described, else return None."""


@hookspec(firstresult=True)
def replacer_load_model(source: str, pretrained: bool, kwargs: dict) -> Any:
    """If this plugin's family understands the source string (a name, a path), load and return the model.

    `kwargs` (possibly empty) shape the architecture: constructor arguments for timm, config
    overrides for transformers. A plugin that cannot honour them raises ModelSourceError.
    """


@hookspec(firstresult=True)
def replacer_load_tokenizer(source: str) -> Any:
    """If this plugin's family understands the source string, return its tokenizer (text models)."""


@hookspec(firstresult=True)
def replacer_cache_footprint(model: Any, batch: dict) -> dict | None:
    """If this plugin's family owns `model` (a decoder), run it on `batch` with its incremental-decoding cache
    and return the bytes the cache holds by kind (`{"kv": ..., "mixer_state": ...}`), else None."""
