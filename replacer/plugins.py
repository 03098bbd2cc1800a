"""Plugin discovery through the entry-point group `replacer`, built-in plugins included.

One broken plugin never breaks the others: its import error is recorded and shown by
`replacer plugins`, and everything else keeps working. Names are never taken over silently: when
two plugins provide a mixer or analyzer of one name, the built-in one (distribution `replacer`) is
kept and the other is reported beside it; between two third parties neither is chosen until the
user names one as `DISTRIBUTION:NAME`. A hook implementation that matches no hook (a misspelling)
is reported too, since pluggy would otherwise ignore it.
"""

from __future__ import annotations

import difflib
import importlib.metadata as md
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import pluggy

from replacer import hookspecs
from replacer.analyzer import AnalyzerSpec
from replacer.errors import PluginConflictError, UnknownPluginError
from replacer.ecosystem import Evaluation, Exporter
from replacer.graph.adapter import Adapter
from replacer.mixer import MixerSpec

ENTRY_POINT_GROUP = "replacer"
BUILT_IN = "replacer"
"""The distribution whose plugins are the built-ins: a name they provide is never displaced."""

logger = logging.getLogger("replacer")
HOOKS = sorted(name for name in dir(hookspecs) if name.startswith("replacer_"))


@dataclass
class PluginInfo:
    """One entry point: where it comes from, what it provides, or why it failed to load."""

    name: str
    value: str
    distribution: str
    version: str
    provides: list[str] = field(default_factory=list)
    error: str | None = None
    problems: list[str] = field(default_factory=list)
    """Loaded, but something is wrong: an unknown hook, a name another plugin provides too."""

    @property
    def label(self) -> str:
        return f"plugin '{self.name}' of {self.distribution} {self.version}"


@dataclass
class _Claim:
    item: Any
    info: PluginInfo


class Registry:
    """The loaded plugins and what they provide, in entry-point order (sorted by name)."""

    def __init__(self) -> None:
        self.manager = pluggy.PluginManager(hookspecs.PROJECT)
        self.manager.add_hookspecs(hookspecs)
        self.plugins: list[PluginInfo] = []
        self._claims: dict[tuple[str, str], list[_Claim]] = {}
        self._adapters: list[Adapter] = []
        self._evaluations: list[Evaluation] = []
        self._warned: set[str] = set()

    def load_entry_points(self, group: str = ENTRY_POINT_GROUP) -> None:
        seen: set[tuple[str, str]] = set()
        for ep in sorted(md.entry_points(group=group), key=lambda e: e.name):
            dist = ep.dist
            info = PluginInfo(ep.name, ep.value, dist.name if dist else "?", dist.version if dist else "?")
            if (ep.name, info.distribution) in seen:  # the same distribution visible twice on sys.path
                continue
            seen.add((ep.name, info.distribution))
            self.plugins.append(info)
            try:
                self.register(ep.load(), info)
            except Exception as exc:  # noqa: BLE001 - a broken plugin is reported, never fatal
                info.error = f"{type(exc).__name__}: {exc}"
                info.provides.clear()
        self._report_conflicts()
        for info in self.plugins:
            for problem in info.problems:
                logger.warning("%s: %s", info.label, problem)

    def register(self, plugin: Any, info: PluginInfo) -> None:
        """Register one plugin object and collect what it provides (all or nothing)."""
        name = info.name if self.manager.get_plugin(info.name) is None else f"{info.name}@{info.distribution}"
        self.manager.register(plugin, name=name)
        try:
            mixers = _collect(self.manager, plugin, "replacer_mixers", MixerSpec)
            adapters = _collect(self.manager, plugin, "replacer_adapters", Adapter)
            analyzers = _collect(self.manager, plugin, "replacer_analyzers", AnalyzerSpec)
            exporters = _collect(self.manager, plugin, "replacer_exporters", Exporter)
            evaluations = _collect(self.manager, plugin, "replacer_evaluations", Evaluation)
        except Exception:
            self.manager.unregister(plugin)
            raise
        for kind, specs in (("mixer", mixers), ("analyzer", analyzers), ("exporter", exporters)):
            for spec in specs:
                self._claims.setdefault((kind, spec.name), []).append(_Claim(spec, info))
                info.provides.append(f"{kind}:{spec.name}")
        for adapter in adapters:
            self._adapters.append(adapter)
            info.provides.append(f"adapter:{adapter.name}")
        for evaluation in evaluations:
            self._evaluations.append(evaluation)
            info.provides.append(f"evaluation:{evaluation.name}")
        for hook in ("replacer_load_model", "replacer_load_tokenizer", "replacer_describe_model", "replacer_build_model",
                     "replacer_cache_footprint"):
            if _implements(self.manager, plugin, hook):
                info.provides.append(hook.removeprefix("replacer_").replace("_", "-"))
        info.problems += _unknown_hooks(self.manager, plugin)

    def _report_conflicts(self) -> None:
        for (kind, name), claims in self._claims.items():
            if len(claims) < 2:
                continue
            everyone = ", ".join(f"{c.info.distribution} {c.info.version}" for c in claims)
            for claim in claims:
                choice = (
                    "the built-in is used" if any(c.info.distribution == BUILT_IN for c in claims)
                    else f"ask for '{claim.info.distribution}:{name}' to use this one"
                )
                claim.info.problems.append(f"{kind} '{name}' is provided by several distributions ({everyone}); {choice}")

    @property
    def adapters(self) -> list[Adapter]:
        """Every adapter, highest `priority` first (registration order among equals)."""
        return sorted(self._adapters, key=lambda a: -a.priority)

    @property
    def evaluations(self) -> list[Evaluation]:
        """Every ecosystem evaluation, in registration order."""
        return list(self._evaluations)

    def evaluation(self, name: str) -> Evaluation:
        found = [e for e in self._evaluations if e.name == name]
        if not found:
            names = ", ".join(e.name for e in self._evaluations) or "none"
            raise UnknownPluginError(f"unknown evaluation '{name}'; installed: {names}")
        return found[0]

    def _names(self, kind: str) -> list[str]:
        return sorted(name for k, name in self._claims if k == kind)

    @property
    def mixer_names(self) -> list[str]:
        return self._names("mixer")

    def _choose(self, kind: str, asked: str) -> _Claim:
        """The one provider of `asked` (`NAME` or `DISTRIBUTION:NAME`), or an error that names them all."""
        qualifier, sep, name = asked.rpartition(":")
        claims = self._claims.get((kind, name), [])
        if sep:
            claims = [c for c in claims if qualifier in (c.info.distribution, c.info.name)]
        if not claims:
            broken = [p.name for p in self.plugins if p.error]
            hint = f"; plugins that failed to load: {', '.join(broken)} (see `replacer plugins`)" if broken else ""
            raise UnknownPluginError(
                f"unknown {kind} plugin '{asked}'; installed: {', '.join(self._names(kind)) or 'none'}{hint}"
            )
        if len(claims) == 1:
            return claims[0]
        built_in = [c for c in claims if c.info.distribution == BUILT_IN]
        others = ", ".join(f"'{c.info.distribution}:{name}'" for c in claims if c.info.distribution != BUILT_IN)
        if len(built_in) == 1:
            if asked not in self._warned:
                self._warned.add(asked)
                logger.warning("%s '%s' is also provided by %s; using the built-in", kind, name, others)
            return built_in[0]
        raise PluginConflictError(
            f"{kind} '{name}' is provided by several plugins ({others}); choose one by that name "
            "(or uninstall the one you do not want)"
        )

    def mixer(self, name: str) -> MixerSpec:
        return self._choose("mixer", name).item

    def mixer_provider(self, name: str) -> PluginInfo:
        """The plugin whose mixer `name` (`NAME` or `DISTRIBUTION:NAME`) is used."""
        return self._choose("mixer", name).info

    def provider(self, item: str) -> PluginInfo:
        """The plugin that provides `item` (e.g. "mixer:lstm"), chosen as `mixer` / `analyzer` choose."""
        kind, _, name = item.partition(":")
        if kind == "adapter":
            return next(p for p in self.plugins if item in p.provides)
        return self._choose(kind, name).info

    def analyzer(self, name: str) -> AnalyzerSpec:
        return self._choose("analyzer", name).item

    def exporter(self, name: str) -> Exporter:
        return self._choose("exporter", name).item

    @property
    def exporter_names(self) -> list[str]:
        return self._names("exporter")

    def load_model(self, source: str, pretrained: bool, kwargs: dict | None = None) -> Any:
        return self.manager.hook.replacer_load_model(source=source, pretrained=pretrained, kwargs=dict(kwargs or {}))

    def load_tokenizer(self, source: str) -> Any:
        return self.manager.hook.replacer_load_tokenizer(source=source)

    def describe_model(self, model: Any) -> dict | None:
        return self.manager.hook.replacer_describe_model(model=model)

    def build_model(self, origin: dict) -> Any:
        return self.manager.hook.replacer_build_model(origin=origin)

    def cache_footprint(self, model: Any, batch: dict) -> dict | None:
        return self.manager.hook.replacer_cache_footprint(model=model, batch=batch)


def _implements(manager: pluggy.PluginManager, plugin: Any, hook: str) -> bool:
    return any(impl.plugin is plugin for impl in getattr(manager.hook, hook).get_hookimpls())


def _unknown_hooks(manager: pluggy.PluginManager, plugin: Any) -> list[str]:
    """Hook implementations of `plugin` that match no hook of replacer's (pluggy would ignore them)."""
    problems = []
    for caller in manager.get_hookcallers(plugin) or []:
        if caller.has_spec():
            continue
        close = difflib.get_close_matches(caller.name, HOOKS, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"replacer's hooks: {', '.join(HOOKS)}"
        problems.append(f"implements unknown hook '{caller.name}', which is never called ({hint})")
    return problems


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
