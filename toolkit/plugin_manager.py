"""Loads plugins into a :class:`~toolkit.registry.Registry` through one pluggy hook.

Built-in components (the modules in ``plugins/``), installed packages (entry-point group
``playattention``) and files or modules named by a recipe are all registered the same way: their
``register_components(register)`` hook implementation is called with a ``register`` callback.

A plugin that fails to import or to register is recorded as a :class:`PluginFailure` and skipped;
the others still load. Set ``PLAYATTENTION_TRACE=1`` (or ``playattention --trace``) to see who
registered what.
"""
from __future__ import annotations

import importlib
import importlib.metadata as md
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import attrs
import pluggy

from . import hookspecs
from .registry import Registry, RegistryError, Source, make_component

ENTRY_POINT_GROUP = "playattention"
BUILTIN_MODULES = ("plugins.attention", "plugins.norm", "plugins.position", "plugins.mlp")


@attrs.frozen
class PluginFailure:
    plugin: str  # entry point name, module name or file path
    package: str | None
    version: str | None
    reason: str  # one line

    def __str__(self) -> str:
        pkg = f" from {self.package} {self.version}" if self.package else ""
        return f"plugin {self.plugin!r}{pkg} failed: {self.reason}"


class PluginLoadError(RuntimeError):
    """A plugin the user asked for by name (recipe or --plugin) could not be loaded."""


def _one_line(exc: BaseException) -> str:
    text = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if isinstance(exc, pluggy.PluginValidationError):
        # pluggy's first line only names the hook; the reason (e.g. a misspelt argument) is on the last
        return f"{type(exc).__name__}: {'; '.join(text[-2:])}"
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _trace_enabled() -> bool:
    return os.environ.get("PLAYATTENTION_TRACE", "") not in ("", "0")


def _own_version() -> str | None:
    try:
        return md.version("playattention")
    except md.PackageNotFoundError:
        return None


class PluginManager:
    """A pluggy manager plus the registry it fills."""

    def __init__(self, *, builtins: bool = True, entry_points: bool = True, trace: bool | None = None):
        self.pm = pluggy.PluginManager("playattention")
        self.pm.add_hookspecs(hookspecs)
        self.registry = Registry()
        self.failures: list[PluginFailure] = self.registry.failures
        self.trace = _trace_enabled() if trace is None else trace
        self._sources: dict[str, Source] = {}
        if builtins:
            for mod in BUILTIN_MODULES:
                self.add_module(mod, source=Source(mod, "playattention", _own_version()))
        if entry_points:
            self.load_entry_points()

    # -- loading ---------------------------------------------------------------------------
    def load_entry_points(self, group: str = ENTRY_POINT_GROUP) -> None:
        for ep in md.entry_points(group=group):
            dist = getattr(ep, "dist", None)
            package = dist.metadata["Name"] if dist is not None else None
            version = dist.version if dist is not None else None
            try:
                obj = ep.load()
            except Exception as exc:  # noqa: BLE001 - a broken plugin must not take the others down
                self._fail(PluginFailure(ep.name, package, version, _one_line(exc)))
                continue
            # keyed by package too: two packages may both call their entry point "attention"
            self._register_plugin(obj, f"entrypoint:{package}:{ep.name}", Source(ep.name, package, version))

    def add_module(self, name: str, *, source: Source | None = None, strict: bool = False) -> None:
        """Load a plugin module by import name."""
        try:
            mod = importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001
            self._fail(PluginFailure(name, None, None, _one_line(exc)), strict)
            return
        self._register_plugin(mod, f"module:{name}", source or Source(name), strict)

    def add_file(self, path: str | os.PathLike, *, strict: bool = True) -> None:
        """Load a plugin from a ``.py`` file (a recipe's ``plugins = [...]`` or ``--plugin``)."""
        path = Path(path).resolve()
        key = f"file:{path}"
        if self.pm.has_plugin(key):
            return
        if not path.is_file():
            self._fail(PluginFailure(str(path), None, None, "no such file"), strict)
            return
        mod_name = f"playattention_plugin_{path.stem}_{abs(hash(str(path))) & 0xFFFF:x}"
        try:
            spec = importlib.util.spec_from_file_location(mod_name, path)
            mod = importlib.util.module_from_spec(spec)
            sys.modules[mod_name] = mod  # attrs and pickling want the module importable by name
            spec.loader.exec_module(mod)
        except Exception as exc:  # noqa: BLE001
            sys.modules.pop(mod_name, None)
            self._fail(PluginFailure(str(path), None, None, _one_line(exc)), strict)
            return
        self._register_plugin(mod, key, Source(str(path)), strict)

    def add(self, spec: str, *, strict: bool = True) -> None:
        """Load a plugin named by a recipe: a path ending in ``.py`` or an importable module name."""
        if spec.endswith(".py") or os.sep in spec or "/" in spec:
            self.add_file(spec, strict=strict)
        else:
            self.add_module(spec, strict=strict)

    # -- registration ----------------------------------------------------------------------
    def _register_plugin(self, obj: object, key: str, source: Source, strict: bool = False) -> None:
        if self.pm.has_plugin(key) or (isinstance(obj, ModuleType) and self.pm.is_registered(obj)):
            return
        try:
            self.pm.register(obj, name=key)
        except Exception as exc:  # noqa: BLE001 - e.g. a hook with the wrong signature
            self._fail(PluginFailure(source.plugin, source.package, source.version, _one_line(exc)), strict)
            return
        impls = [i for i in self.pm.hook.register_components.get_hookimpls() if i.plugin_name == key]
        staged = []

        def register(family, name, factory, options=None, doc=None):
            """Register one component (family, name, factory, options class, one-line doc)."""
            staged.append(make_component(family, name, factory, options, doc, source))

        try:
            for impl in impls:
                impl.function(register=register)
            for comp in staged:
                self.registry.add(comp)
        except Exception as exc:  # noqa: BLE001 - atomic: a plugin registers all its components or none
            for comp in staged:
                if (comp.family, comp.name) in self.registry and self.registry.get(comp.family, comp.name) is comp:
                    self.registry._components[comp.family].pop(comp.name)
            self.pm.unregister(name=key)
            self._fail(PluginFailure(source.plugin, source.package, source.version, _one_line(exc)), strict)
            return
        if self.trace:  # only once the whole plugin is in: a rolled-back one registered nothing
            for comp in staged:
                print(f"[playattention] {source} registered {comp.family} {comp.name!r}", file=sys.stderr)

    def _fail(self, failure: PluginFailure, strict: bool = False) -> None:
        if strict:
            raise PluginLoadError(str(failure))
        self.failures.append(failure)
        if self.trace:
            print(f"[playattention] {failure}", file=sys.stderr)


_default: PluginManager | None = None


def get_plugin_manager() -> PluginManager:
    """The process-wide manager: built-ins plus installed entry points, loaded once."""
    global _default
    if _default is None:
        _default = PluginManager()
    return _default


def get_registry(plugins: list[str] | tuple[str, ...] = ()) -> Registry:
    """The registry with built-ins, entry points and the given extra plugin files or modules."""
    pm = get_plugin_manager()
    for spec in plugins:
        pm.add(spec)
    return pm.registry


def reset() -> None:
    """Forget the process-wide manager (tests)."""
    global _default
    _default = None


__all__ = [
    "PluginFailure",
    "PluginLoadError",
    "PluginManager",
    "RegistryError",
    "get_plugin_manager",
    "get_registry",
    "reset",
]
