"""Walk a model, hand each module to the adapters, and report every attention site found."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from rich.console import Console
from rich.table import Table
from torch import nn

from replacer.errors import NoAttentionError, summary
from replacer.graph.adapter import Adapter, ReplacedAttention, Unsupported
from replacer.graph.site import Site, UnsupportedSite

_LOOKS_LIKE_ATTENTION = re.compile(r"attention|attn", re.IGNORECASE)


@dataclass
class ScanResult:
    """The sites of one model; printing it shows a table of how each will be handled."""

    model_name: str
    sites: list[Site] = field(default_factory=list)
    unsupported: list[UnsupportedSite] = field(default_factory=list)
    replaced: list[Site] = field(default_factory=list)

    def site(self, name: str) -> Site:
        for site in self.sites:
            if site.name == name:
                return site
        raise KeyError(name)

    def __rich__(self) -> Table:
        table = Table(
            title=f"{self.model_name}: {len(self.sites)} attention sites, {len(self.replaced)} already replaced, "
            f"{len(self.unsupported)} unsupported"
        )
        for col in ("#", "site", "class", "adapter", "width", "heads x dim", "kv heads", "causal", "handling"):
            table.add_column(col, overflow="fold")
        rows = [(s, "replace" + (f" ({s.note})" if s.note else "")) for s in self.sites]
        rows += [(s, "[green]replaced[/green]") for s in self.replaced]
        for s, handling in sorted(rows, key=lambda row: row[0].layer_index):
            table.add_row(
                str(s.layer_index), s.name, s.cls, s.adapter, str(s.d_model), f"{s.num_heads} x {s.head_dim}",
                str(s.num_kv_heads), "yes" if s.causal else "no", handling,
            )
        for u in self.unsupported:
            table.add_row("-", u.name, u.cls, "-", "", "", "", "", f"[red]unsupported: {u.reason}[/red]")
        return table

    def __str__(self) -> str:
        console = Console(width=160, record=True, file=_Discard(), color_system=None)
        console.print(self)
        return console.export_text()


class _Discard:
    def write(self, _: str) -> int:
        return 0

    def flush(self) -> None:
        pass


def _class_path(module: nn.Module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def _first_match(adapters: list[Adapter], module: nn.Module) -> Adapter | None:
    """The first adapter that claims `module`; one whose check itself fails does not claim it."""
    for adapter in adapters:
        try:
            if adapter.matches(module):
                return adapter
        except Exception:  # noqa: BLE001 - a faulty check is no match; the next adapter may know the class
            continue
    return None


def scan(model: nn.Module, adapters: list[Adapter] | None = None) -> ScanResult:
    """Every attention site in `model`; modules that look like attention but are not understood are listed.

    Raises NoAttentionError when nothing attention-like is found at all.
    """
    if not isinstance(model, nn.Module):
        raise NoAttentionError(
            f"replacer works on a torch.nn.Module (a timm or transformers model), not a {type(model).__name__}; "
            "load the model first (replacer.load_model(source) takes a name or path)"
        )
    if adapters is None:
        from replacer.plugins import get_registry

        adapters = get_registry().adapters
    result = ScanResult(model_name=type(model).__name__)
    claimed: list[str] = []
    lookalikes: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if any(name.startswith(c + ".") for c in claimed):
            continue  # inside a site: its parts belong to it
        if isinstance(module, ReplacedAttention):
            claimed.append(name)
            result.replaced.append(module.site)
            continue
        adapter = _first_match(adapters, module)
        if adapter is None:
            if name and _LOOKS_LIKE_ATTENTION.search(type(module).__name__):
                lookalikes.append((name, module))
            continue
        claimed.append(name)
        try:
            index = len(result.sites) + len(result.replaced)
            result.sites.append(adapter.describe(name, module, layer_index=index))
        except Unsupported as why:
            result.unsupported.append(UnsupportedSite(name, _class_path(module), str(why)))
        except Exception as exc:  # noqa: BLE001 - a module an adapter misreads is a row, never a crash
            reason = f"adapter '{adapter.name}' could not read this module ({type(exc).__name__}: {summary(exc)})"
            result.unsupported.append(UnsupportedSite(name, _class_path(module), reason))
    for name, module in lookalikes:
        is_container = any(c.startswith(name + ".") for c in claimed)
        if not is_container:
            result.unsupported.append(
                UnsupportedSite(name, _class_path(module), "no installed adapter recognises this class")
            )
    if not (result.sites or result.unsupported or result.replaced):
        raise NoAttentionError(
            f"{result.model_name} has no attention modules; replacer swaps attention blocks, so there is "
            "nothing to replace (pass a transformer, or install an adapter plugin for this family)"
        )
    return result


def installed_adapter(name: str) -> Adapter:
    """The installed adapter a site names (`Site.adapter`), or `Unsupported` saying it is not installed."""
    from replacer.plugins import get_registry

    found = next((a for a in get_registry().adapters if a.name == name), None)
    if found is None:
        raise Unsupported(f"adapter '{name}' is not installed")
    return found
