"""The one cattrs converter, built after plugins load.

It is strict where TOML users need it to be: unknown keys are errors, an ``int`` field takes only
integers (not ``true``, not ``12.5``, not ``"12"``), an array field takes only an array, and a
component table ``{kind = "gqa", n_kv_head = 2}`` is structured into that component's own options
class, so an option that belongs to another component is reported at its path.

attrs classes are structured field by field here rather than by cattrs' generated code, so each
field's attrs validator runs at that field's path: ``$.train.lr: must be > 0, got -1.0`` instead of
attrs' raw ``("'lr' must be > 0: -1.0", Attribute(...), ...)`` escaping the path tracking. Use
:func:`format_errors` to turn a cattrs error into lines like ``$.model.n_head: expected int, got "twelve"``.
"""
from __future__ import annotations

import functools
import json
import math
import typing
from typing import Any, Literal

import attrs
import cattrs
from cattrs.errors import (
    AttributeValidationNote,
    ClassValidationError,
    ForbiddenExtraKeysError,
    IterableValidationError,
    IterableValidationNote,
)

from .errors import ConfigError, InvalidValue, Problem, UnknownComponentError, did_you_mean, format_problem
from .families import Spec
from .registry import Registry


class ValueTypeError(TypeError):
    """A value of the wrong type; carries what was expected and what was given."""

    def __init__(self, expected: str, value: Any):
        self.expected, self.value = expected, value
        super().__init__(f"expected {expected}, got {_show(value)}")


class UnknownOptionError(KeyError):
    """An option that the chosen component does not take."""

    def __str__(self) -> str:
        return self.args[0]


def _show(value: Any) -> str:
    """A value as a TOML user would write it: strings in double quotes, true/false, a table."""
    if isinstance(value, str):  # escaped, so a newline in a value never breaks a message in two
        return json.dumps(value if len(value) <= 80 else value[:60], ensure_ascii=False) + (
            f" (... {len(value):,} characters)" if len(value) > 80 else "")
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]" if len(value) <= 8 else f"an array of {len(value)}"
    return repr(value)


def _quote_names(names) -> str:
    return ", ".join(f"'{n}'" for n in names)


# -- scalar hooks -------------------------------------------------------------------------------
#: every integer of a recipe fits a signed 64-bit integer (torch, numpy and DeepSpeed take no more)
INT_LIMIT = 2**63


def _strict_int(value, _):
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueTypeError("int", value)
    if not -INT_LIMIT <= value < INT_LIMIT:
        raise InvalidValue(f"must be between -2**63 and 2**63 - 1, got {value:.3e}")
    return value


def _strict_float(value, _):
    """A finite float (an int is taken too): inf and nan are refused unless a field allows them
    (``metadata={"finite": False}``, see :func:`structure_fields`)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueTypeError("float", value)
    try:
        value = float(value)
    except OverflowError:  # an int beyond the float range
        value = math.inf
    if not math.isfinite(value):
        raise InvalidValue(f"must be a finite number, got {_show(value)}")
    return value


def _strict_bool(value, _):
    if not isinstance(value, bool):
        raise ValueTypeError("bool", value)
    return value


def _strict_str(value, _):
    if not isinstance(value, str):
        raise ValueTypeError("string", value)
    return value


def _structure_literal(value, typ):
    allowed = typing.get_args(typ)
    for option in allowed:  # `1 == True` in Python: compare types too
        if value == option and type(value) is type(option):
            return option
    msg = f"must be one of {', '.join(_show(o) for o in allowed)}, got {_show(value)}"
    if isinstance(value, str):
        hint = did_you_mean(value, [o for o in allowed if isinstance(o, str)])
        if hint:
            msg += f"; did you mean {_show(hint)}?"
    raise InvalidValue(msg)


# -- container hooks (TOML arrays and tables only; a string is not an array of characters) ------
def _type_name(typ: Any, plural: bool = False) -> str:
    names = {int: "int", float: "float", str: "string", bool: "bool"}
    name = names.get(typ, getattr(typ, "__name__", str(typ)))
    return name + "s" if plural and typ in names else name


def _structure_list(converter: cattrs.Converter, value, typ):
    (elem,) = typing.get_args(typ) or (Any,)
    if not isinstance(value, (list, tuple)):
        raise ValueTypeError(f"an array of {_type_name(elem, plural=True)}", value)
    return _structure_items(converter, list(value), [elem] * len(value), typ)


def _structure_tuple(converter: cattrs.Converter, value, typ):
    args = typing.get_args(typ)
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_structure_list(converter, value, list[args[0]]))
    kinds = " and ".join(sorted({_type_name(a, plural=len(args) > 1) for a in args}))
    if not isinstance(value, (list, tuple)) or len(value) != len(args):
        raise ValueTypeError(f"an array of {len(args)} {kinds}", value)
    return tuple(_structure_items(converter, list(value), list(args), typ))


def _structure_items(converter: cattrs.Converter, values: list, types: list, typ) -> list:
    out, errors = [], []
    for i, (item, t) in enumerate(zip(values, types)):
        try:
            out.append(item if t is Any else converter.structure(item, t))
        except Exception as exc:  # noqa: BLE001 - collected and reported with its index
            exc.__notes__ = [*getattr(exc, "__notes__", []), IterableValidationNote(f"Structuring @ index {i}", i, t)]
            errors.append(exc)
    if errors:
        raise IterableValidationError(f"While structuring {typ!r}", errors, typ)
    return out


def _structure_dict(converter: cattrs.Converter, value, typ):
    key_t, val_t = typing.get_args(typ) or (str, Any)
    if not isinstance(value, dict):
        raise ValueTypeError("a table", value)
    out, errors = {}, []
    for k, item in value.items():
        try:
            out[converter.structure(k, key_t)] = item if val_t is Any else converter.structure(item, val_t)
        except Exception as exc:  # noqa: BLE001
            errors.append(_note(exc, str(k), val_t))
    if errors:
        raise ClassValidationError(f"While structuring {typ!r}", errors, dict)
    return out


def _origin_is(*origins):
    return lambda t: typing.get_origin(t) in origins


# -- attrs classes, field by field --------------------------------------------------------------
def _note(exc: Exception, name: str, typ: Any) -> Exception:
    exc.__notes__ = [*getattr(exc, "__notes__", []), AttributeValidationNote(f"Structuring @ {name}", name, typ)]
    return exc


def refusal(validator: Any, attribute: attrs.Attribute, value: Any) -> str | None:
    """What ``validator`` says of ``value``, as ``must be > 0, got -1.0`` (the field name is in the path), or None.

    attrs' own validators (``gt``, ``in_``, ``instance_of``, ``optional``, ``and_``, the ones plugins
    use) are read by their parts (bound, options, type), not by their message. Any other validator is
    run: an :class:`InvalidValue` says its message as is; a plain ValueError (a plugin's own) has a
    leading field name dropped. AttributeError: it needs the instance (the constructor runs it)."""
    if isinstance(validator, (list, tuple)):
        validator = attrs.validators.and_(*validator)
    kind = type(validator).__name__
    if kind == "_AndValidator":
        return next((r for v in validator._validators if (r := refusal(v, attribute, value))), None)
    if kind == "_OptionalValidator":
        return None if value is None else refusal(validator.validator, attribute, value)
    if kind == "_NumberValidator":
        if validator.compare_func(value, validator.bound):
            return None
        bound = validator.bound  # `must be > 0`, not `> 0.0`
        shown = str(int(bound)) if isinstance(bound, float) and bound.is_integer() else str(bound)
        return f"must be {validator.compare_op} {shown}, got {_show(value)}"
    if kind == "_InValidator":
        try:
            if value in validator.options:
                return None
        except TypeError:
            pass
        options = list(getattr(validator, "_original_options", validator.options))
        msg = f"must be one of {', '.join(_show(o) for o in options)}, got {_show(value)}"
        if isinstance(value, str):
            hint = did_you_mean(value, [o for o in options if isinstance(o, str)])
            if hint:
                msg += f"; did you mean {_show(hint)}?"
        return msg
    if kind == "_InstanceOfValidator":
        return None if isinstance(value, validator.type) else f"expected {_type_name(validator.type)}, got {_show(value)}"
    try:
        validator(None, attribute, value)
    except InvalidValue as exc:
        return exc.message
    except (ValueError, TypeError) as exc:
        return _without_name(exc, attribute.name)
    return None


def _without_name(exc: BaseException, name: str) -> str:
    """A plugin validator's message without the field name it often starts with (the name is in the path)."""
    text = exc.args[0] if exc.args and isinstance(exc.args[0], str) else str(exc)
    for prefix in (f"'{name}' ", f"{name} ", f"{name}: "):
        if text.startswith(prefix):
            return text[len(prefix):]
    return text


def _clean(exc: BaseException, name: str = "") -> Exception:
    """A constructor's (post-init or validator) error as a one-line :class:`InvalidValue`."""
    if isinstance(exc, InvalidValue) and exc.field:  # a validator run by the constructor: said at its field
        return _note(InvalidValue(exc.message), exc.field, Any)
    if isinstance(exc, (InvalidValue, ValueTypeError)):
        return exc
    text = exc.args[0] if exc.args and isinstance(exc.args[0], str) else str(exc)
    if len(exc.args) >= 2 and isinstance(exc.args[1], attrs.Attribute):  # a validator that needed the instance
        attr = exc.args[1]
        return _note(InvalidValue(_without_name(exc, attr.name)), attr.name, attr.type)
    return InvalidValue(text.strip().splitlines()[0] if text.strip() else type(exc).__name__)


def structure_fields(converter: cattrs.Converter, data: Any, cls: type) -> tuple[dict, list[Exception]]:
    """Structure and validate each field of attrs class ``cls`` from table ``data``.

    Returns the constructor keywords of the fields that are valid and the errors of the others
    (each carrying a path note). The class itself is not built, so callers can still look at the
    valid fields when others fail (cross-field checks, :func:`toolkit.recipe.load_recipe`).
    """
    if not isinstance(data, dict):
        raise ValueTypeError("a table", data)
    attrs.resolve_types(cls)
    fields = [f for f in attrs.fields(cls) if f.init]
    by_name = {f.name: f for f in fields}
    errors: list[Exception] = []
    extra = [k for k in data if k not in by_name]
    if extra:
        errors.append(ForbiddenExtraKeysError(f"unknown keys for {cls.__name__}", cls, set(extra)))
    kwargs: dict[str, Any] = {}
    for f in fields:
        if f.name not in data:
            if f.default is attrs.NOTHING:
                errors.append(_note(KeyError("required key is missing"), f.name, f.type))
            continue
        try:
            raw = data[f.name]
            if isinstance(raw, float) and not math.isfinite(raw) and f.metadata.get("finite") is False:
                value = raw  # a field that gives inf a meaning (e.g. "no limit")
            else:
                value = converter.structure(raw, f.type)
        except Exception as exc:  # noqa: BLE001 - every problem is collected with its path
            errors.append(_note(exc, f.name, f.type))
            continue
        checked = value
        if f.converter is not None and callable(f.converter) and not isinstance(f.converter, attrs.Converter):
            try:
                checked = f.converter(value)
            except (ValueError, TypeError) as exc:
                errors.append(_note(InvalidValue(str(exc)), f.name, f.type))
                continue
        if f.validator is not None:
            try:
                refused = refusal(f.validator, f, checked)
            except AttributeError:
                refused = None  # a validator that needs the instance; the constructor runs it below
            except (ValueError, TypeError) as exc:  # a bound that cannot be compared with the value
                refused = _without_name(exc, f.name)
            if refused is not None:
                errors.append(_note(InvalidValue(refused), f.name, f.type))
                continue
        kwargs[f.alias or f.name] = value
    return kwargs, errors


def _structure_attrs(converter: cattrs.Converter, data: Any, cls: type):
    kwargs, errors = structure_fields(converter, data, cls)
    if errors:
        raise ClassValidationError(f"While structuring {cls.__name__}", errors, cls)
    return build(cls, kwargs)


def build(cls: type, kwargs: dict):
    """``cls(**kwargs)``; a cross-field error of its ``__attrs_post_init__`` is reported at the class's path."""
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise ClassValidationError(f"While structuring {cls.__name__}", [_clean(exc)], cls) from None


# -- component specs ----------------------------------------------------------------------------
def _unknown_option(registry: Registry, family: str, kind: str, key: str, allowed: list[str]) -> UnknownOptionError:
    msg = f"not an option of {family} '{kind}'"
    hint = did_you_mean(key, allowed)
    if hint:
        msg += f"; did you mean '{hint}'?"
    elif allowed:
        msg += f" (its options: {', '.join(allowed)})"
    else:
        msg += " (it takes no options)"
    owners = [n for n in registry.names(family) if n != kind and key in attrs.fields_dict(registry.get(family, n).options)]
    if owners:
        msg += f"; {key} is an option of {family} {_quote_names(owners)}"
    return UnknownOptionError(msg)


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
    allowed = [f.name for f in attrs.fields(comp.options) if f.init]
    rest = {k: v for k, v in value.items() if k != "kind"}
    errors: list[Exception] = [
        _note(_unknown_option(registry, family, kind, k, allowed), k, Any) for k in rest if k not in allowed
    ]
    kwargs, field_errors = structure_fields(converter, {k: v for k, v in rest.items() if k in allowed}, comp.options)
    errors += field_errors
    if errors:
        raise ClassValidationError(f"{family} table", errors, cls)
    return cls(kind, resolve_specs(registry, build(comp.options, kwargs)))


def _unstructure_spec(registry: Registry, converter: cattrs.Converter, spec: Spec) -> dict:
    return {"kind": spec.kind, **converter.unstructure(resolve_spec(registry, spec).options)}


def _is_spec(t) -> bool:
    return isinstance(t, type) and issubclass(t, Spec)


def make_converter(registry: Registry) -> cattrs.Converter:
    """The converter for recipes and model specs over the given registry's components (made once per registry)."""
    cached = getattr(registry, "_converter", None)
    if cached is not None:
        return cached
    c = registry._converter = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
    c.register_structure_hook(int, _strict_int)
    c.register_structure_hook(float, _strict_float)
    c.register_structure_hook(bool, _strict_bool)
    c.register_structure_hook(str, _strict_str)
    # later registrations win: the general container and attrs hooks first, specs last
    c.register_structure_hook_func(_origin_is(list, typing.List), functools.partial(_structure_list, c))
    c.register_structure_hook_func(_origin_is(tuple, typing.Tuple), functools.partial(_structure_tuple, c))
    c.register_structure_hook_func(_origin_is(dict, typing.Dict), functools.partial(_structure_dict, c))
    c.register_structure_hook_func(_origin_is(Literal), _structure_literal)
    c.register_structure_hook_func(
        lambda t: isinstance(t, type) and attrs.has(t) and not _is_spec(t), functools.partial(_structure_attrs, c)
    )
    c.register_structure_hook_func(
        lambda t: _is_spec(t) and t is not Spec,
        functools.partial(_structure_spec, registry, c),
    )
    c.register_unstructure_hook_func(_is_spec, functools.partial(_unstructure_spec, registry, c))
    return c


# -- error formatting ---------------------------------------------------------------------------
def _describe(exc: BaseException, path: tuple) -> list[Problem]:
    """One error as problems at ``path`` (cattrs' transform_error formatter, friendlier for TOML)."""
    if isinstance(exc, InvalidValue):
        return [Problem(path, exc.message)]
    if isinstance(exc, (ValueTypeError, UnknownComponentError, UnknownOptionError)):
        return [Problem(path, str(exc))]
    if isinstance(exc, ForbiddenExtraKeysError):
        known = [f.name for f in attrs.fields(exc.cl) if f.init] if attrs.has(exc.cl) else []
        out = []
        for key in sorted(exc.extra_fields):
            msg = "unknown key"
            hint = did_you_mean(key, known)
            if hint:
                msg += f"; did you mean '{hint}'?"
            elif known:
                msg += f" (allowed: {', '.join(known)})"
            out.append(Problem((*path, key), msg))
        return out
    if isinstance(exc, KeyError):
        text = exc.args[0] if exc.args else ""
        return [Problem(path, text if isinstance(text, str) and ' ' in text else 'required key is missing')]
    if isinstance(exc, (ValueError, TypeError)):
        text = str(exc).strip().splitlines()
        return [Problem(path, text[0] if text else type(exc).__name__)]
    return [Problem(path, f"{type(exc).__name__}: {exc}")]


def problems_of(exc: BaseException, path: tuple = ()) -> list[Problem]:
    """Flatten a cattrs structuring error into one problem each, its path as data (from cattrs' notes).

    Like cattrs' ``transform_error``, but worded for TOML users and with did-you-mean hints.
    """
    if isinstance(exc, (ClassValidationError, IterableValidationError)):
        out: list[Problem] = []
        with_notes, without = exc.group_exceptions()
        for inner, note in with_notes:
            if isinstance(note, AttributeValidationNote):
                sub = (*path, note.name)
            elif isinstance(note, IterableValidationNote):
                sub = (*path, note.index)
            else:
                sub = path
            out.extend(problems_of(inner, sub))
        for inner in without:
            out.extend(problems_of(inner, path))
        return out
    return _describe(exc, path)


def format_errors(exc: BaseException, root: str = "$") -> list[str]:
    """A cattrs structuring error as one line per problem (``$.model.n_head: expected int, got "twelve"``)."""
    return [format_problem(p, root=root) for p in problems_of(exc)]


def field_problems(errors: list[Exception], path: tuple = ()) -> list[Problem]:
    """Problems for errors collected by :func:`structure_fields` (each carries its path note)."""
    return problems_of(ClassValidationError("errors", errors, object), path) if errors else []


def errors_to_lines(errors: list[Exception], root: str = "$") -> list[str]:
    """Lines for errors collected by :func:`structure_fields` (each carries its path note)."""
    return [format_problem(p, root=root) for p in field_problems(errors)]


def structure(registry: Registry, data: Any, cls: type, root: str = "$"):
    """Structure ``data`` into ``cls``; on failure raise :class:`ConfigError` with every problem."""
    try:
        return make_converter(registry).structure(data, cls)
    except (ClassValidationError, IterableValidationError) as exc:
        raise ConfigError(format_errors(exc, root)) from None
    except (ValueError, TypeError) as exc:  # a top-level value of the wrong type
        raise ConfigError([format_problem(p, root=root) for p in _describe(exc, ())]) from None


# -- specs made in Python ---------------------------------------------------------------------------
def resolve_spec(registry: Registry, spec: Spec) -> Spec:
    """``spec`` with an instance of its component's options class: the defaults for None, a dict
    structured (ConfigError naming each bad option), an instance kept."""
    comp = registry.get(spec.family, spec.kind)
    if isinstance(spec.options, comp.options):
        return spec
    if spec.options is None:
        return attrs.evolve(spec, options=comp.options())
    if isinstance(spec.options, dict):
        return structure(registry, {"kind": spec.kind, **spec.options}, type(spec), root=f"$.{spec.family}")
    raise ConfigError([f"$.{spec.family}: options must be a table or {comp.options.__qualname__}, "
                       f"got {type(spec.options).__qualname__}"])


def resolve_specs(registry: Registry, obj):
    """An attrs object (a ModelConfig, a Recipe section) with every Spec field resolved (:func:`resolve_spec`)."""
    changes = {}
    for f in attrs.fields(type(obj)):
        value = getattr(obj, f.name)
        if isinstance(value, Spec):
            changes[f.name] = resolve_spec(registry, value)
        elif isinstance(value, list) and value and all(isinstance(v, Spec) for v in value):
            changes[f.name] = [resolve_spec(registry, v) for v in value]
        elif isinstance(value, dict) and value and all(attrs.has(type(v)) for v in value.values()):
            changes[f.name] = {k: resolve_specs(registry, v) for k, v in value.items()}  # a model's layer groups
    return attrs.evolve(obj, **changes) if changes else obj
