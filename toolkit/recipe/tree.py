"""Plain-data trees (a recipe as dicts and lists): the one deep merge, flatten, differences, inline TOML."""
from __future__ import annotations

import copy
import datetime
import json
from typing import Any

from ..errors import path_key


def deep_merge(base: dict, over: dict) -> dict:
    """``over`` merged onto ``base`` (new dict): tables merge, anything else replaces.

    A table whose ``kind`` differs between the two is replaced whole, so the options of the old
    component do not leak into the new one.
    """
    out = copy.deepcopy(base)
    for key, value in over.items():
        old = out.get(key)
        if isinstance(value, dict) and isinstance(old, dict):
            if "kind" in value and "kind" in old and value["kind"] != old["kind"]:
                out[key] = copy.deepcopy(value)
            else:
                out[key] = deep_merge(old, value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _drop_none(value):
    """TOML has no null: leave unset optional keys out (they resolve to the same defaults)."""
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_drop_none(v) for v in value]
    return value


def toml_inline(value: Any) -> str:
    """A value in TOML's inline syntax (what you would write after ``--set key=``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_inline(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{path_key(k)} = {toml_inline(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()  # TOML's own date, time and date-time syntax
    return repr(value)  # numbers: repr spells nan, inf and -inf as TOML does


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """``{"model": {"n_head": 6}}`` -> ``{"model.n_head": 6}`` (arrays stay whole).

    An empty table stays, as the value ``{}``: nothing of ``data`` is lost, and a table one recipe
    lacks and the other has empty is a difference (against a full table, :func:`differences` lists
    the keys that came or went instead)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _key_order(a: dict, b: dict) -> dict:
    """The keys of both, table by table: a's order, then what only b has (so a table's keys stay together)."""
    out: dict = {}
    for key in [*a, *(k for k in b if k not in a)]:
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) or isinstance(vb, dict):
            out[key] = _key_order(va if isinstance(va, dict) else {}, vb if isinstance(vb, dict) else {}) or None
        else:
            out[key] = None
    return out


def diff_data(da: dict, db: dict) -> list[str]:
    """:func:`diff_recipes` of two recipes' plain data."""
    return diff_lines(flatten(da), flatten(db), keys=flatten(_key_order(da, db)))


#: a key one side of :func:`differences` does not have
MISSING: Any = object()


def differences(a: dict, b: dict, keys=None) -> list[tuple[str, Any, Any]]:
    """``(key, a's value, b's value)`` for each key of two flat dicts whose values differ (in value or
    type: 1 is not true), MISSING where one has none; in the order of ``keys`` (a's keys, then b's)."""
    keys = [*a, *(k for k in b if k not in a)] if keys is None else keys
    out = []
    for key in keys:
        va, vb = a.get(key, MISSING), b.get(key, MISSING)
        if va == vb and type(va) is type(vb):
            continue
        if MISSING in (va, vb) and {} in (va, vb) and any(k.startswith(key + ".") for k in (b if va == {} else a)):
            continue  # an empty table against the keys of a full one: those keys say what changed
        out.append((key, va, vb))
    return out


def diff_lines(a: dict, b: dict, keys=None, prefix: str = "") -> list[str]:
    """``key: a -> b`` for each of :func:`differences` (``(unset)`` where one has none)."""
    show = lambda v: "(unset)" if v is MISSING else toml_inline(v)  # noqa: E731
    return [f"{prefix}{key}: {show(va)} -> {show(vb)}" for key, va, vb in differences(a, b, keys)]
