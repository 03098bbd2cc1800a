"""Plugin discovery through the entry-point group `replacer`, built-in plugins included.

One broken plugin never breaks the others: its import error is recorded and shown by
`replacer plugins`, and everything else keeps working.
"""

from __future__ import annotations

import importlib.metadata as md
import threading
from dataclasses import dataclass, field
from typing import Any

import pluggy

from replacer import hookspecs
from replacer.analyzer import AnalyzerSpec
from replacer.errors import UnknownPluginError
from replacer.graph.adapter import Adapter
from replacer.mixer import MixerSpec

ENTRY_POINT_GROUP = "replacer"


@dataclass
class PluginInfo:
    """One entry point: where it comes from, what it provides, or why it failed to load."""

    name: str
    value: str
    distribution: str
    version: str
    provides: list[str] = field(default_factory=list)
    error: str | None = None


class Registry:
    """The loaded plugins and what they provide, in entry-point order (sorted by name)."""

    def __init__(self) -> None:
        self.manager = pluggy.PluginManager(hookspecs.PROJECT)
        self.manager.add_hookspecs(hookspecs)
        self.plugins: list[PluginInfo] = []
        self._mixers: dict[str, MixerSpec] = {}
        self._adapters: list[Adapter] = []
        self._analyzers: dict[str, AnalyzerSpec] = {}

    def load_entry_points(self, group: str = ENTRY_POINT_GROUP) -> None:
        seen: set[str] = set()
        for ep in sorted(md.entry_points(group=group), key=lambda e: e.name):
            if ep.name in seen:  # the same distribution visible twice on sys.path
                continue
            seen.add(ep.name)
            dist = ep.dist
            info = PluginInfo(ep.name, ep.value, dist.name if dist else "?", dist.version if dist else "?")
            self.plugins.append(info)
            try:
                self.register(ep.load(), info)
            except Exception as exc:  # noqa: BLE001 - a broken plugin is reported, never fatal
                info.error = f"{type(exc).__name__}: {exc}"
                info.provides.clear()

    def register(self, plugin: Any, info: PluginInfo) -> None:
        """Register one plugin object and collect what it provides (all or nothing)."""
        self.manager.register(plugin, name=info.name)
        try:
            mixers = _collect(self.manager, plugin, "replacer_mixers", MixerSpec)
            adapters = _collect(self.manager, plugin, "replacer_adapters", Adapter)
            analyzers = _collect(self.manager, plugin, "replacer_analyzers", AnalyzerSpec)
        except Exception:
            self.manager.unregister(plugin)
            raise
        for spec in mixers:
            if spec.name in self._mixers:
                raise ValueError(f"mixer '{spec.name}' is already provided by another plugin")
        for spec in mixers:
            self._mixers[spec.name] = spec
            info.provides.append(f"mixer:{spec.name}")
        for adapter in adapters:
            self._adapters.append(adapter)
            info.provides.append(f"adapter:{adapter.name}")
        for spec in analyzers:
            self._analyzers[spec.name] = spec
            info.provides.append(f"analyzer:{spec.name}")
        for hook in ("replacer_load_model", "replacer_load_tokenizer", "replacer_describe_model", "replacer_build_model"):
            if _implements(self.manager, plugin, hook):
                info.provides.append(hook.removeprefix("replacer_").replace("_", "-"))

    @property
    def adapters(self) -> list[Adapter]:
        return list(self._adapters)

    @property
    def mixer_names(self) -> list[str]:
        return sorted(self._mixers)

    def mixer(self, name: str) -> MixerSpec:
        try:
            return self._mixers[name]
        except KeyError:
            broken = [p.name for p in self.plugins if p.error]
            hint = f"; plugins that failed to load: {', '.join(broken)} (see `replacer plugins`)" if broken else ""
            raise UnknownPluginError(
                f"unknown mixer plugin '{name}'; installed: {', '.join(self.mixer_names) or 'none'}{hint}"
            ) from None

    def provider(self, item: str) -> PluginInfo:
        """The plugin that provides `item` (e.g. "mixer:lstm")."""
        return next(p for p in self.plugins if item in p.provides)

    def analyzer(self, name: str) -> AnalyzerSpec:
        try:
            return self._analyzers[name]
        except KeyError:
            raise UnknownPluginError(
                f"unknown analyzer plugin '{name}'; installed: {', '.join(sorted(self._analyzers)) or 'none'}"
            ) from None

    def load_model(self, source: str, pretrained: bool, kwargs: dict | None = None) -> Any:
        return self.manager.hook.replacer_load_model(source=source, pretrained=pretrained, kwargs=dict(kwargs or {}))

    def load_tokenizer(self, source: str) -> Any:
        return self.manager.hook.replacer_load_tokenizer(source=source)

    def describe_model(self, model: Any) -> dict | None:
        return self.manager.hook.replacer_describe_model(model=model)

    def build_model(self, origin: dict) -> Any:
        return self.manager.hook.replacer_build_model(origin=origin)


def _implements(manager: pluggy.PluginManager, plugin: Any, hook: str) -> bool:
    return any(impl.plugin is plugin for impl in getattr(manager.hook, hook).get_hookimpls())


def _collect(manager: pluggy.PluginManager, plugin: Any, hook: str, kind: type) -> list:
    """Call one plugin's implementation of a list-returning hook and type-check what it returns."""
    out: list = []
    for impl in getattr(manager.hook, hook).get_hookimpls():
        if impl.plugin is plugin:
            for item in impl.function() or []:
                if not isinstance(item, kind):
                    raise TypeError(f"{hook} returned a {type(item).__name__}, expected {kind.__name__}")
                out.append(item)
    return out


_lock = threading.Lock()
_registry: Registry | None = None


def get_registry(refresh: bool = False) -> Registry:
    """The process-wide registry, discovered on first use; `refresh=True` re-reads the entry points."""
    global _registry
    with _lock:
        if _registry is None or refresh:
            registry = Registry()
            registry.load_entry_points()
            _registry = registry
        return _registry
