"""Loads plugins into a fresh :class:`~toolkit.registry.Registry`, one hook per kind of extension.

Built-ins (the modules of ``toolkit.plugins``, the repository's ``plugins/`` folder), installed
packages (entry-point group ``playattention``) and files or modules named by a recipe are all
registered the same way: each of their hook implementations (:data:`toolkit.families.HOOKS`) is
called with a ``register`` callback for that hook's families.

:func:`load_registry` gives every set of plugins its own registry, filled once and not changed
after: a recipe's plugin file never leaks into another recipe's registry, and nothing process-wide
has to be reset. A plugin file is imported once per process however many registries use it.

A plugin file runs only with consent (:func:`trust`, :func:`refusal`): a file of the current project,
one named by ``--plugin``, or any with ``--trust-plugins``; a run folder or recipe from elsewhere
names code its author wrote, as a Hugging Face repository's ``trust_remote_code`` does.

A plugin may register a name that a built-in or another plugin has: each lives in its own
namespace (:mod:`toolkit.registry`), and a recipe chooses it as ``namespace:name``.

A plugin that fails to import or to register is recorded as a :class:`PluginFailure` and skipped;
the others still load. ``PLAYATTENTION_TRACE=1`` (or ``playattention --trace``) shows who
registered what.
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.metadata as md
import importlib.util
import io
import os
import pkgutil
import re
import sys
import tokenize
from pathlib import Path
from types import ModuleType

import attrs
import pluggy

from . import families, hookspecs
from . import plugins as builtin_plugins
from .errors import PluginLoadError, one_line
from .registry import BUILTIN_NAMESPACE, Registry, Source, make_component

ENTRY_POINT_GROUP = "playattention"
#: the built-in plugin modules: every module of the toolkit.plugins package, registered like any other
#: (its subpackage ``impl`` holds the code they register by name, imported when a part is built)
BUILTIN_MODULES = tuple(f"{builtin_plugins.__name__}.{m.name}"
                        for m in sorted(pkgutil.iter_modules(builtin_plugins.__path__), key=lambda m: m.name)
                        if not m.ispkg)


@attrs.frozen
class PluginFailure:
    plugin: str  # entry point name, module name or file path
    package: str | None
    version: str | None
    reason: str  # one line

    def __str__(self) -> str:
        pkg = f" from {self.package} {self.version}" if self.package else ""
        return f"plugin {self.plugin!r}{pkg} failed: {self.reason}"


#: what a plugin may raise while it loads and still be only its own failure: sys.exit(), a
#: KeyboardInterrupt, GeneratorExit or its own BaseException subclass raised by its code must not
#: end the command (or exit 0, saying nothing)
PLUGIN_ERRORS = (BaseException,)


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, SystemExit):
        return f"SystemExit: called sys.exit({exc.code!r}) while loading"
    if isinstance(exc, KeyboardInterrupt):
        return "KeyboardInterrupt: raised while loading"
    if not isinstance(exc, Exception) and not str(exc).strip():
        return f"{type(exc).__name__}: raised while loading"
    text = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if isinstance(exc, pluggy.PluginValidationError):
        # pluggy's first line only names the hook; the reason (e.g. a misspelt argument) is on the last
        return f"{type(exc).__name__}: {'; '.join(text[-2:])}"
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def trace_enabled() -> bool:
    return os.environ.get("PLAYATTENTION_TRACE", "") not in ("", "0")


def _own_version() -> str | None:
    try:
        return md.version("playattention")
    except md.PackageNotFoundError:
        return None


def is_path_spec(spec: str) -> bool:
    """Whether a plugin spec names a file (``my_attention.py``, ``dir/plugin``) rather than a module."""
    return spec.endswith(".py") or "/" in spec or os.sep in spec


# -- consent to run plugin files -----------------------------------------------------------------
#: the plugin files the user consented to run wherever they lie: all (``--trust-plugins``) or these
#: resolved paths (``--plugin FILE``, typed by the user)
_consent: dict = {"all": False, "files": frozenset()}
#: files that mark a folder as a run folder (the toolkit writes both into every run, and never a plugin)
RUN_FOLDER_MARKS = ("recipe.toml", "versions.json")


def trust(*, everything: bool = False, files=()) -> None:
    """Consent to run plugin files outside the current project: all of them, or ``files``."""
    _consent["all"] = everything
    _consent["files"] = frozenset(Path(f).resolve() for f in files if is_path_spec(f))


def refusal(path: Path) -> str | None:
    """Why the plugin file ``path`` does not run without ``--trust-plugins``, or None when it may run.

    It may when it lies under the current project: its real path (symlinks resolved, so a link
    cannot lead out) is inside the working directory's real path, and no folder on the way
    (the working directory included) is a run folder, whose files came with the run, not from you.
    """
    real = path.resolve()
    if _consent["all"] or real in _consent["files"]:
        return None
    project = Path.cwd().resolve()
    if not real.is_relative_to(project):
        return f"it lies outside the current project ({project})"
    for folder in real.parents:
        if all((folder / mark).is_file() for mark in RUN_FOLDER_MARKS):
            return f"it lies inside the run folder {folder}"
        if folder == project:
            break
    return None


def _source_problem(path: Path) -> str | None:
    """Why a plugin file's text is refused, or None: it must be UTF-8 and declare no other encoding,
    so that what Python runs is what an editor, a diff or a review showed (a latin-1 file, or a
    ``coding:`` line, makes Python read other characters from the same bytes)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        return f"cannot read it: {exc.strerror or exc}"
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8"
    try:
        encoding, _ = tokenize.detect_encoding(io.BytesIO(raw).readline)
    except SyntaxError as exc:
        return f"SyntaxError: {exc.msg}"
    if encoding not in ("utf-8", "utf-8-sig"):
        return f"declares the source encoding {encoding!r}; a plugin file is UTF-8 (remove its coding line)"
    return None


_file_modules: dict[Path, ModuleType] = {}  # plugin files imported so far, by resolved path


def import_file(path: Path) -> ModuleType:
    """Import a plugin file once per process (its classes stay the same objects for every registry)."""
    if path in _file_modules:
        return _file_modules[path]
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:8]
    mod_name = f"playattention_plugin_{path.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = mod  # attrs and pickling want the module importable by name
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        sys.modules.pop(mod_name, None)
        raise
    _file_modules[path] = mod
    return mod


def entry_points(group: str = ENTRY_POINT_GROUP) -> tuple[list, list[PluginFailure]]:
    """The installed entry points of ``group``, and a failure for each package whose
    ``entry_points.txt`` names the group but cannot be read (importlib.metadata would skip it
    silently, or fail for every package at once)."""
    eps, failures, seen = [], [], set()
    for dist in md.distributions():
        name = _name(dist)
        key = (name or "").lower().replace("-", "_")
        if key in seen:  # the first on sys.path wins, as importlib.metadata's own lookup
            continue
        seen.add(key)
        try:
            text = dist.read_text("entry_points.txt")
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raw = _raw_entry_points(dist)
            if raw is not None and group.encode() in raw:
                failures.append(PluginFailure(_entry_points_file(dist), name, dist.version,
                                              f"cannot read entry_points.txt ({type(exc).__name__}: {exc})"))
            continue
        if not text or group not in text:
            continue
        problem = _entry_points_problem(text, group)
        if problem is None:
            try:
                found = [ep for ep in dist.entry_points if ep.group == group]
            except Exception as exc:  # noqa: BLE001 - importlib.metadata's parser failing on this file
                problem = f"{type(exc).__name__}: {exc}"
            else:
                eps += found
                continue
        failures.append(PluginFailure(_entry_points_file(dist), name, dist.version,
                                      f"malformed entry_points.txt: {one_line(problem)}"))
    return eps, failures


def _name(dist) -> str | None:
    """A distribution's ``Name`` from the head of its METADATA. ``dist.metadata`` parses the whole file
    with the email parser: for every installed package, that was 0.13 s of CPU in each command."""
    try:
        text = dist.read_text("METADATA") or dist.read_text("PKG-INFO") or ""
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    found = re.search(r"^Name:[ \t]*(\S.*?)\s*$", text.split("\n\n", 1)[0], re.MULTILINE | re.IGNORECASE)
    return found.group(1) if found else None


_EP_LINE = re.compile(r"^\s*[^=\s\[][^=]*=\s*[\w.]+\s*(:\s*[\w.]+\s*)?(\[.*\])?\s*$")


def _entry_points_problem(text: str, group: str) -> str | None:
    """What is wrong with the ``[group]`` section of an entry_points.txt, or None."""
    section = None
    for n, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", ";")):
            continue
        if stripped.startswith("["):
            if not stripped.endswith("]"):
                if group in stripped:
                    return f"line {n}: a section header without its closing ']': {stripped!r}"
                section = None
                continue
            section = stripped[1:-1].strip()
            continue
        if section == group and not _EP_LINE.match(line):
            return f"line {n}: expected NAME = MODULE:OBJECT, got {stripped!r}"
    return None


def _entry_points_file(dist) -> str:
    base = getattr(dist, "_path", None)
    return str(Path(base) / "entry_points.txt") if base is not None else "entry_points.txt"


def _raw_entry_points(dist) -> bytes | None:
    base = getattr(dist, "_path", None)
    try:
        return (Path(base) / "entry_points.txt").read_bytes() if base is not None else None
    except OSError:
        return None


class PluginManager:
    """A pluggy manager plus the registry it fills."""

    def __init__(self, *, builtins: bool = True, entry_points: bool = True, trace: bool | None = None):
        self.pm = pluggy.PluginManager("playattention")
        self.pm.add_hookspecs(hookspecs)
        self.registry = Registry()
        self.failures = self.registry.failures
        self.trace = trace_enabled() if trace is None else trace
        if builtins:
            for mod in BUILTIN_MODULES:
                self.add_module(mod, source=Source(mod, "playattention", _own_version()))
        if entry_points:
            self.load_entry_points()

    # -- loading ---------------------------------------------------------------------------
    def load_entry_points(self, group: str = ENTRY_POINT_GROUP) -> None:
        eps, failures = entry_points(group)
        for failure in failures:
            self._fail(failure)
        for ep in eps:
            dist = getattr(ep, "dist", None)
            package = dist.metadata["Name"] if dist is not None else None
            version = dist.version if dist is not None else None
            try:
                obj = ep.load()
            except PLUGIN_ERRORS as exc:  # a broken plugin must not take the others down
                self._fail(PluginFailure(ep.name, package, version, _one_line(exc)))
                continue
            # keyed by package too: two packages may both call their entry point "attention"
            self._register_plugin(obj, f"entrypoint:{package}:{ep.name}", Source(ep.name, package, version))

    def add_module(self, name: str, *, source: Source | None = None, strict: bool = False) -> None:
        """Load a plugin module by import name."""
        try:
            mod = importlib.import_module(name)
        except PLUGIN_ERRORS as exc:
            self._fail(PluginFailure(name, None, None, _one_line(exc)), strict)
            return
        self._register_plugin(mod, f"module:{name}", source or Source(name), strict)

    def add_file(self, path: str | os.PathLike, *, strict: bool = True) -> None:
        """Load a plugin from a ``.py`` file (a recipe's ``plugins = [...]`` or ``--plugin``)."""
        try:
            path = Path(path).resolve()
        except (ValueError, OSError) as exc:  # ValueError: a null byte in the name
            self._fail(PluginFailure(one_line(str(path)), None, None, f"not a usable file name ({exc})"), strict)
            return
        key = f"file:{path}"
        if self.pm.has_plugin(key):
            return
        if not path.is_file():
            self._fail(PluginFailure(str(path), None, None, "no such file"), strict)
            return
        if why := refusal(path):
            self._fail(PluginFailure(str(path), None, None, f"not run: {why}; pass --trust-plugins to run it"), strict)
            return
        if why := _source_problem(path):
            self._fail(PluginFailure(str(path), None, None, why), strict)
            return
        try:
            mod = import_file(path)
        except PLUGIN_ERRORS as exc:
            self._fail(PluginFailure(str(path), None, None, _one_line(exc)), strict)
            return
        self._register_plugin(mod, key, Source(str(path)), strict)

    def add(self, spec: str, *, strict: bool = True) -> None:
        """Load a plugin named by a recipe: a path ending in ``.py`` or an importable module name."""
        if is_path_spec(spec):
            self.add_file(spec, strict=strict)
        else:
            self.add_module(spec, strict=strict)

    # -- registration ----------------------------------------------------------------------
    def _register_plugin(self, obj: object, key: str, source: Source, strict: bool = False) -> None:
        if self.pm.has_plugin(key) or (isinstance(obj, ModuleType) and self.pm.is_registered(obj)):
            return
        try:
            self.pm.register(obj, name=key)
        except PLUGIN_ERRORS as exc:  # e.g. a hook with the wrong signature
            self._fail(PluginFailure(source.plugin, source.package, source.version, _one_line(exc)), strict)
            return
        staged = []
        try:
            for hook in families.HOOKS:
                impls = [i for i in getattr(self.pm.hook, hook).get_hookimpls() if i.plugin_name == key]
                for impl in impls:
                    impl.function(register=self._register_callback(hook, source, staged))
            for comp in staged:
                self.registry.add(comp)
        except PLUGIN_ERRORS as exc:  # atomic: a plugin registers all its components or none
            for comp in staged:
                self.registry.remove(comp)
            self.pm.unregister(name=key)
            self._fail(PluginFailure(source.plugin, source.package, source.version, _one_line(exc)), strict)
            return
        if self.trace:  # only once the whole plugin is in: a rolled-back one registered nothing
            for comp in staged:
                print(f"[playattention] {source} registered {comp.family} {comp.name!r}", file=sys.stderr)
        for comp in staged:  # beside a built-in of its name: say how to choose it, since a bare name will not
            if source.namespace != BUILTIN_NAMESPACE and (comp.family, f"{BUILTIN_NAMESPACE}:{comp.name}") in self.registry:
                print(f"[playattention] note: {source} registers {comp.family} {comp.name!r} as a built-in does; "
                      f"a recipe chooses it as '{comp.qualified}' (a bare '{comp.name}' means the built-in)",
                      file=sys.stderr)

    @staticmethod
    def _register_callback(hook: str, source: Source, staged: list):
        """The ``register`` a hook implementation is called with: ``(family, name, ...)`` for a hook
        of several families (register_components), ``(name, ...)`` for a hook of one."""
        fams = families.of_hook(hook)
        allowed = [f.name for f in fams]
        if len(fams) == 1:
            def register(name, factory, options=None, doc=None):
                """Register one part (name, factory, options class, one-line doc)."""
                staged.append(make_component(fams[0].name, name, factory, options, doc, source))
        else:
            def register(family, name, factory, options=None, doc=None):
                """Register one part (family, name, factory, options class, one-line doc)."""
                if family not in allowed:
                    families.family(family)  # an unknown family: did-you-mean
                    raise ValueError(f"{hook} registers {', '.join(allowed)}, not {family!r} "
                                     f"(use {families.family(family).hook})")
                staged.append(make_component(family, name, factory, options, doc, source))
        return register

    def _fail(self, failure: PluginFailure, strict: bool = False) -> None:
        if strict:
            raise PluginLoadError(str(failure), failure.reason)
        self.failures.append(failure)
        if self.trace:
            print(f"[playattention] {failure}", file=sys.stderr)


@functools.lru_cache(maxsize=64)
def _load(plugins: tuple[str, ...], trace: bool, consent: tuple) -> Registry:  # noqa: ARG001 - consent keys the cache
    pm = PluginManager(trace=trace)
    for spec in plugins:
        pm.add(spec)
    return pm.registry


def load_registry(plugins: list[str] | tuple[str, ...] = ()) -> Registry:
    """The registry of built-ins, installed entry points and the given plugin files or modules.

    The same plugins give the same (cached, unchanging) registry; PluginLoadError names a plugin
    that cannot be loaded.
    """
    try:
        specs = tuple(str(Path(p).resolve()) if is_path_spec(p) else p for p in plugins)
    except ValueError as exc:  # a null byte in a file name
        raise PluginLoadError(f"plugin {one_line(next(p for p in plugins if chr(0) in p))!r} failed: {exc}", str(exc)) from None
    # what may run depends on the consent and the working directory: a registry made under other ones is not reused
    return _load(specs, trace_enabled(), (_consent["all"], _consent["files"], os.getcwd()))


def default_registry() -> Registry:
    """Built-ins and installed entry points only."""
    return load_registry(())


def forget_loaded() -> None:
    """Forget cached registries (after installing or uninstalling a plugin package in this process)."""
    _load.cache_clear()


get_registry = load_registry  # the name the README and older code use
