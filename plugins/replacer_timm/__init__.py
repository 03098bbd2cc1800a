"""timm support: attention over tokens across timm's families (one structural adapter), model loading."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from replacer.errors import CheckpointError, ModelSourceError
from replacer.hookspecs import hookimpl
from replacer.models import hub_reachable
from replacer_timm.adapters import TimmAttentionAdapter


@hookimpl
def replacer_adapters() -> list:
    return [TimmAttentionAdapter()]


@hookimpl
def replacer_load_model(source: str, pretrained: bool, kwargs: dict) -> nn.Module | None:
    import timm

    name = source.removeprefix("timm:")
    if not (source.startswith("timm:") or timm.is_model(name)):
        return None
    if not timm.is_model(name):
        raise ModelSourceError(f"timm has no model named '{name}' (see timm.list_models('*{name[:4]}*'))")
    if pretrained and not hub_reachable():
        raise ModelSourceError(
            f"pretrained weights for {name} cannot be downloaded (no network): set model.checkpoint to a local "
            "weights file (.safetensors or .pth), or model.pretrained to false"
        )
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as exc:
        raise ModelSourceError(f"timm model '{name}' rejects model.kwargs {kwargs}: {exc}") from None


@hookimpl
def replacer_describe_model(model: nn.Module) -> dict | None:
    """timm models keep no record of their constructor arguments: infer the ones that shape the weights.

    Each guess (`_size_guesses`) is checked by building it on the meta device (no memory, no time)
    and comparing every parameter shape and the attention geometry (head counts do not show in
    shapes, yet mixers are built from them); a model no guess reproduces gets no origin, and loading
    it needs base=.
    """
    cfg = getattr(model, "pretrained_cfg", None)
    if not type(model).__module__.startswith("timm.") or not cfg or not cfg.get("architecture"):
        return None
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    geometry = _attention_geometry(model)
    for kwargs in _size_guesses(model):
        origin = {"family": "timm", "architecture": cfg["architecture"], "kwargs": kwargs}
        try:
            with torch.device("meta"):
                rebuilt = replacer_build_model(origin)
        except CheckpointError:
            continue
        if shapes == {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()} and geometry == _attention_geometry(rebuilt):
            return origin
    return None


def _attention_geometry(model: nn.Module) -> list[tuple[str, int, int, int]]:
    """Every attention site's heads, head width and key/value heads, as scan reads them."""
    from replacer.errors import NoAttentionError
    from replacer.graph.scan import scan

    try:
        found = scan(model)
    except NoAttentionError:
        return []
    return sorted((s.name, s.num_heads, s.head_dim, s.num_kv_heads) for s in (*found.sites, *found.replaced))


def _size_guesses(model: nn.Module) -> list[dict[str, Any]]:
    """Constructor arguments that may have shaped `model`, most specific first: the arguments it keeps
    under their own names, the input and patch sizes, and the depth, width and heads of one flat stack
    of blocks (ViT and its kin) or of stages of blocks (Swin and other hierarchical models); then the
    class count alone."""
    classes = {"num_classes": getattr(model, "num_classes", 1000)}
    known = {**classes, **_kept_arguments(model), **_input_arguments(model)}
    guesses = []
    for shape in (_flat_blocks, _staged_blocks):
        try:
            sized = shape(model)
        except (AttributeError, TypeError):  # an architecture laid out unlike the guess (sam2's HieraDet)
            continue
        if sized:
            guesses.append({**known, **sized})
    return guesses + [known, classes]


def _kept_arguments(model: nn.Module) -> dict[str, Any]:
    """Constructor arguments the model stores as attributes of the same name (numbers, strings, tuples of them)."""
    try:
        parameters = inspect.signature(type(model).__init__).parameters
    except (TypeError, ValueError):
        return {}
    kept = {}
    for name in parameters:
        value = getattr(model, name, None) if name != "self" else None
        if isinstance(value, tuple) and all(isinstance(v, (int, float)) for v in value):
            value = list(value)
        if isinstance(value, (bool, int, float, str)) or (isinstance(value, list) and all(isinstance(v, (int, float)) for v in value)):
            kept[name] = value
    return kept


def _input_arguments(model: nn.Module) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is not None:
        for attr in ("img_size", "patch_size"):
            if getattr(patch_embed, attr, None) is not None:
                kwargs[attr] = list(getattr(patch_embed, attr))
        proj = getattr(patch_embed, "proj", None)
        if isinstance(proj, nn.Conv2d):
            kwargs["in_chans"] = proj.in_channels
    return kwargs


def _flat_blocks(model: nn.Module) -> dict[str, Any]:
    blocks = getattr(model, "blocks", None)
    if not (isinstance(blocks, (nn.Sequential, nn.ModuleList)) and len(blocks) and hasattr(blocks[0], "attn")):
        return {}
    return {"depth": len(blocks), "embed_dim": model.embed_dim, "num_heads": blocks[0].attn.num_heads}


def _staged_blocks(model: nn.Module) -> dict[str, Any]:
    stages = getattr(model, "layers", None) or getattr(model, "stages", None)
    if not isinstance(stages, (nn.Sequential, nn.ModuleList)) or not all(len(getattr(s, "blocks", ())) for s in stages):
        return {}
    if not isinstance(model.embed_dim, int):
        return {}
    return {
        "embed_dim": model.embed_dim, "depths": [len(s.blocks) for s in stages],
        "num_heads": [s.blocks[0].attn.num_heads for s in stages],
    }


# Constructor arguments that make timm read files or fetch weights: a manifest is data, so it may not set them.
_LOADING_ARGUMENTS = frozenset({"pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir"})


@hookimpl
def replacer_build_model(origin: dict) -> nn.Module | None:
    if origin.get("family") != "timm":
        return None
    import timm

    name, kwargs = origin.get("architecture"), origin.get("kwargs", {})
    if not isinstance(name, str) or not timm.is_model(name):
        raise CheckpointError(f"the checkpoint's origin names timm architecture {name!r}, which this timm does not have")
    if not isinstance(kwargs, dict) or _LOADING_ARGUMENTS & set(kwargs):
        raise CheckpointError(
            f"the checkpoint's timm origin has arguments {sorted(_LOADING_ARGUMENTS & set(kwargs or {}))} that load "
            "files; a checkpoint can only give architecture arguments (save the model again, or pass base=)"
        )
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except (TypeError, ValueError, RuntimeError, AssertionError) as exc:  # timm's constructors assert on their arguments
        raise CheckpointError(f"timm cannot build {name} from the checkpoint's arguments {kwargs}: {exc}") from None
