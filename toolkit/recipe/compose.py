"""Reading recipe files: hardened reads, ``extends``, ``--set`` and where each value came from.

:func:`resolve_data` gives a recipe's plain data in this order:

1. read the file; ``extends = "base.toml"`` (relative to the file) reads the base first, recursively,
   and deep-merges the file onto it: tables merge, arrays and scalars replace. Two exceptions:
   a table whose ``kind`` changes is replaced whole (the old component's options are dropped), and
   ``plugins`` accumulate (a base's components stay loadable). ``name`` and ``description`` describe
   one file and are not inherited; ``name`` defaults to the file's stem.
2. apply ``--set key.path=value`` overrides (values in TOML syntax; a bare word is a string), merged
   the same way, so ``--set model.attention.kind=gqa`` drops the old kind's options.
"""
from __future__ import annotations

import os
import re
import stat
import sys
from pathlib import Path
from typing import Any

import attrs

from .. import families
from ..converter import _show
from ..errors import ConfigError, path_key
from ..plugin_manager import is_path_spec
from .tree import deep_merge

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


#: the largest recipe file read (a recipe is a few KiB; this refuses /dev/zero and generated junk early)
MAX_RECIPE_BYTES = 1 << 20
#: the deepest nesting of tables and arrays in a recipe or a --set value (a real recipe nests 5 deep)
MAX_DEPTH = 32
#: the longest chain of ``extends`` (a recipe, its base, the base's base, ...)
MAX_EXTENDS = 32
#: the most entries of a recipe's ``plugins`` array
MAX_PLUGINS = 64


def read_toml(path: str | Path) -> dict:
    """Parse a TOML file; invalid TOML is a ConfigError naming file, line and column.

    Only a regular file of at most MAX_RECIPE_BYTES nesting at most MAX_DEPTH levels is read: a
    FIFO would block forever, a device never end, and a deep nest overflow the parser's stack.
    """
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; fstat then refuses it
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except IsADirectoryError:
        raise ConfigError([f"{path}: is a folder, not a recipe file"]) from None
    except (OSError, ValueError) as exc:  # ValueError: a null byte in the path
        raise ConfigError([f"{path}: cannot read recipe file: {getattr(exc, 'strerror', None) or exc}"]) from None
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise ConfigError([f"{path}: is a folder, not a recipe file"])
        if not stat.S_ISREG(mode):
            raise ConfigError([f"{path}: not a regular file ({_file_kind(mode)}); a recipe is a TOML file"])
        try:
            raw = f.read(MAX_RECIPE_BYTES + 1)
        except OSError as exc:
            raise ConfigError([f"{path}: cannot read recipe file: {exc.strerror or exc}"]) from None
    if len(raw) > MAX_RECIPE_BYTES:
        raise ConfigError([f"{path}: larger than {MAX_RECIPE_BYTES // 1024} KiB, the limit for a recipe file"])
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except tomllib.TOMLDecodeError as exc:
        line, column, reason = _toml_position(exc)
        where = f"{path}:{line}:{column}" if line else f"{path}"
        raise ConfigError([f"{where}: invalid TOML: {reason[0].lower() + reason[1:]}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: invalid TOML: not UTF-8 text ({exc.reason} at byte {exc.start})"]) from None
    except RecursionError:  # the parser recurses once per level of an inline array or table
        raise ConfigError([f"{path}: {_too_deep()}"]) from None
    deep = too_deep(data)
    if deep:
        raise ConfigError([f"{path}: {deep}"])
    return data


def _toml_position(exc: tomllib.TOMLDecodeError) -> tuple[int | None, int | None, str]:
    """(line, column, reason) of a TOML error: its attributes from Python 3.14, before that only its message
    holds them (allowed by tests/test_no_message_regex.py)."""
    if getattr(exc, "lineno", None) is not None:
        return exc.lineno, exc.colno, exc.msg.strip() or "parse error"
    text = str(exc)
    m = re.search(r"\(at line (\d+), column (\d+)\)", text)
    reason = re.sub(r"\s*\(at line \d+, column \d+\)", "", text).strip() or "parse error"
    return (int(m[1]), int(m[2]), reason) if m else (None, None, reason)


def _file_kind(mode: int) -> str:
    kinds = [(stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISSOCK, "a socket")]
    return next((name for test, name in kinds if test(mode)), "not a plain file")


def _too_deep(where: str = "$") -> str:
    return f"{where}: nested more than {MAX_DEPTH} levels deep (tables and arrays), the limit for a recipe"


def too_deep(value: Any, root: str = "$") -> str | None:
    """A problem line if ``value`` nests tables and arrays more than MAX_DEPTH levels, else None (no recursion)."""
    stack = [(value, root, 0)]
    while stack:
        item, where, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth >= MAX_DEPTH:
                return _too_deep(where if len(where) <= 80 else where[:77] + "...")
            pairs = item.items() if isinstance(item, dict) else enumerate(item)
            for k, sub in pairs:
                stack.append((sub, f"{where}[{k}]" if isinstance(item, list) else f"{where}.{path_key(k)}", depth + 1))
    return None


def recipe_file(path: str | Path) -> Path:
    """The recipe file for ``path``: the file itself, or ``recipe.toml`` inside a run folder."""
    p = Path(path)
    if p.is_dir():
        if (p / "recipe.toml").is_file():
            return p / "recipe.toml"
        raise ConfigError([f"{path}: a folder without a recipe.toml (not a run folder)"])
    if not p.exists():
        raise ConfigError([f"{path}: no such recipe file"])
    return p


def _normalise_components(data: dict) -> None:
    """``attention = "gqa"`` is shorthand for ``[model.attention] kind = "gqa"``: merge tables, not strings."""
    for fam in families.FAMILIES:
        if fam.where is None or fam.many:
            continue
        table = data.get(fam.section) if fam.section else data
        if isinstance(table, dict) and isinstance(table.get(fam.key), str):
            table[fam.key] = {"kind": table[fam.key]}


def _leaves(data: dict, prefix: tuple = ()):
    for key, value in data.items():
        if isinstance(value, dict) and value:
            yield from _leaves(value, (*prefix, key))
        else:
            yield (*prefix, key)


def _display(path: Path) -> str:
    """A path as short as it can be: relative to the working directory when below it."""
    try:
        rel = os.path.relpath(path)
    except ValueError:  # another drive (Windows)
        return str(path)
    return str(Path(path).resolve()) if rel.startswith("..") else rel


@attrs.define
class _Sources:
    """Which file or --set gave each key (for ``(from base.toml)`` on error lines)."""

    by_key: dict[tuple, str] = attrs.Factory(dict)

    def record(self, data: dict, source: str | None) -> None:
        for key in _leaves(data):
            if source is None:
                self.by_key.pop(key, None)
            else:
                self.by_key[key] = source

    def lookup(self, keys: tuple) -> str | None:
        for n in range(len(keys), 0, -1):
            if keys[:n] in self.by_key:
                return self.by_key[keys[:n]]
        return None


@attrs.define
class _Reading:
    """State of one :func:`resolve_data`: the recipe as the user named it, sources, errors so far."""

    top: str  # the recipe path as given, the prefix of every error line
    top_file: Path  # resolved
    sources: _Sources
    errors: list[str] = attrs.Factory(list)

    def origin(self, path: Path) -> str | None:
        """None for the recipe itself, else how to name a base file on an error line."""
        return None if path.resolve() == self.top_file else _display(path)

    def line(self, path: Path, text: str) -> str:
        origin = self.origin(path)
        return f"{self.top}: {text}" + (f" (from {origin})" if origin else "")


def _read_layers(path: Path, ctx: _Reading, chain: list[Path]) -> dict:
    """The merged data of ``path`` and everything it extends (recoverable errors collected in ctx)."""
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(_display(p) for p in [*chain[chain.index(resolved):], resolved])
        raise ConfigError([f"{ctx.top}: extends cycle: {cycle}"])
    if len(chain) >= MAX_EXTENDS:
        raise ConfigError([f"{ctx.top}: extends chain longer than {MAX_EXTENDS} files, the limit "
                           f"(at {_display(path)})"])
    data = read_toml(path)
    _normalise_components(data)

    plugins = data.get("plugins", [])
    if problem := _plugins_problem(plugins):
        ctx.errors.append(ctx.line(path, problem))
        data.pop("plugins")
    elif plugins:  # relative to the file that names them, so a recipe works from any directory
        data["plugins"] = [str((path.parent / p).resolve()) if is_path_spec(p) else p for p in plugins]

    base_name = data.pop("extends", None)
    base: dict = {}
    if isinstance(base_name, str):
        base_path = path.parent / base_name
        if not base_path.is_file():
            raise ConfigError([ctx.line(path, f"$.extends: no such file \"{base_name}\" (looked for {_display(base_path)})")])
        base = _read_layers(base_path, ctx, [*chain, resolved])
        for key in ("name", "description"):  # they describe one file
            base.pop(key, None)
    elif base_name is not None:
        ctx.errors.append(ctx.line(path, f"$.extends: expected a file name (string), got {_show(base_name)}"))
    merged = deep_merge(base, data)
    merged_plugins = list(dict.fromkeys([*base.get("plugins", []), *data.get("plugins", [])]))
    if merged_plugins:
        merged["plugins"] = merged_plugins
    ctx.sources.record(data, ctx.origin(path))
    return merged


def _plugins_problem(plugins: Any) -> str | None:
    """What is wrong with a ``plugins`` value (``$.plugins...: problem``), or None."""
    if not isinstance(plugins, list) or not all(isinstance(p, str) for p in plugins):
        return f"$.plugins: expected an array of strings, got {_show(plugins)}"
    if len(plugins) > MAX_PLUGINS:
        return f"$.plugins: {len(plugins)} plugins, more than the limit of {MAX_PLUGINS}"
    for i, p in enumerate(plugins):
        if "\0" in p or not p.strip():
            return f"$.plugins[{i}]: not a plugin file or module name: {_show(p)}"
    return None


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=3e-4"`` -> (["train", "lr"], 0.0003). A value that is not TOML is a plain string."""
    key, sep, raw = text.partition("=")
    keys = [k.strip() for k in key.strip().split(".")]
    shown = _show(text)[1:-1]  # escaped: a newline in a value stays on one line
    if not sep or not all(keys):
        raise ConfigError([f"--set {shown}: expected KEY.PATH=VALUE, e.g. --set train.lr=3e-4"])
    if len(keys) > MAX_DEPTH:
        raise ConfigError([f"--set {shown[:60]}...: {len(keys)} keys deep, more than the limit of {MAX_DEPTH}"])
    try:
        value = tomllib.loads(f"value = {raw.strip()}")["value"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()  # --set model.attention.kind=gqa: a bare word means the string
    except RecursionError:
        raise ConfigError([f"--set {'.'.join(keys)}=...: {_too_deep('the value')}"]) from None
    deep = too_deep(value, "the value")
    if deep:
        raise ConfigError([f"--set {'.'.join(keys)}=...: {deep}"])
    return keys, value


def overrides_table(overrides: list[str] | tuple[str, ...], sources: _Sources | None = None) -> dict:
    """All ``--set`` overrides as one nested table (a later one wins over an earlier one)."""
    table: dict = {}
    for text in overrides:
        keys, value = parse_override(text)
        node = table
        for i, k in enumerate(keys[:-1]):
            if k in node and not isinstance(node[k], dict):
                raise ConfigError([f"--set {text}: {'.'.join(keys[: i + 1])} was set to a value by an earlier --set"])
            node = node.setdefault(k, {})
        node[keys[-1]] = value
        if sources is not None:
            leaf: dict = {keys[-1]: value}
            for k in reversed(keys[:-1]):
                leaf = {k: leaf}
            sources.record(leaf, f"--set {text}")
    _normalise_components(table)
    return table


def _top(path: str | Path) -> tuple[Path, str]:
    """The recipe file and how error lines name it (as the user typed it, or the run folder's recipe.toml)."""
    file = recipe_file(path)
    return file, (str(path) if file == Path(path) else _display(file))


def resolve_data(path: str | Path, overrides=(), plugins=(), *, _sources: _Sources | None = None) -> dict:
    """The recipe's plain data after ``extends`` and ``--set``, before structuring (plugin paths absolute)."""
    file, top = _top(path)
    ctx = _Reading(top, file.resolve(), _sources if _sources is not None else _Sources())
    data = _read_layers(file, ctx, [])
    if "name" not in data:  # a run folder's recipe.toml always has one (recipe show writes it)
        data["name"] = file.stem
    data = deep_merge(data, overrides_table(overrides, ctx.sources))
    named = data.get("plugins", [])
    if isinstance(named, list) and all(isinstance(p, str) for p in named):
        # file layers made theirs absolute already; --set and --plugin ones are relative to here
        specs = [*named, *plugins]
        if problem := _plugins_problem(specs):
            raise ConfigError([*ctx.errors, f"{top}: {problem}"])
        if specs:
            data["plugins"] = list(dict.fromkeys(str(Path(p).resolve()) if is_path_spec(p) else p for p in specs))
    if ctx.errors:
        raise ConfigError(ctx.errors)
    return data

