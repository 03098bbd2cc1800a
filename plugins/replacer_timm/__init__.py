"""timm support: attention over tokens across timm's families (one structural adapter), model loading."""

from __future__ import annotations

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

    Each guess (the size arguments read from the model, then the class count alone, for architectures
    whose constructors take no patch or depth arguments) is checked by building it on the meta device
    (no memory, no time) and comparing every parameter shape; a model no guess reproduces gets no
    origin, and loading it needs base=.
    """
    cfg = getattr(model, "pretrained_cfg", None)
    if not type(model).__module__.startswith("timm.") or not cfg or not cfg.get("architecture"):
        return None
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    try:
        sized = _size_arguments(model)
    except (AttributeError, TypeError):  # an architecture laid out unlike the guess (sam2's HieraDet)
        sized = {"num_classes": getattr(model, "num_classes", 1000)}
    for kwargs in (sized, {"num_classes": sized["num_classes"]}):
        origin = {"family": "timm", "architecture": cfg["architecture"], "kwargs": kwargs}
        try:
            with torch.device("meta"):
                rebuilt = replacer_build_model(origin)
        except CheckpointError:
            continue
        if shapes == {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}:
            return origin
    return None


def _size_arguments(model: nn.Module) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"num_classes": getattr(model, "num_classes", 1000)}
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is not None:
        for attr in ("img_size", "patch_size"):
            if getattr(patch_embed, attr, None) is not None:
                kwargs[attr] = list(getattr(patch_embed, attr))
        proj = getattr(patch_embed, "proj", None)
        if isinstance(proj, nn.Conv2d):
            kwargs["in_chans"] = proj.in_channels
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, (nn.Sequential, nn.ModuleList)) and len(blocks) and hasattr(blocks[0], "attn"):
        kwargs["depth"] = len(blocks)
        kwargs["embed_dim"] = model.embed_dim
        kwargs["num_heads"] = blocks[0].attn.num_heads
    return kwargs


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
    except (TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"timm cannot build {name} from the checkpoint's arguments {kwargs}: {exc}") from None
