"""Save and load replaced models as safetensors plus a JSON manifest; nothing is ever unpickled.

The manifest names the base model's origin (enough to rebuild its architecture from its original
definition), every replacement (plugin, version, options, sites) and, for pruned models, the shapes
of the pruned tensors and the token embeddings stored factorised. Loading validates the manifest,
rebuilds the base, replays the replacements, factorises those embeddings, gives pruned tensors their
shapes, then loads the weights strictly, so any mismatch is an error.

A manifest is data: it never names code to run. Its origin is rebuilt only by a family an installed
plugin describes (timm, transformers, ...); an origin that names a `module:callable` is refused
unless the caller passes `trust_remote_code=True`, as transformers does for code shipped with a model.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import warnings
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model as load_safetensors
from safetensors.torch import save_model as save_safetensors
from torch import nn

from replacer.errors import CheckpointError, summary
from replacer.files import TEMP_SUFFIX, remove_leftovers, write_atomically, write_text_atomically
from replacer.models import build_from_origin
from replacer.plugins import get_registry
from replacer.version import __version__

FORMAT = "replacer/1"
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
SAVE_ID = "save_id"


class _Loose(BaseModel):
    model_config = ConfigDict(extra="allow")


class SiteRecord(_Loose):
    name: str


class Replacement(_Loose):
    plugin: str
    version: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    sites: list[SiteRecord] = Field(min_length=1)
    heads: dict[str, list[int]] | None = None


class Manifest(_Loose):
    """What `save` writes; checked field by field before anything is rebuilt."""

    format: str
    weights: str = WEIGHTS
    origin: dict[str, Any] | None = None
    replacements: list[Replacement] = Field(min_length=1)
    shapes: dict[str, list[int]] | None = None
    factorised: list[str] | None = None
    save_id: str | None = None


def save(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write `model` (returned by `replacer.replace`) to the directory `path`.

    Each file is written beside its final name and renamed into place, so an interrupted save never
    leaves a half-written file over a good one; weights and manifest carry one save id, so a kill
    between the two renames is detected on load instead of pairing files of two saves.
    """
    record = getattr(model, "replacer_record", None)
    if record is None:
        raise CheckpointError("this model has no replacements to save; build it with replacer.replace(...) first")
    out = Path(path)
    check_destination(out)
    out.mkdir(parents=True, exist_ok=True)
    _remove_stale_saves(out)
    save_id = secrets.token_hex(8)
    manifest = {"format": FORMAT, "replacer_version": __version__, "weights": WEIGHTS, SAVE_ID: save_id, **record}
    text = json.dumps(manifest, indent=2, default=str)
    write_atomically(out / WEIGHTS, lambda tmp: save_safetensors(model, str(tmp), metadata={"format": FORMAT, SAVE_ID: save_id}))
    write_text_atomically(out / MANIFEST, text)
    return out


def check_destination(out: Path) -> None:
    """A checkpoint goes into a new folder, an empty one, or an earlier checkpoint: never over the user's files."""
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} is a file; save into a folder (a new one, or an earlier checkpoint to replace)")
    if not out.is_dir() or (out / MANIFEST).is_file() and _is_manifest(out / MANIFEST):
        return
    theirs = sorted(p.name for p in out.iterdir() if not p.name.startswith(".saving-") and not p.name.endswith(TEMP_SUFFIX))
    if theirs:
        shown = ", ".join(theirs[:3]) + (", ..." if len(theirs) > 3 else "")
        raise CheckpointError(
            f"{out} holds files that are not a replacer checkpoint ({shown}); save into a new or empty folder"
        )


def _is_manifest(path: Path) -> bool:
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _remove_stale_saves(out: Path) -> None:
    """Temporary files (and the `.saving-*` folders of older versions) that a killed save left behind."""
    remove_leftovers(out)
    for stale in out.glob(".saving-*"):
        shutil.rmtree(stale, ignore_errors=True)


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of the checkpoint at `path`, validated; every problem is one CheckpointError line."""
    manifest_path = Path(path) / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{path} is not a replacer checkpoint: no {MANIFEST} (save one with replacer.save)")
    try:
        raw = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{manifest_path} is corrupt ({exc}); save the model again") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{manifest_path} is corrupt (not a JSON object); save the model again")
    if raw.get("format") != FORMAT:
        raise CheckpointError(f"{manifest_path} has format {raw.get('format')!r}; this replacer reads {FORMAT}")
    try:
        Manifest.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "(manifest)"
        raise CheckpointError(f"{manifest_path} is corrupt: {where}: {err['msg']}; save the model again") from None
    if Path(raw.get("weights", WEIGHTS)).name != raw.get("weights", WEIGHTS):
        raise CheckpointError(f"{manifest_path} names weights {raw['weights']!r} outside its folder; save the model again")
    return raw


def load(path: str | os.PathLike, base: nn.Module | None = None, trust_remote_code: bool = False) -> nn.Module:
    """Rebuild a saved model; `base` (a model of the original architecture) skips rebuilding it from the origin.

    `trust_remote_code=True` lets an origin that names a `module:callable` be called to build the base;
    without it such a checkpoint is refused before anything runs. `base` is never modified: the
    replacements are applied to a copy. The model is returned in eval mode.
    """
    from replacer.pruning import apply_shapes
    from replacer.pruning.embeddings import rebuild_factorised
    from replacer.replace import replace

    manifest = read_manifest(path)
    weights = Path(path) / manifest.get("weights", WEIGHTS)
    if not weights.is_file():
        raise CheckpointError(f"{weights} is missing; the checkpoint is incomplete, save it again")
    _check_same_save(weights, manifest)
    model = build_from_origin(manifest.get("origin"), trust_remote_code) if base is None else base
    registry = get_registry()
    for k, step in enumerate(manifest["replacements"]):
        provider = registry.mixer_provider(step["plugin"])
        if provider.version != step.get("version"):
            warnings.warn(
                f"checkpoint was saved with {step['plugin']} {step.get('version')}, installed is {provider.version}",
                stacklevel=2,
            )
        model = replace(
            model, step["plugin"], sites=[s["name"] for s in step["sites"]], options=step.get("options") or {},
            inplace=k > 0 or base is None, heads=step.get("heads"),
        )
    if manifest.get("factorised"):  # token embeddings as codes x basis (whole-model pruning), full rank until shaped
        rebuild_factorised(model, manifest["factorised"])
        model.replacer_record["factorised"] = manifest["factorised"]
    if manifest.get("shapes"):  # a pruned model: give its tensors their saved shapes before loading them
        apply_shapes(model, manifest["shapes"])
        model.replacer_record["shapes"] = manifest["shapes"]
    try:
        missing, unexpected = load_safetensors(model, str(weights), strict=False)
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise CheckpointError(f"{weights} cannot be loaded: {summary(exc)}") from None
    if missing or unexpected:
        raise CheckpointError(
            f"{weights} does not match the rebuilt model (missing {sorted(missing)[:3]}, unexpected "
            f"{sorted(unexpected)[:3]}); was it saved from a different base? pass base= to load"
        )
    return model.eval()


def _check_same_save(weights: Path, manifest: dict) -> None:
    """Weights and manifest of one save; a kill between their renames leaves files of two saves."""
    try:
        with safe_open(str(weights), "pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{weights} cannot be loaded: {summary(exc)}; save the model again") from None
    expected = manifest.get(SAVE_ID)
    if expected is not None and metadata.get(SAVE_ID) != expected:
        raise CheckpointError(
            f"{weights} and {MANIFEST} come from two different saves (a save was interrupted); save the model again"
        )
