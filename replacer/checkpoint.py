"""Save and load replaced models as safetensors plus a JSON manifest; nothing is ever unpickled.

The manifest names the base model's origin (enough to rebuild its architecture from its original
definition), every replacement (plugin, version, options, sites) and, for pruned models, the shapes
of the pruned tensors. Loading rebuilds the base, replays the replacements, gives pruned tensors
their shapes, then loads the weights strictly, so any mismatch is an error.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_model as load_safetensors
from safetensors.torch import save_model as save_safetensors
from torch import nn

from replacer import __version__
from replacer.errors import CheckpointError
from replacer.models import build_from_origin
from replacer.plugins import get_registry

FORMAT = "replacer/1"
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"


def save(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write `model` (returned by `replacer.replace`) to the directory `path`.

    Files are written beside their final names and renamed into place, so an interrupted save
    never leaves a half-written checkpoint over a good one.
    """
    record = getattr(model, "replacer_record", None)
    if record is None:
        raise CheckpointError("this model has no replacements to save; build it with replacer.replace(...) first")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"format": FORMAT, "replacer_version": __version__, "weights": WEIGHTS, **record}
    with tempfile.TemporaryDirectory(dir=out, prefix=".saving-") as tmp:
        save_safetensors(model, os.path.join(tmp, WEIGHTS), metadata={"format": FORMAT})
        Path(tmp, MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
        umask = os.umask(0)
        os.umask(umask)
        for name in (WEIGHTS, MANIFEST):  # temp files are private; the checkpoint gets ordinary permissions
            os.chmod(os.path.join(tmp, name), 0o666 & ~umask)
            os.replace(os.path.join(tmp, name), out / name)
    return out


def read_manifest(path: str | os.PathLike) -> dict:
    manifest_path = Path(path) / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{path} is not a replacer checkpoint: no {MANIFEST} (save one with replacer.save)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{manifest_path} is corrupt ({exc}); save the model again") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{manifest_path} has format {manifest.get('format')!r}; this replacer reads {FORMAT}")
    return manifest


def load(path: str | os.PathLike, base: nn.Module | None = None) -> nn.Module:
    """Rebuild a saved model; `base` (a model of the original architecture) skips rebuilding it from the origin.

    The model is returned in eval mode.
    """
    from replacer.replace import replace

    manifest = read_manifest(path)
    weights = Path(path) / manifest.get("weights", WEIGHTS)
    if not weights.is_file():
        raise CheckpointError(f"{weights} is missing; the checkpoint is incomplete, save it again")
    model = base if base is not None else build_from_origin(manifest.get("origin"))
    registry = get_registry()
    for step in manifest["replacements"]:
        provider = registry.provider(f"mixer:{step['plugin']}") if step["plugin"] in registry.mixer_names else None
        if provider is not None and provider.version != step.get("version"):
            warnings.warn(
                f"checkpoint was saved with {step['plugin']} {step.get('version')}, installed is {provider.version}",
                stacklevel=2,
            )
        model = replace(
            model, step["plugin"], sites=[s["name"] for s in step["sites"]], options=step["options"], inplace=True,
            heads=step.get("heads"),
        )
    if manifest.get("shapes"):  # a pruned model: give its tensors their saved shapes before loading them
        from replacer.pruning import apply_shapes

        apply_shapes(model, manifest["shapes"])
        model.replacer_record["shapes"] = manifest["shapes"]
    try:
        missing, unexpected = load_safetensors(model, str(weights), strict=False)
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise CheckpointError(f"{weights} cannot be loaded: {str(exc).splitlines()[0]}") from None
    if missing or unexpected:
        raise CheckpointError(
            f"{weights} does not match the rebuilt model (missing {sorted(missing)[:3]}, unexpected "
            f"{sorted(unexpected)[:3]}); was it saved from a different base? pass base= to load"
        )
    return model.eval()
