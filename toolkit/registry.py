"""The component registry: four families of named, swappable model parts.

Each component is a *factory* (usually an ``nn.Module`` subclass) plus a frozen attrs *options*
class. The recipe table for a component (``[model.attention] kind = "gqa"  n_kv_head = 2``) is
structured into that options class, so every option is typed and validated, and the factory is
called as described in :mod:`toolkit.contracts`.
"""
from __future__ import annotations

import difflib
from typing import Callable

import attrs

FAMILIES = ("attention", "norm", "position", "mlp")


@attrs.frozen
class NoOptions:
    """Options class for components that take none."""


@attrs.frozen
class Source:
    """Who registered a component: a plugin name and the distribution (package, version) it came from."""

    plugin: str
    package: str | None = None
    version: str | None = None

    def __str__(self) -> str:
        if self.package:
            return f"{self.package} {self.version or '?'} ({self.plugin})"
        return self.plugin


@attrs.frozen
class Component:
    family: str
    name: str
    factory: Callable
    options: type
    doc: str
    source: Source

    def option_fields(self) -> list[tuple[str, str, object]]:
        """(name, type, default) for each option, for listings and docs."""
        out = []
        for f in attrs.fields(self.options):
            typ = getattr(f.type, "__name__", None) or str(f.type)
            default = f.default
            if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
                default = default.factory()
            out.append((f.name, str(typ).replace("typing.", ""), default))
        return out


def did_you_mean(word: str, candidates) -> str | None:
    """The candidate a typo most likely meant: same letters swapped first ('mah' -> 'mha'), then difflib's closest."""
    candidates = [c for c in candidates if isinstance(c, str)]
    lowered = {c.lower(): c for c in candidates}
    if word.lower() in lowered:
        return lowered[word.lower()]
    swapped = [c for c in candidates if sorted(c.lower()) == sorted(word.lower())]
    if swapped:
        return swapped[0]
    hint = difflib.get_close_matches(word, candidates, n=1)
    return hint[0] if hint else None


class RegistryError(ValueError):
    """A component could not be registered or found."""


class UnknownComponentError(RegistryError, KeyError):
    def __init__(self, family: str, name: str, known: list[str]):
        self.family, self.name, self.known = family, name, known
        hint = did_you_mean(name, known)
        msg = f"unknown {family} {name!r}"
        if hint:
            msg += f"; did you mean {hint!r}?"
        msg += f" (registered: {', '.join(sorted(known)) or 'none'})"
        super().__init__(msg)

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.args[0]


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        hint = did_you_mean(family, FAMILIES)
        extra = f"; did you mean {hint!r}?" if hint else ""
        raise RegistryError(f"unknown component family {family!r}{extra} (families: {', '.join(FAMILIES)})")


class Registry:
    """Maps (family, name) to a :class:`Component`."""

    def __init__(self) -> None:
        self._components: dict[str, dict[str, Component]] = {f: {} for f in FAMILIES}
        self.failures: list = []  # PluginFailure records, filled by the plugin manager

    def add(self, component: Component) -> None:
        _check_family(component.family)
        existing = self._components[component.family].get(component.name)
        if existing is not None:
            raise RegistryError(
                f"{component.family} {component.name!r} registered twice: by {existing.source} and by {component.source}"
            )
        self._components[component.family][component.name] = component

    def register(self, family, name, factory, options=None, doc=None, *, source=Source("<python>")) -> Component:
        """Register directly (tests, notebooks). Plugins use the hook's ``register`` callback instead."""
        comp = make_component(family, name, factory, options, doc, source)
        self.add(comp)
        return comp

    def get(self, family: str, name: str) -> Component:
        _check_family(family)
        try:
            return self._components[family][name]
        except KeyError:
            raise UnknownComponentError(family, name, list(self._components[family])) from None

    def names(self, family: str) -> list[str]:
        _check_family(family)
        return sorted(self._components[family])

    def __iter__(self):
        for family in FAMILIES:
            yield from (self._components[family][n] for n in sorted(self._components[family]))

    def __contains__(self, key: tuple[str, str]) -> bool:
        family, name = key
        return name in self._components.get(family, {})


def make_component(family, name, factory, options=None, doc=None, source=Source("<python>")) -> Component:
    """Validate one registration and turn it into a :class:`Component`."""
    _check_family(family)
    if not isinstance(name, str) or not name.isidentifier() and not name.replace("-", "_").isidentifier():
        raise RegistryError(f"{family} name must be an identifier-like string, got {name!r}")
    if not callable(factory):
        raise RegistryError(f"{family} {name!r}: factory must be callable, got {type(factory).__name__}")
    if options is None:
        options = getattr(factory, "Options", NoOptions)
    if not (isinstance(options, type) and attrs.has(options)):
        raise RegistryError(f"{family} {name!r}: options must be an attrs class, got {options!r}")
    if not _is_frozen(options):
        raise RegistryError(f"{family} {name!r}: options class {options.__name__} must be frozen (@attrs.frozen)")
    if doc is None:
        doc = (factory.__doc__ or "").strip().splitlines()[0] if factory.__doc__ else ""
    return Component(family, name, factory, options, doc, source)


def _is_frozen(options: type) -> bool:
    fields = attrs.fields(options)
    if not fields:
        return True  # nothing to mutate
    # probe an instance made without __init__, so required fields and validators do not get in the way
    probe = object.__new__(options)
    try:
        setattr(probe, fields[0].name, None)
    except attrs.exceptions.FrozenInstanceError:
        return True
    except Exception:  # noqa: BLE001 - e.g. an on_setattr validator: it is mutable all the same
        return False
    return False
