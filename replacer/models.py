"""Turning a source string into a model, and remembering where a model came from so it can be rebuilt."""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import socket
from typing import Any

from torch import nn

from replacer.errors import CheckpointError, ModelSourceError, UntrustedCodeError, summary
from replacer.plugins import get_registry

SOURCE_FORMS = (
    "a timm model name (e.g. deit_tiny_patch16_224, or timm:NAME), a local Hugging Face model dir, "
    "hf:ORG/NAME, an offline alias (minilm, smollm2) or module:callable"
)


def load_model(source: str, pretrained: bool = True, kwargs: dict | None = None) -> nn.Module:
    """Load a model from any source form a family plugin (or `module:callable`) understands.

    `pretrained=False` builds the architecture with random weights: enough to scan it, and what
    tests use. Pretrained weights for hub models need the network or a local copy. `kwargs` shape
    the architecture (timm constructor arguments, transformers config overrides, or the callable's
    keyword arguments), e.g. a small DeiT for 28 x 28 grey images.
    """
    if _is_callable_source(source):
        return _call_factory(source, kwargs or {})
    model = get_registry().load_model(source, pretrained, kwargs)
    if model is None:
        raise ModelSourceError(f"cannot resolve model source '{source}'; give {SOURCE_FORMS}")
    return model


def _is_callable_source(source: str) -> bool:
    module, sep, attr = source.partition(":")
    return bool(sep) and module not in ("timm", "hf") and attr.isidentifier() and "/" not in module


def _call_factory(source: str, kwargs: dict) -> nn.Module:
    """Import and call a user's `module:callable`; every failure is one ModelSourceError line."""
    module_name, _, attr = source.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except Exception as exc:  # noqa: BLE001 - a module that fails to import fails the same way for the user
        raise ModelSourceError(f"cannot import '{source}': {type(exc).__name__}: {summary(exc)}") from None
    if not callable(factory):
        raise ModelSourceError(f"'{source}' is a {type(factory).__name__}, not a callable that returns a model")
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as exc:
        given = f"the model.kwargs given ({', '.join(kwargs)})" if kwargs else "being called without arguments"
        raise ModelSourceError(f"'{source}' does not accept {given}: {exc}") from None
    except ValueError:  # a builtin without a readable signature: calling it will tell
        pass
    try:
        model = factory(**kwargs)
    except Exception as exc:  # noqa: BLE001 - the user's own code failed; name it and what it raised
        raise ModelSourceError(f"'{source}' raised {type(exc).__name__}: {summary(exc)}") from None
    if not isinstance(model, nn.Module):
        raise ModelSourceError(f"'{source}' returned a {type(model).__name__}, not a torch.nn.Module")
    model.replacer_origin = {"family": "callable", "target": source, **({"kwargs": kwargs} if kwargs else {})}
    return model


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers; checked once, so offline machines fail in seconds, not minutes."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def describe_origin(model: nn.Module) -> dict | None:
    """A JSON-able description that rebuilds `model`'s architecture, or None if no family knows it."""
    return getattr(model, "replacer_origin", None) or get_registry().describe_model(model)


def build_from_origin(origin: dict | None, trust_remote_code: bool = False) -> nn.Module:
    """A freshly initialised model from `describe_origin`'s output.

    Origins are data: a plugin's family rebuilds them. An origin naming a `module:callable` would run
    that code, so it is refused unless `trust_remote_code` is set.
    """
    if origin is None:
        raise CheckpointError(
            "the checkpoint does not say how to rebuild its base model; pass base=<a model of the same architecture>"
        )
    if not isinstance(origin.get("family"), str):
        raise CheckpointError("the checkpoint's origin names no model family; save the model again, or pass base=")
    if origin["family"] == "callable":
        target = origin.get("target")
        if not trust_remote_code:
            raise UntrustedCodeError(
                f"the checkpoint's base model is built by calling {target!r}, which would run that code; pass "
                "trust_remote_code=True to replacer.load only if you trust where the checkpoint came from, or pass "
                "base=<a model of the same architecture>"
            )
        kwargs = origin.get("kwargs", {})
        if not isinstance(target, str) or not _is_callable_source(target) or not isinstance(kwargs, dict):
            raise CheckpointError(f"the checkpoint's origin {origin} is not a module:callable with keyword arguments")
        return _call_factory(target, kwargs)
    model = get_registry().build_model(origin)
    if model is None:
        raise CheckpointError(
            f"no installed plugin rebuilds models of family '{origin.get('family')}'; install it or pass base="
        )
    return model


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def model_identity(model: Any) -> str:
    origin = describe_origin(model) or {}
    return origin.get("architecture") or origin.get("class") or origin.get("target") or type(model).__name__
