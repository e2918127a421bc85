"""The registry: every family's parts (:mod:`toolkit.families`), each a named factory with typed options.

Each component is a *factory* (usually a class) plus a frozen attrs *options* class. A recipe's
table for it (``[model.attention] kind = "gqa"  n_kv_head = 2``) is structured into that options
class once, by the recipe converter, and the factory is called with that instance as
:mod:`toolkit.contracts` describes. A registry is filled by a plugin manager
(:func:`toolkit.plugin_manager.load_registry`) and not changed after: each recipe gets the
registry of its own plugins.

**Namespaces.** Every component also has a qualified name ``namespace:name``, its namespace being
who registered it: ``playattention`` for the built-ins, a plugin file's stem (``my_diff.py`` ->
``my_diff``), an installed package's name (``playattention_talking_heads``) or a module's top-level
package. So a plugin may register a name a built-in has (``diff``): a recipe selects it as
``my_diff:diff``, while a bare ``diff`` keeps meaning the built-in, or the only one of that name.
"""
from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import inspect
import io
import sys
import textwrap
import tokenize
from pathlib import Path
from typing import Callable

import attrs

from . import families
from .errors import AmbiguousComponentError, RegistryError, UnknownComponentError
from .families import Spec
from .safeio import sha256_of


@attrs.frozen
class NoOptions:
    """Options class for components that take none."""


@attrs.frozen
class Source:
    """Who registered a component: a plugin name and the distribution (package, version) it came from."""

    plugin: str
    package: str | None = None
    version: str | None = None

    @property
    def namespace(self) -> str:
        """What a recipe writes before the colon to choose this source's components (``my_diff:diff``)."""
        path = Path(self.plugin)
        if path.suffix == ".py":
            return path.stem
        return (self.package or self.plugin).split(".")[0].strip("<>").replace("-", "_").lower()

    def __str__(self) -> str:
        if self.package:
            return f"{self.package} {self.version or '?'} ({self.plugin})"
        return self.plugin


def _short_sha256(path: Path) -> str:
    """The first 12 hex digits of a code file's sha256: what a fingerprint records of it."""
    return sha256_of(path)[:12]


def code_of(source: Source, modules: bool = True) -> str:
    """The code a source stands for: a plugin file's content hash, a package's version and, with
    ``modules``, the content hash of the module that registered (an edited checkout keeps its version)."""
    path = Path(source.plugin)
    if path.suffix == ".py" and path.is_file():  # a plugin file has no version: its content stands in
        return f"{path} (sha256 {_short_sha256(path)})"
    if not source.package:
        return source.plugin
    said = f"{source.package} {source.version or '?'}"
    module = sys.modules.get(source.plugin)
    file = Path(getattr(module, "__file__", None) or "")
    if modules and file.suffix == ".py" and file.is_file():
        said += f" ({source.plugin} sha256 {_short_sha256(file)})"
    return said


@attrs.frozen
class Component:
    """A registered part. ``target`` is its factory, or ``"module:attr"`` naming it: a *lazy*
    registration, imported on the first :attr:`factory` (listing parts and reading recipes need only
    the options, so the built-ins register this way and those commands never import torch)."""

    family: str
    name: str
    target: Callable | str
    options: type
    doc: str
    source: Source
    _resolved: list = attrs.field(factory=list, eq=False, repr=False)  # the imported factory, once

    @property
    def lazy(self) -> bool:
        return isinstance(self.target, str)

    @property
    def factory(self) -> Callable:
        """The factory: a lazy one is imported here, once, and checked against its registration."""
        if not self.lazy:
            return self.target
        if not self._resolved:
            self._resolved.append(resolve(self))
        return self._resolved[0]

    @property
    def check_recipe(self) -> Callable | None:
        """The part's ``check_recipe(options, recipe)``, or None: on its options class, or on a factory
        registered itself (a lazy one's factory is not imported to check a recipe)."""
        return getattr(self.options, "check_recipe", None) or (
            None if self.lazy else getattr(self.target, "check_recipe", None))

    @property
    def qualified(self) -> str:
        """``namespace:name``, which selects this component even where another has its name."""
        return f"{self.source.namespace}:{self.name}"

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

    def option_docs(self) -> dict[str, str]:
        """Each option's description (:func:`field_docs`), for listings."""
        return field_docs(self.options)


def field_docs(options: type) -> dict[str, str]:
    """Each field's description, by the house convention (CONTRIBUTING.md): the comment lines right above
    the field in its class's source, or else the comment at the end of its line. A field inherited from
    a base class is described in the base's source. Fields without such a comment are left out."""
    docs: dict[str, str] = {}
    for klass in reversed(options.__mro__):
        if attrs.has(klass):
            docs.update(_class_comments(klass))
    return {f.name: docs[f.name] for f in attrs.fields(options) if docs.get(f.name)}


@functools.lru_cache(maxsize=None)
def _class_comments(klass: type) -> dict[str, str]:
    try:
        src = textwrap.dedent(inspect.getsource(klass))
        tree = ast.parse(src)
        comments = {t.start[0]: t.string.lstrip("#").strip()
                    for t in tokenize.generate_tokens(io.StringIO(src).readline) if t.type == tokenize.COMMENT}
    except (OSError, TypeError, SyntaxError, tokenize.TokenError):  # no source (made at run time, a zip)
        return {}
    lines = src.splitlines()
    cls = next((n for n in tree.body if isinstance(n, ast.ClassDef)), None)
    out = {}
    for node in cls.body if cls else []:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            above, n = [], node.lineno - 1
            while n in comments and lines[n - 1].lstrip().startswith("#"):  # whole-line comments only
                above.insert(0, comments[n])
                n -= 1
            text = " ".join(above) or comments.get(node.end_lineno, "")
            if text:
                out[node.target.id] = text
    return out


#: the namespace of the built-in components: a bare name means the built-in where a plugin has it too
BUILTIN_NAMESPACE = "playattention"


class Registry:
    """Maps (family, name) to a :class:`Component`; a name is bare (``diff``) or qualified (``my_diff:diff``)."""

    def __init__(self) -> None:
        # family -> bare name -> the components of that name, one per namespace, in registration order
        self._components: dict[str, dict[str, list[Component]]] = {f: {} for f in families.NAMES}
        self.failures: list = []  # PluginFailure records, filled by the plugin manager

    def add(self, component: Component) -> None:
        families.family(component.family)
        same = self._components[component.family].setdefault(component.name, [])
        existing = next((c for c in same if c.source.namespace == component.source.namespace), None)
        if existing is not None:
            raise RegistryError(
                f"{component.family} {component.name!r} registered twice in namespace {component.source.namespace!r}: "
                f"by {existing.source} and by {component.source}; rename one of them (a plugin file's namespace is "
                f"its file name, so renaming the file also lets both load)"
            )
        same.append(component)

    def remove(self, component: Component) -> None:
        """Take back a component (a plugin whose registration failed half way registers nothing)."""
        same = self._components[component.family].get(component.name, [])
        if any(c is component for c in same):
            same[:] = [c for c in same if c is not component]
            if not same:
                del self._components[component.family][component.name]

    def register(self, family, name, factory, options=None, doc=None, *, source=Source("<python>")) -> Component:
        """Register directly (tests, notebooks). Plugins use their hook's ``register`` callback instead."""
        comp = make_component(family, name, factory, options, doc, source)
        self.add(comp)
        return comp

    def get(self, family: str, name: str) -> Component:
        """The component ``name`` selects: ``namespace:name`` exactly; a bare name the only component
        of that name, or the built-in where plugins have it too (AmbiguousComponentError otherwise)."""
        families.family(family)
        namespace, _, bare = name.rpartition(":") if isinstance(name, str) else ("", "", name)
        try:
            same = self._components[family][bare]
        except (KeyError, TypeError):
            raise UnknownComponentError(family, name, self.names(family)) from None
        if namespace:
            found = next((c for c in same if c.source.namespace == namespace), None)
            if found is None:
                raise UnknownComponentError(family, name, self.names(family))
            return found
        if len(same) == 1:
            return same[0]
        builtin = next((c for c in same if c.source.namespace == BUILTIN_NAMESPACE), None)
        if builtin is None:
            raise AmbiguousComponentError(family, bare, [c.qualified for c in same])
        return builtin

    def name_of(self, component: Component) -> str:
        """The shortest name that selects ``component``: bare where it means this one, else qualified."""
        try:
            if self.get(component.family, component.name) is component:
                return component.name
        except AmbiguousComponentError:
            pass
        return component.qualified

    def names(self, family: str) -> list[str]:
        """Every component of ``family`` once, by the shortest name that selects it (:meth:`name_of`)."""
        families.family(family)
        return sorted(self.name_of(c) for same in self._components[family].values() for c in same)

    def options(self, spec: Spec):
        """The typed options of ``spec``: its instance, or the component's defaults when it has none."""
        comp = self.get(spec.family, spec.kind)
        if spec.options is None:
            return comp.options()
        if isinstance(spec.options, comp.options):
            return spec.options
        raise TypeError(f"{spec.family} {spec.kind!r}: options must be {comp.options.__qualname__}, got "
                        f"{type(spec.options).__qualname__} (structure recipe tables with toolkit.converter first)")

    def build(self, spec: Spec, *args):
        """``factory(options, *args)`` for the component ``spec`` chooses."""
        return self.get(spec.family, spec.kind).factory(self.options(spec), *args)

    def build_in(self, family: str, choice: Spec | str, *args):
        """Build a Spec, or a kind with its default options: what ``Dims.build`` does, so a component
        can build another (attention builds its qk-norm) from the model's own registry."""
        return self.build(families.SPEC_TYPES[family](choice) if isinstance(choice, str) else choice, *args)

    def __iter__(self):
        for family in families.NAMES:
            for name in sorted(self._components[family]):
                yield from self._components[family][name]

    def code(self) -> dict[str, str]:
        """Every source that registered here and the code it stands for (:func:`code_of`), and every
        module a lazy registration names (its code is the part's code, though the source did not import it)."""
        code = {str(c.source.plugin): code_of(c.source) for c in sorted(self, key=lambda c: c.source.plugin)}
        for module in sorted({c.target.partition(":")[0] for c in self if c.lazy}):
            code[module] = module_code(module)
        return code

    def __contains__(self, key: tuple[str, str]) -> bool:
        family, name = key
        try:
            self.get(family, name)
        except RegistryError:
            return False
        return True


def make_component(family, name, factory, options=None, doc=None, source=Source("<python>")) -> Component:
    """Validate one registration and turn it into a :class:`Component`."""
    families.family(family)
    if not isinstance(name, str) or not name.replace("-", "_").isidentifier():
        raise RegistryError(f"{family} name must be an identifier-like string, got {name!r}")
    if isinstance(factory, str):
        module, _, attr = factory.partition(":")
        if not (attr.isidentifier() and all(p.isidentifier() for p in module.split("."))):
            raise RegistryError(f"{family} {name!r}: a lazy factory is 'package.module:attribute', got {factory!r}")
        if options is None:  # it is not imported to read its Options
            raise RegistryError(f"{family} {name!r}: registering {factory!r} by name needs its options class "
                                f"(register(name, {factory!r}, OptionsClass, doc); NoOptions for none)")
    elif not callable(factory):
        raise RegistryError(f"{family} {name!r}: factory must be callable, got {type(factory).__name__}")
    if options is None:
        options = getattr(factory, "Options", NoOptions)
    if not (isinstance(options, type) and attrs.has(options)):
        raise RegistryError(f"{family} {name!r}: options must be an attrs class, got {options!r}")
    if not _is_frozen(options):
        raise RegistryError(f"{family} {name!r}: options class {options.__name__} must be frozen (@attrs.frozen)")
    if doc is None:
        doc = first_line(options.__doc__ if isinstance(factory, str) else factory.__doc__)
    return Component(family, name, factory, options, doc, source)


def first_line(doc: str | None) -> str:
    """A docstring's first line: a part's one-line description."""
    return doc.strip().splitlines()[0] if doc and doc.strip() else ""


def resolve(comp: Component) -> Callable:
    """Import a lazy registration's factory and check it is what was registered: callable, and its
    ``Options`` (where it has one) the options class registered with it."""
    module, _, attr = comp.target.partition(":")
    where = f"{comp.family} {comp.name!r} (registered by {comp.source} as {comp.target!r})"
    try:
        imported = importlib.import_module(module)
    except ImportError as exc:
        raise RegistryError(f"{where}: cannot import {module}: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - a plugin's code failing as it loads is the plugin's problem, said so
        raise RegistryError(f"{where}: importing {module} failed: {type(exc).__name__}: {exc}") from exc
    factory = getattr(imported, attr, None)
    if factory is None:
        raise RegistryError(f"{where}: {module} has no {attr!r}")
    if not callable(factory):
        raise RegistryError(f"{where}: not callable, got {type(factory).__name__}")
    if getattr(factory, "check_recipe", None) is not None and getattr(comp.options, "check_recipe", None) is None:
        raise RegistryError(f"{where}: its check_recipe must be on its options class, {comp.options.__qualname__}: "
                            f"a part registered by name is not imported to check a recipe")
    declared = getattr(factory, "Options", comp.options)
    if declared is not comp.options:
        raise RegistryError(f"{where}: its Options is {declared.__qualname__}, but it was registered "
                            f"with {comp.options.__qualname__}")
    return factory


def module_code(module: str) -> str:
    """A module's content hash, found without importing it (a lazy registration's target)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    origin = Path(spec.origin) if spec is not None and spec.origin else None
    if origin is None or not origin.is_file():
        return f"{module} (not found)"
    return f"{module} (sha256 {_short_sha256(origin)})"


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
