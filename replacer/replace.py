"""The engine: choose sites, build a mixer for each from a plugin, install it in the site's place."""

from __future__ import annotations

import copy
import fnmatch
from typing import Iterable

from pydantic import BaseModel
from torch import nn

from replacer.defaults import DEFAULT_MIXER
from replacer.errors import ReplacerError, SiteSelectionError, summary
from replacer.graph.adapter import Adapter, ReplacedAttention, Unsupported
from replacer.graph.scan import ScanResult, scan
from replacer.graph.site import Site, head_rows
from replacer.mixer import MixerSpec
from replacer.models import describe_origin
from replacer.plugins import get_registry

SiteSelector = str | int


def select_sites(found: ScanResult, selectors: Iterable[SiteSelector] | None) -> list[Site]:
    """Sites chosen by layer index, exact name or glob pattern (`*.attn`); None chooses every supported site."""
    if isinstance(selectors, (str, int)):  # one selector, as PEFT's target_modules takes one name
        selectors = [selectors]
    if selectors is None:
        if not found.sites:
            reasons = "; ".join(f"{u.name}: {u.reason}" for u in found.unsupported)
            raise SiteSelectionError(f"no attention site in {found.model_name} can be replaced ({reasons})")
        return list(found.sites)
    chosen: dict[str, Site] = {}
    for selector in selectors:
        hits = _match(found.sites, selector)
        if not hits:
            done = _match(found.replaced, selector)
            if done:
                raise SiteSelectionError(f"site '{done[0].name}' is already replaced; select the sites still running attention")
            unsupported = [u for u in found.unsupported if isinstance(selector, str) and _glob(u.name, selector)]
            if unsupported:
                raise SiteSelectionError(f"site '{unsupported[0].name}' cannot be replaced: {unsupported[0].reason}")
            names = ", ".join(s.name for s in found.sites[:4]) + (", ..." if len(found.sites) > 4 else "")
            indices = ", ".join(str(s.layer_index) for s in found.sites)
            raise SiteSelectionError(
                f"site selector {selector!r} matches no replaceable attention site; give a layer index "
                f"({indices}), a name or a glob pattern (sites: {names})"
            )
        chosen.update((s.name, s) for s in hits)
    return sorted(chosen.values(), key=lambda s: s.layer_index)


def _build(
    site: Site, adapter: Adapter, original: nn.Module, spec: MixerSpec, options: BaseModel, heads: list[int] | None
) -> ReplacedAttention:
    """The module that will stand in for `original`: its mixer (on the original's device, dtype and mode),
    wrapped by the site's adapter. An adapter that cannot do it is a one-line error naming the site."""
    try:
        value = adapter.value_projection(original, site)
        if heads is not None:
            rows = head_rows(heads, site.head_dim)
            mixer = spec.build(site.heads_subset(len(heads)), options, None if value is None else value.rows(rows))
        else:
            mixer = spec.build(site, options, value)
        reference = next(original.parameters(), None)
        if reference is not None:
            mixer.to(device=reference.device, dtype=reference.dtype)
        mixer.train(original.training)
        return adapter.wrap(site, original, mixer) if heads is None else adapter.wrap_heads(site, original, mixer, heads)
    except Unsupported as exc:
        raise SiteSelectionError(str(exc)) from None
    except ReplacerError:
        raise
    except Exception as exc:  # noqa: BLE001 - an adapter that misreads a module must not crash the caller
        raise SiteSelectionError(
            f"site '{site.name}' ({site.cls}) could not be replaced by adapter '{adapter.name}': {type(exc).__name__}: {summary(exc)}; "
            "leave it out of `sites`, or report the class to the adapter's plugin"
        ) from exc


def _check_heads(chosen: list[Site], heads: dict[str, list[int]]) -> dict[str, list[int]]:
    """Valid head choices for hybrids, by site; sites given every head are replaced whole."""
    sites = {s.name: s for s in chosen}
    split = {}
    for name, wanted in heads.items():
        if name not in sites:
            raise SiteSelectionError(f"heads are given for {name!r}, which is not among the selected sites")
        site = sites[name]
        unique = sorted(set(int(h) for h in wanted))
        if not unique or unique[0] < 0 or unique[-1] >= site.num_heads:
            raise SiteSelectionError(f"heads {wanted} of {name}: give head indices from 0 to {site.num_heads - 1}")
        if len(unique) < site.num_heads:
            split[name] = unique
    return split


def _glob(name: str, selector: str) -> bool:
    return name == selector or fnmatch.fnmatchcase(name, selector)


def _match(sites: list[Site], selector: SiteSelector) -> list[Site]:
    if isinstance(selector, bool) or not isinstance(selector, (int, str)):
        raise SiteSelectionError(f"site selector {selector!r} is not a layer index, a name or a glob pattern")
    if isinstance(selector, int):
        return [s for s in sites if s.layer_index == selector]
    return [s for s in sites if _glob(s.name, selector)]


def replace(
    model: nn.Module,
    plugin: str = DEFAULT_MIXER,
    sites: Iterable[SiteSelector] | None = None,
    options: BaseModel | dict | None = None,
    inplace: bool = False,
    heads: dict[str, list[int]] | None = None,
) -> nn.Module:
    """Swap the selected attention sites of `model` for mixers from `plugin`.

    By default the model is deep-copied and the copy is returned, so the original stays usable
    as the teacher for distillation; `inplace=True` modifies and returns `model` itself (as PEFT's
    `inject_adapter_in_model` does), for models too large to hold twice.
    The returned model takes the same inputs as before and records what was replaced
    (`model.replacer_record`), which `replacer.save` writes into the manifest.

    `heads` maps site names to the heads the mixer takes over; the other heads of those sites keep
    attention (a head-level hybrid, where the site's adapter supports it). Other sites are replaced whole.
    """
    registry = get_registry()
    spec = registry.mixer(plugin)
    validated = spec.validate_options(options)
    found = scan(model, registry.adapters)
    chosen = select_sites(found, sites)
    record = copy.deepcopy(getattr(model, "replacer_record", None)) or {
        "origin": describe_origin(model),
        "replacements": [],
    }
    target = model if inplace else copy.deepcopy(model)
    adapters = {a.name: a for a in registry.adapters}
    split = _check_heads(chosen, heads or {})
    # every module is built before any is installed: a site that fails leaves the model as it was
    built = [(site, _build(site, adapters[site.adapter], target.get_submodule(site.name), spec, validated, split.get(site.name)))
             for site in chosen]
    for site, wrapped in built:
        setattr(target.get_submodule(site.parent_name), site.attr, wrapped)
    provider = registry.mixer_provider(plugin)
    record["replacements"].append(
        {
            "plugin": plugin,
            "distribution": provider.distribution,
            "version": provider.version,
            "options": validated.model_dump(mode="json"),
            "sites": [s.to_dict() for s in chosen],
            **({"heads": split} if split else {}),
        }
    )
    target.replacer_record = record
    return target
