"""replacer-tinyformer: an example adapter plugin. The adapter teaches replacer TinyFormer's attention;
the describe/build hooks let `replacer.load(path)` rebuild a saved TinyFormer without `base=`."""

from __future__ import annotations

from replacer import hookimpl
from replacer.errors import CheckpointError
from replacer_tinyformer.adapter import TinyFormerAdapter
from replacer_tinyformer.model import TinyFormer, TinyFormerConfig

__all__ = ["TinyFormer", "TinyFormerAdapter", "TinyFormerConfig"]


@hookimpl
def replacer_adapters() -> list:
    return [TinyFormerAdapter()]


@hookimpl
def replacer_describe_model(model) -> dict | None:
    """What a manifest records to rebuild this family: data only (a family name and a config), never code."""
    if not isinstance(model, TinyFormer):
        return None
    return {"family": "tinyformer", "config": model.config.to_dict()}


@hookimpl
def replacer_build_model(origin: dict):
    if origin.get("family") != "tinyformer":
        return None
    try:
        return TinyFormer(TinyFormerConfig(**origin.get("config", {})))
    except TypeError as exc:
        raise CheckpointError(f"the checkpoint's tinyformer config does not build a TinyFormer: {exc}") from None
