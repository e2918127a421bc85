"""Every error a user can fix, in one place: the CLI prints each as one line and exits 2.

They sit at the bottom of the layers (:mod:`toolkit.families` lists them), so any module, and any
plugin, raises them without importing anything above it.
"""
from __future__ import annotations

import difflib
import json
import re

import attrs


class UserError(Exception):
    """A problem the user can fix (a recipe value, a missing file); said in one line, never a traceback."""


@attrs.frozen
class Problem:
    """One configuration problem as data: where (``("model", "layers", 0)``; None for a line with no
    recipe path), what, and the file or ``--set`` that gave the value (None: the recipe itself).
    Formatted only when printed (:func:`format_problem`), so callers move and merge problems by their parts."""

    path: tuple | None
    message: str
    origin: str | None = None

    def at(self, *prefix) -> "Problem":
        """This problem under ``prefix`` (a section's problems, found within it, placed in the recipe)."""
        return attrs.evolve(self, path=(*prefix, *self.path)) if self.path is not None else self


def path_key(key) -> str:
    """A key as it goes in a ``$.a.b`` path: bare when TOML would write it bare, else quoted (escapes shown)."""
    key = str(key)
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key, ensure_ascii=False)


def format_path(path: tuple, root: str = "$") -> str:
    """``("a", "b", 0)`` as ``$.a.b[0]``."""
    return root + "".join(f"[{k}]" if isinstance(k, int) else f".{path_key(k)}" for k in path)


def format_problem(problem: Problem, file: str | None = None, root: str = "$") -> str:
    """The one way a problem is written: ``file: $.a.b[0]: message (from base.toml)``."""
    parts = [file] if file else []
    if problem.path is not None:
        parts.append(format_path(problem.path, root))
    parts.append(problem.message + (f" (from {problem.origin})" if problem.origin else ""))
    return ": ".join(parts)


class ConfigError(UserError, ValueError):
    """One or more configuration problems, one line each (``file: $.path: problem``).

    Built from :class:`Problem` s (``problems=``, with the ``file`` they are in) so that the path and
    origin stay data for whoever catches it; ``ConfigError(lines)`` is a problem per ready-made line."""

    def __init__(self, lines: list[str] | str = (), *, problems=(), file: str | None = None):
        lines = [lines] if isinstance(lines, str) else list(lines)
        self.problems = [Problem(None, line) for line in lines] + list(problems)
        self.file = file
        self.lines = lines + [format_problem(p, file) for p in problems]
        super().__init__("\n".join(self.lines))


class InvalidValue(ValueError):
    """A value of the right type that a validator refused. ``message`` is what a recipe's user sees
    (``must be > 0, got 0``: the path is added where it is printed); ``field`` names the field for
    whoever built the object in Python (``str()``: ``n_layer must be > 0, got 0``). Validators raise it."""

    def __init__(self, message: str, field: str | None = None):
        self.message, self.field = message, field
        super().__init__(f"{field} {message}" if field else message)


class RegistryError(UserError, ValueError):
    """A component could not be registered or found."""


class UnknownComponentError(RegistryError, KeyError):
    """A name that no plugin registered in a family, with the closest registered name."""

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


class AmbiguousComponentError(UnknownComponentError):
    """A bare name that several plugins registered and no built-in has: the recipe must say whose."""

    def __init__(self, family: str, name: str, qualified: list[str]):
        self.family, self.name, self.known = family, name, qualified
        choices = " or ".join(f"'{q}'" for q in qualified)
        RegistryError.__init__(self, f"{family} {name!r} is registered by several plugins; choose one: {choices}")


class PluginLoadError(UserError, RuntimeError):
    """A plugin the user asked for by name (recipe, ablation file or --plugin) could not be loaded;
    ``reason`` is why, without the plugin's name (a recipe names the plugin at its own path)."""

    def __init__(self, message: str, reason: str | None = None):
        self.reason = message if reason is None else reason
        super().__init__(message)


class DataError(UserError, ValueError):
    """A problem with the data (a path, a too-small split)."""


class CheckpointError(UserError):
    """A checkpoint or run folder problem."""


class UsageError(UserError):
    """A problem with the command line or the files it names."""


class HFFormatError(UserError, ValueError):
    """A Hugging Face folder this toolkit cannot read exactly (missing file, unsupported setting)."""


def did_you_mean(word: str, candidates) -> str | None:
    """The candidate a typo most likely meant: same letters swapped first ('mah' -> 'mha'), then difflib's closest."""
    candidates = [c for c in candidates if isinstance(c, str)]
    if not isinstance(word, str):
        return None
    lowered = {c.lower(): c for c in candidates}
    if word.lower() in lowered:
        return lowered[word.lower()]
    swapped = [c for c in candidates if sorted(c.lower()) == sorted(word.lower())]
    if swapped:
        return swapped[0]
    hint = difflib.get_close_matches(word, candidates, n=1)
    return hint[0] if hint else None


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def one_line(text: str) -> str:
    """``text`` with control characters escaped (``\\n``, ``\\x00``): a message stays on its one line."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], str(text))
