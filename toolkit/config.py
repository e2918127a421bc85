"""The one cattrs converter, built after plugins load.

It is strict where TOML users need it to be: unknown keys are errors (``forbid_extra_keys``),
an ``int`` field takes only integers (not ``true``, not ``12.5``, not ``"12"``), and a component
table ``{kind = "gqa", n_kv_head = 2}`` is structured into that component's own options class, so an
option that belongs to another component is reported at its path. Use :func:`format_errors` to turn
a cattrs error into lines like ``$.model.n_head: expected int, got "twelve"``.
"""
from __future__ import annotations

import difflib
import functools
from typing import Any

import attrs
import cattrs
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError, IterableValidationError

from .model import SPEC_TYPES, Spec, resolve_options
from .registry import Registry, UnknownComponentError


class ValueTypeError(TypeError):
    """A value of the wrong type; carries what was expected and what was given."""

    def __init__(self, expected: str, value: Any):
        self.expected, self.value = expected, value
        super().__init__(f"expected {expected}, got {_show(value)}")


def _show(value: Any) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return repr(value)


def _strict_int(value, _):
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueTypeError("int", value)
    return value


def _strict_float(value, _):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueTypeError("float", value)
    return float(value)


def _strict_bool(value, _):
    if not isinstance(value, bool):
        raise ValueTypeError("bool", value)
    return value


def _strict_str(value, _):
    if not isinstance(value, str):
        raise ValueTypeError("string", value)
    return value


def _note(exc: Exception, name: str, typ: Any) -> Exception:
    from cattrs.errors import AttributeValidationNote

    exc.__notes__ = [*getattr(exc, "__notes__", []), AttributeValidationNote(f"Structuring @ {name}", name, typ)]
    return exc


def _structure_spec(registry: Registry, converter: cattrs.Converter, value: Any, cls: type[Spec]) -> Spec:
    family = cls.family
    if isinstance(value, str):
        value = {"kind": value}
    if not isinstance(value, dict):
        raise ValueTypeError(f"a table with kind = \"<{family}>\"", value)
    if "kind" not in value:
        err = KeyError(f"missing kind (one of: {', '.join(registry.names(family))})")
        raise ClassValidationError(f"{family} table", [_note(err, "kind", str)], cls)
    kind = value["kind"]
    if not isinstance(kind, str):
        raise ClassValidationError(f"{family} table", [_note(ValueTypeError("string", kind), "kind", str)], cls)
    try:
        comp = registry.get(family, kind)
    except UnknownComponentError as exc:
        raise ClassValidationError(f"{family} table", [_note(exc, "kind", str)], cls) from None
    rest = {k: v for k, v in value.items() if k != "kind"}
    return cls(kind, converter.structure(rest, comp.options))


def _unstructure_spec(registry: Registry, converter: cattrs.Converter, spec: Spec) -> dict:
    opts = resolve_options(registry, spec)
    return {"kind": spec.kind, **converter.unstructure(opts)}


def make_converter(registry: Registry) -> cattrs.Converter:
    """The converter for recipes and model specs over the given registry's components."""
    c = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
    c.register_structure_hook(int, _strict_int)
    c.register_structure_hook(float, _strict_float)
    c.register_structure_hook(bool, _strict_bool)
    c.register_structure_hook(str, _strict_str)
    c.register_structure_hook_func(
        lambda t: isinstance(t, type) and issubclass(t, Spec) and t is not Spec,
        functools.partial(_structure_spec, registry, c),
    )
    c.register_unstructure_hook_func(
        lambda t: isinstance(t, type) and issubclass(t, Spec),
        functools.partial(_unstructure_spec, registry, c),
    )
    return c


def _describe(exc: BaseException, path: str) -> str:
    """One error as ``PATH: message`` (cattrs' transform_error formatter, friendlier for TOML)."""
    if isinstance(exc, ValueTypeError):
        return f"{path}: {exc}"
    if isinstance(exc, UnknownComponentError):
        return f"{path}: {exc}"
    if isinstance(exc, ForbiddenExtraKeysError):
        known = [f.name for f in attrs.fields(exc.cl)] if attrs.has(exc.cl) else []
        parts = []
        for key in sorted(exc.extra_fields):
            hint = difflib.get_close_matches(key, known, n=1)
            msg = f"{path}.{key}: unknown key" if path != "$" else f"$.{key}: unknown key"
            if hint:
                msg += f"; did you mean {hint[0]!r}?"
            elif known:
                msg += f" (allowed: {', '.join(known)})"
            parts.append(msg)
        return "\n".join(parts)
    if isinstance(exc, KeyError):
        text = exc.args[0] if exc.args else ""
        return f"{path}: {text if isinstance(text, str) and ' ' in text else 'required key is missing'}"
    if isinstance(exc, (ValueError, TypeError)):
        return f"{path}: {exc}"
    return f"{path}: {type(exc).__name__}: {exc}"


def format_errors(exc: BaseException, root: str = "$") -> list[str]:
    """Flatten a cattrs structuring error into one line per problem, each with its path.

    Like cattrs' ``transform_error``, but worded for TOML users and with did-you-mean hints.
    """
    return _walk(exc, root)


def _walk(exc: BaseException, path: str) -> list[str]:
    from cattrs.errors import AttributeValidationNote, IterableValidationNote

    if isinstance(exc, (ClassValidationError, IterableValidationError)):
        out: list[str] = []
        with_notes, without = exc.group_exceptions()
        for inner, note in with_notes:
            if isinstance(note, AttributeValidationNote):
                sub = f"{path}.{note.name}"
            elif isinstance(note, IterableValidationNote):
                sub = f"{path}[{note.index!r}]"
            else:
                sub = path
            out.extend(_walk(inner, sub))
        for inner in without:
            out.extend(_walk(inner, path))
        return out
    return _describe(exc, path).splitlines()


def structure(registry: Registry, data: Any, cls: type, root: str = "$"):
    """Structure ``data`` into ``cls``; on failure raise :class:`ConfigError` with every problem."""
    try:
        return make_converter(registry).structure(data, cls)
    except (ClassValidationError, IterableValidationError) as exc:
        raise ConfigError(format_errors(exc, root)) from None
    except (ValueError, TypeError) as exc:  # cross-field checks in __attrs_post_init__
        raise ConfigError([f"{root}: {exc}"]) from None


class ConfigError(ValueError):
    """One or more configuration problems, one line each."""

    def __init__(self, lines: list[str]):
        self.lines = list(lines)
        super().__init__("\n".join(self.lines))
