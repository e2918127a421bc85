"""Ablations: one TOML file names a base recipe and the component swaps to compare; one command
trains every variant the same way and writes a comparison report.

The ablation file (paths are relative to it; see docs/ablations.md)::

    name = "positions"               # optional; default: the file's stem. Names the output folder.
    description = "..."              # optional; copied into the report
    recipe = "../gpt-cpu.toml"       # the base recipe
    steps = 400                      # the budget of every run: steps = N, or tokens = N
    seeds = [1337, 1338]             # every variant runs once per seed (default [1337])
    evals = 10                       # evaluations per run (default 10): sets train.eval_interval
    set = ["generate.max_new_tokens=200"]   # overrides shared by every variant (like --set; or a table)
    baseline = "learned"             # deltas are against this variant (default: the first)

    [grid]                           # the cartesian product over dotted recipe keys ...
    "model.position.kind" = ["learned", "rope", "alibi"]

    [[variant]]                      # ... and/or named variants, each with its own overrides
    name = "post-norm"
    set = { "model.layout" = "post" }

An override is ``"dotted.key" = value`` in a table or ``"dotted.key=value"`` in an array (TOML
syntax, or a plain string), exactly what ``playattention train --set`` takes. Grid variants are named
after their values (``rope``, ``rope-n_layer=4``).

**The budget.** Every run gets ``train.max_steps = steps`` (with ``tokens = N``: N divided by the
variant's tokens per optimizer step, rounded up) and ``train.seed`` from ``seeds``; the same seed
gives every variant the same initialisation stream and data order. The schedule keeps its shape:
``warmup_steps`` and ``decay_steps`` scale by the ratio of the budget to the base recipe's
``max_steps``, and ``eval_interval = steps // evals`` so every curve has the same evaluation points.
A key you set yourself (``set`` or a variant's ``set``) is left as you set it.

**Validation.** Before anything runs, every variant's recipe is resolved and every problem in every
variant is reported, one line each, at its place in the ablation file::

    recipes/ablations/x.toml: all variants: $.grid."model.positon.kind": unknown key; did you mean "model.position.kind"?

**Running.** Each (variant, seed) trains in a subprocess (``python -m toolkit train``) into
``<out>/<variant>-s<seed>/``, one after another or ``--parallel N`` side by side (one GPU each, or
CPU threads divided between them). The resolved recipe of each run is kept in ``<out>/recipes/``, its
output in ``<out>/logs/``, and ``<out>/state.json`` records each run's recipe fingerprint and status.
Re-running skips finished runs whose recipe is unchanged, resumes interrupted ones from their newest
complete checkpoint (``train --resume``), starts failed and changed ones again, and a run that fails
is recorded (with its last error line) while the others go on. Ctrl-C or SIGTERM stops the running
trainings, which save a checkpoint first. The report
(:mod:`toolkit.report`) is refreshed after every run.
"""
from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import typing
from pathlib import Path
from typing import Any

import attrs

from . import report
from .config import ConfigError
from .config import _show as _got  # a value as the recipe errors show it
from .recipe import Recipe, parse_override, read_toml

TOP_KEYS = ("name", "description", "recipe", "steps", "tokens", "seeds", "evals", "set", "baseline", "grid", "variant")
VARIANT_KEYS = ("name", "set")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=,-]*$")
# recipe keys the ablation sets itself
RESERVED = {
    "train.max_steps": "the ablation sets it: use `steps = N` or `tokens = N` at the top of the file",
    "train.seed": "the ablation sets it: use `seeds = [...]` at the top of the file",
}
FAMILIES = ("attention", "norm", "position", "mlp")


@attrs.frozen
class Override:
    """One ``dotted.key = value`` override and where the ablation file says it."""

    key: str
    text: str  # the value in TOML syntax, as `--set key=text` takes it
    value: Any
    where: str  # its place in the ablation file, e.g. $.grid."model.position.kind"[1]
    key_where: str  # where its key is written (problems with the key itself)

    @property
    def arg(self) -> str:
        return f"{self.key}={self.text}"


@attrs.frozen
class Variant:
    name: str
    overrides: tuple[Override, ...]


@attrs.frozen
class Ablation:
    """A parsed ablation file (nothing resolved yet)."""

    path: Path
    name: str
    description: str
    recipe: Path
    steps: int | None
    tokens: int | None
    seeds: tuple[int, ...]
    evals: int
    shared: tuple[Override, ...]
    variants: tuple[Variant, ...]
    baseline: str

    def run_name(self, variant: str, seed: int) -> str:
        return f"{variant}-s{seed}"


@attrs.frozen
class Resolved:
    """A variant's validated recipe (budget applied, first seed), its differences, size and cost."""

    variant: Variant
    recipe: Recipe
    info: report.VariantInfo

    def recipe_for(self, ablation: Ablation, seed: int) -> Recipe:
        train = attrs.evolve(self.recipe.train, seed=seed)
        return attrs.evolve(self.recipe, train=train, name=f"{ablation.name}-{ablation.run_name(self.variant.name, seed)}")


# -- TOML values -------------------------------------------------------------------------------
def toml_value(value: Any) -> str:
    """``value`` in TOML syntax (inline), so it can travel as ``--set key=<text>``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} as a TOML value")


def _show(value: Any) -> str:
    """A value for people: strings bare, the rest as TOML."""
    return value if isinstance(value, str) else toml_value(value)


# -- the recipe schema, for checking override keys ---------------------------------------------
def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, f.type) for f in attrs.fields(cls)}


def _is_table(tp: Any) -> bool:
    return tp is dict or typing.get_origin(tp) is dict


def _spec_family(tp: Any) -> str | None:
    from .model import Spec

    if isinstance(tp, type) and issubclass(tp, Spec) and tp is not Spec:
        return tp.family
    return None


def _subkeys(key: str, value: Any) -> list[tuple[str, Any]]:
    """Spread a table written with unquoted dotted keys (``{model.layout = "post"}`` is
    ``{"model": {"layout": "post"}}`` to TOML) back into dotted keys, down to a component table,
    a free-form table or a value."""
    if not isinstance(value, dict) or not value:
        return [(key, value)]
    cls: Any = Recipe
    for part in key.split("."):
        types = _field_types(cls) if attrs.has(cls) else {}
        if part not in types:
            cls = None
            break
        cls = types[part]
    if cls is not None and (_spec_family(cls) or not attrs.has(cls)):
        return [(key, value)]  # a component spec, a free-form table (deepspeed.config) or a value
    return [kv for k, v in value.items() for kv in _subkeys(f"{key}.{k}", v)]


def check_key(key: str, kinds: dict[str, str], registry) -> str | None:
    """None if ``key`` names a setting of a recipe whose components are ``kinds``; else the problem."""
    parts = key.split(".")
    if not all(parts):
        return f"not a dotted key: {key!r}"
    if key in RESERVED:
        return RESERVED[key]
    cls: Any = Recipe
    family = None
    for i, part in enumerate(parts):
        here = ".".join(parts[:i])
        if family is not None:  # inside a component table: kind, or an option of that kind
            kind = kinds.get(family)
            if kind is None or (family, kind) not in registry:
                return None  # an unknown kind is reported by the recipe check
            comp = registry.get(family, kind)
            names = ["kind", *(f.name for f in attrs.fields(comp.options))]
            if part not in names:
                hint = difflib.get_close_matches(part, names, n=1)
                fix = f'; did you mean "{".".join([*parts[:i], hint[0], *parts[i + 1:]])}"?' if hint else ""
                return f"unknown key: {family} {kind!r} has no option {part!r}{fix} (options: {', '.join(names[1:]) or 'none'})"
            if i == len(parts) - 1:
                return None
            if part == "kind":
                return f"{here}.kind is a value, not a table"
            cls, family = _field_types(comp.options)[part], None
            continue
        if cls is None or not attrs.has(cls):
            return None if _is_table(cls) or cls is Any else f"{here} is a value, not a table"
        types = _field_types(cls)
        if part not in types:
            hint = difflib.get_close_matches(part, list(types), n=1)
            if hint:
                return f'unknown key; did you mean "{".".join([*parts[:i], hint[0], *parts[i + 1:]])}"?'
            where = f" in {here}" if here else ""
            return f"unknown key {part!r}{where} (allowed: {', '.join(types)})"
        cls = types[part]
        family = _spec_family(cls)
        if _is_table(cls):
            return None  # free-form, e.g. deepspeed.config
    return None


def _apply_kinds(kinds: dict[str, str], overrides) -> dict[str, str]:
    """The component kinds after these overrides."""
    kinds = dict(kinds)
    for ov in overrides:
        parts = ov.key.split(".")
        if len(parts) >= 2 and parts[0] == "model" and parts[1] in FAMILIES:
            fam = parts[1]
            if len(parts) == 2 and isinstance(ov.value, str):
                kinds[fam] = ov.value
            elif len(parts) == 2 and isinstance(ov.value, dict) and isinstance(ov.value.get("kind"), str):
                kinds[fam] = ov.value["kind"]
            elif len(parts) == 3 and parts[2] == "kind" and isinstance(ov.value, str):
                kinds[fam] = ov.value
    return kinds


# -- parsing -----------------------------------------------------------------------------------
def _unknown(keys, allowed, where: str) -> list[str]:
    out = []
    for k in keys:
        if k not in allowed:
            hint = difflib.get_close_matches(k, allowed, n=1)
            msg = f"{where}.{k}: unknown key" + (f"; did you mean {hint[0]!r}?" if hint else f" (allowed: {', '.join(allowed)})")
            out.append(msg)
    return out


def _pos_int(value, where: str, errors: list[str]) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        errors.append(f"{where}: expected int, got {_got(value)}")
        return None
    if value <= 0:
        errors.append(f"{where}: must be > 0, got {value}")
        return None
    return value


def parse_overrides(value: Any, where: str, errors: list[str]) -> list[Override]:
    """A ``set``: a table of ``"dotted.key" = value`` or an array of ``"dotted.key=value"`` strings."""
    out: list[Override] = []
    if isinstance(value, dict):
        for k, v in value.items():
            for key, val in _subkeys(k, v):
                loc = f'{where}."{key}"'
                out.append(Override(key, toml_value(val), val, loc, loc))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            loc = f"{where}[{i}]"
            if not isinstance(item, str) or "=" not in item or not all(k.strip() for k in item.split("=", 1)[0].split(".")):
                errors.append(f'{loc}: expected "dotted.key=value", got {_got(item)}')
                continue
            keys, value = parse_override(item)
            out.append(Override(".".join(keys), item.split("=", 1)[1].strip(), value, loc, loc))
    else:
        errors.append(f'{where}: expected a table of "dotted.key" = value or an array of "dotted.key=value", got {_got(value)}')
    return out


def _label(key: str, value: Any) -> str:
    """A grid value as part of a variant name: rope, n_layer=4, rope,theta=500."""
    if isinstance(value, str):
        text = value
    elif isinstance(value, dict):
        rest = [f"{k}={_show(v)}" for k, v in value.items() if k != "kind"]
        text = ",".join([str(value["kind"])] * ("kind" in value) + rest)
    else:
        text = f"{key.rsplit('.', 1)[-1]}={_show(value)}"
    return re.sub(r"[^A-Za-z0-9._+=,-]+", "-", text).strip("-") or "x"


def parse_ablation(path: str | Path) -> Ablation:
    """Read and check an ablation file's own structure; raises ConfigError (one line per problem)."""
    ablation, errors = _parse(Path(path))
    if errors:
        raise ConfigError([f"{path}: {e}" for e in errors])
    return ablation


def _parse(path: Path) -> tuple[Ablation | None, list[str]]:
    """The ablation and the problems with its structure; None where it is too broken to resolve."""
    if not path.is_file():
        raise ConfigError([f"{path}: no such ablation file"])
    data = read_toml(path)
    errors: list[str] = _unknown(data, TOP_KEYS, "$")

    name = data.get("name", path.stem)
    if not isinstance(name, str) or not NAME_RE.match(name):
        errors.append(f"$.name: expected a name of letters, digits and ._+=,- , got {_got(name)}")
        name = path.stem
    description = data.get("description", "")
    if not isinstance(description, str):
        errors.append(f"$.description: expected string, got {_got(description)}")
        description = ""

    recipe = data.get("recipe")
    recipe_path = Path()
    if recipe is None:
        errors.append('$.recipe: required key is missing (the base recipe, e.g. recipe = "../gpt-cpu.toml")')
    elif not isinstance(recipe, str):
        errors.append(f"$.recipe: expected string, got {_got(recipe)}")
    else:
        recipe_path = Path(os.path.normpath(path.parent / recipe))
        if not recipe_path.is_file():
            errors.append(f"$.recipe: no such file: {recipe_path}")

    steps = tokens = None
    if "steps" in data and "tokens" in data:
        errors.append("$.tokens: give either steps or tokens, not both")
    elif "steps" in data:
        steps = _pos_int(data["steps"], "$.steps", errors)
    elif "tokens" in data:
        tokens = _pos_int(data["tokens"], "$.tokens", errors)
    else:
        errors.append("$: no budget: add steps = N or tokens = N (every variant trains for the same budget)")

    seeds = data.get("seeds", [1337])
    if not isinstance(seeds, list) or not seeds:
        errors.append(f"$.seeds: expected a non-empty array of ints, got {_got(seeds)}")
        seeds = [1337]
    for i, s in enumerate(seeds):
        if isinstance(s, bool) or not isinstance(s, int):
            errors.append(f"$.seeds[{i}]: expected int, got {_got(s)}")
    if len(set(map(repr, seeds))) != len(seeds):
        errors.append(f"$.seeds: seeds repeat: {_got(seeds)}")
    seeds = [s for s in seeds if isinstance(s, int) and not isinstance(s, bool)] or [1337]
    evals = _pos_int(data.get("evals", 10), "$.evals", errors) or 10

    shared = parse_overrides(data.get("set", []), "$.set", errors)

    variants: list[Variant] = []
    grid = data.get("grid", {})
    if not isinstance(grid, dict):
        errors.append(f"$.grid: expected a table of \"dotted.key\" = [values], got {_got(grid)}")
        grid = {}
    axes = []
    for key, values in grid.items():
        if isinstance(values, dict) and values:  # unquoted dotted keys: [grid] model.position.kind = [...]
            axes.extend((k, v) for k, v in _subkeys(key, values))
        else:
            axes.append((key, values))
    ok_axes = []
    for key, values in axes:
        loc = f'$.grid."{key}"'
        if not isinstance(values, list) or not values:
            errors.append(f"{loc}: expected a non-empty array of values, got {_got(values)}")
        else:
            ok_axes.append((key, values))
    if ok_axes:
        for combo in itertools.product(*(range(len(v)) for _, v in ok_axes)):
            ovs, labels = [], []
            for (key, values), i in zip(ok_axes, combo):
                ovs.append(Override(key, toml_value(values[i]), values[i], f'$.grid."{key}"[{i}]', f'$.grid."{key}"'))
                labels.append(_label(key, values[i]))
            variants.append(Variant("-".join(labels), tuple(ovs)))

    listed = data.get("variant", [])
    if not isinstance(listed, list):
        errors.append(f"$.variant: expected [[variant]] tables, got {_got(listed)}")
        listed = []
    for i, item in enumerate(listed):
        loc = f"$.variant[{i}]"
        if not isinstance(item, dict):
            errors.append(f"{loc}: expected a table, got {_got(item)}")
            continue
        errors += _unknown(item, VARIANT_KEYS, loc)
        vname = item.get("name")
        if not isinstance(vname, str) or not NAME_RE.match(vname):
            errors.append(f"{loc}.name: expected a name of letters, digits and ._+=,- , got {_got(vname) if vname is not None else 'nothing'}")
            vname = f"variant{i}"
        ovs = parse_overrides(item.get("set", {}), f"{loc}.set", errors)
        variants.append(Variant(vname, tuple(ovs)))

    if not variants and not errors:
        errors.append("$: no variants: add a [grid] table or [[variant]] tables")
    seen: dict[str, int] = {}
    for v in variants:
        seen[v.name] = seen.get(v.name, 0) + 1
    for vname, n in seen.items():
        if n > 1:
            errors.append(f"$: variant name {vname!r} is used {n} times; names must be unique")
    baseline = data.get("baseline", variants[0].name if variants else "")
    if not isinstance(baseline, str):
        errors.append(f"$.baseline: expected string, got {_got(baseline)}")
    elif variants and baseline not in seen:
        hint = difflib.get_close_matches(baseline, list(seen), n=1)
        errors.append(f"$.baseline: no variant named {baseline!r}" + (f"; did you mean {hint[0]!r}?" if hint else "")
                      + f" (variants: {', '.join(seen)})")
    usable = recipe_path.is_file() and variants and isinstance(baseline, str) and baseline in seen
    if not usable:
        return None, errors
    return Ablation(path, name, description, recipe_path, steps, tokens, tuple(seeds), evals, tuple(shared),
                    tuple(variants), baseline), errors


# -- resolving ---------------------------------------------------------------------------------
_PATH_RE = re.compile(r'\$((?:\.(?:"[^"]*"|[\w-]+)|\[\d+\])*)')


def _map_line(line: str, overrides: list[Override]) -> str:
    """Move a recipe error that an override caused to that override's place in the ablation file."""
    m = _PATH_RE.search(line)
    if not m or not m.group(1):
        return line
    dotted = m.group(1)[1:].replace('"', "") if m.group(1).startswith(".") else m.group(1)
    best = None
    for ov in overrides:  # the last matching override wins, as it does when applied
        if dotted == ov.key or dotted.startswith(ov.key + ".") or dotted.startswith(ov.key + "["):
            if best is None or len(ov.key) >= len(best.key):
                best = ov
    if best is None:
        return line
    rest = re.sub(r" \(from --set .*\)$", "", line[m.end():])  # the recipe's note of which --set it was
    return best.where + dotted[len(best.key):] + rest


def _model_counts(recipe: Recipe) -> tuple[int, int]:
    """All parameters (tied embeddings once) and forward FLOPs per token at the full context,
    from the model built on the meta device (no memory, no init time)."""
    import torch

    from .model import Transformer
    from .plugin_manager import get_registry

    with torch.device("meta"):
        model = Transformer(recipe.model, get_registry(recipe.plugins))
    total = model.component_report(recipe.model.block_size)[-1]
    return int(total["params"]), int(total["flops_per_token"])


def budget_overrides(ablation: Ablation, recipe: Recipe) -> list[Override]:
    """The overrides that give ``recipe`` the ablation's budget: max_steps, warmup and decay scaled
    with it, and the eval interval. Overrides in the file come after them, so they win."""
    t = recipe.train
    tokens_per_step = t.tokens_per_step or t.micro_batch * recipe.model.block_size * (t.grad_accum or 1)
    steps = ablation.steps or math.ceil(ablation.tokens / tokens_per_step)
    ratio = steps / t.max_steps
    values: dict[str, int] = {"max_steps": steps, "warmup_steps": min(round(t.warmup_steps * ratio), steps - 1)}
    if t.decay_steps is not None:
        values["decay_steps"] = max(1, round(t.decay_steps * ratio))
    values["eval_interval"] = max(1, steps // ablation.evals)
    at = "$.steps" if ablation.steps else "$.tokens"
    return [Override(f"train.{k}", str(v), v, f"{at} (sets train.{k}={v})", at) for k, v in values.items()]


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else k))
        return out
    return {prefix: data}


def recipe_diff(recipe: Recipe, baseline: Recipe) -> tuple[str, ...]:
    """``key=value`` for each setting of ``recipe`` that differs from ``baseline`` (name, description
    and seed aside). Where a component's kind changed, its options are listed only where they differ
    from that kind's defaults."""
    from .config import make_converter
    from .plugin_manager import get_registry
    from .recipe import recipe_to_dict

    mine, base = _flat(recipe_to_dict(recipe)), _flat(recipe_to_dict(baseline))
    registry = get_registry(recipe.plugins)
    converter = make_converter(registry)
    changed_kind = {}
    for fam in FAMILIES:
        kind = mine.get(f"model.{fam}.kind")
        if kind != base.get(f"model.{fam}.kind") and (fam, kind) in registry:
            changed_kind[fam] = _flat(converter.unstructure(registry.get(fam, kind).options()))
    out = []
    for key, value in mine.items():
        if key in ("name", "description", "train.seed") or base.get(key, object()) == value:
            continue
        parts = key.split(".")
        if len(parts) > 2 and parts[0] == "model" and parts[1] in changed_kind and parts[2] != "kind":
            if changed_kind[parts[1]].get(".".join(parts[2:]), object()) == value:
                continue  # the new kind's default
        out.append(f"{key}={_show(value)}")
    for key in base:
        parts = key.split(".")
        if key not in mine and not (len(parts) > 2 and parts[0] == "model" and parts[1] in changed_kind):
            out.append(f"{key}=(unset)")
    return tuple(out)


def resolve(ablation: Ablation) -> list[Resolved]:
    """Every variant's recipe, validated, with its budget, differences, parameters and FLOPs.

    Raises ConfigError listing every problem of every variant (identical problems merged)."""
    from . import plugin_manager
    from .plugin_manager import PluginLoadError, get_registry
    from .recipe import load_recipe

    where = str(ablation.path)
    try:
        base = load_recipe(ablation.recipe)
    except ConfigError as exc:
        raise ConfigError([f"{where}: base recipe {ablation.recipe}: {line}" for line in exc.lines]) from None
    except PluginLoadError as exc:
        raise ConfigError([f"{where}: base recipe {ablation.recipe}: {exc}"]) from None
    base_kinds = {fam: getattr(base.model, fam).kind for fam in FAMILIES}

    def check(overrides: list[Override], checked: list[Override]) -> tuple[list[str], Recipe | None]:
        """The recipe with all of ``overrides``, or the problems with the keys of ``checked``, or with the recipe."""
        # Each check sees only the built-ins, installed packages and its own plugins: a kind that one
        # variant's plugin file provides must not validate another variant. (This process only
        # validates and starts trainings, so rebuilding the process-wide manager is safe.)
        plugin_manager.reset()
        plugins = list(base.plugins)
        for ov in overrides:
            if ov.key == "plugins" and isinstance(ov.value, list):
                plugins = [p for p in ov.value if isinstance(p, str)]
        try:
            registry = get_registry(plugins)
        except PluginLoadError as exc:
            at = next((o.where for o in overrides if o.key == "plugins"), "$")
            return [f"{at}: {exc}"], None
        kinds = _apply_kinds(base_kinds, overrides)
        problems, bad = [], []
        for ov in checked:
            if p := check_key(ov.key, kinds, registry):
                problems.append(f"{ov.key_where}: {p}")
                bad.append(ov)
        good = [ov for ov in overrides if ov not in bad]  # the rest is still checked, for every problem at once
        try:
            recipe = load_recipe(ablation.recipe, [ov.arg for ov in good])
        except ConfigError as exc:
            return problems + [_map_line(line, good) for line in exc.lines], None
        except PluginLoadError as exc:
            return problems + [f"$: {exc}"], None
        return problems, None if problems else recipe

    # shared overrides first: their problems are reported once, and variants are checked without them
    shared_problems, _ = check(list(ablation.shared), list(ablation.shared))
    lines = [f"{where}: {p}" for p in shared_problems]
    shared = [ov for ov in ablation.shared if not any(p.startswith(ov.where) for p in shared_problems)]

    by_problem: dict[str, list[str]] = {}
    resolved: dict[str, tuple[Variant, Recipe, int, int]] = {}
    for variant in ablation.variants:
        overrides = shared + list(variant.overrides)
        problems, recipe = check(overrides, list(variant.overrides))
        if not problems:
            overrides = budget_overrides(ablation, recipe) + overrides
            try:
                recipe = load_recipe(ablation.recipe, [ov.arg for ov in overrides])
                recipe = attrs.evolve(recipe, train=attrs.evolve(recipe.train, seed=ablation.seeds[0]))
            except ConfigError as exc:
                problems = [_map_line(line, overrides) for line in exc.lines]
        if not problems:
            try:
                params, flops = _model_counts(recipe)
            except Exception as exc:  # noqa: BLE001 - a component that cannot be built is a user problem
                problems = [f"$: cannot build the model: {type(exc).__name__}: {exc}"]
            else:
                resolved[variant.name] = (variant, recipe, params, flops)
        for p in problems:
            by_problem.setdefault(p, []).append(variant.name)
    if by_problem or lines:
        n = len(ablation.variants)
        for p, names in by_problem.items():
            who = "all variants" if len(names) == n > 1 else ("variant " if len(names) == 1 else "variants ") + ", ".join(
                repr(x) for x in names)
            lines.append(f"{where}: {who}: {p}")
        raise ConfigError(lines)

    base_recipe = resolved[ablation.baseline][1]
    out = []
    for variant, recipe, params, flops in resolved.values():
        diff = () if variant.name == ablation.baseline else recipe_diff(recipe, base_recipe)
        out.append(Resolved(variant, recipe, report.VariantInfo(variant.name, diff, params, flops)))
    return out


def load_ablation(path: str | Path) -> tuple[Ablation, list[Resolved]]:
    """Parse and resolve an ablation file; raises ConfigError with every problem of the file and of every variant."""
    ablation, errors = _parse(Path(path))
    lines = [f"{path}: {e}" for e in errors]
    if ablation is not None:
        if not (ablation.steps or ablation.tokens):  # a broken budget: resolve with a stand-in, report the rest
            ablation = attrs.evolve(ablation, steps=1)
        try:
            resolved = resolve(ablation)
        except ConfigError as exc:
            lines += exc.lines
    if lines:
        raise ConfigError(lines)
    return ablation, resolved


# -- dry run -----------------------------------------------------------------------------------
def _budget_line(ablation: Ablation, resolved: list[Resolved]) -> str:
    steps = sorted({r.recipe.train.max_steps for r in resolved})
    what = f"{ablation.steps} steps" if ablation.steps else f"{report.si(ablation.tokens)} tokens ({'/'.join(map(str, steps))} steps)"
    n, s = len(resolved), len(ablation.seeds)
    return f"{n} variant{'s' * (n != 1)} x {s} seed{'s' * (s != 1)} = {n * s} runs of {what}, base recipe {ablation.recipe}"


def dry_run_text(ablation: Ablation, resolved: list[Resolved]) -> str:
    """Every variant with its parameters, FLOPs per token and differing keys."""
    lines = [f"ablation {ablation.name}: {_budget_line(ablation, resolved)}",
             f"seeds {', '.join(map(str, ablation.seeds))}; baseline {ablation.baseline}", ""]
    width = max(len("variant"), *(len(r.variant.name) + 2 for r in resolved))
    pw = max(len("params"), *(len(f"{r.info.params:,}") for r in resolved))
    lines.append(f"{'variant':<{width}}  {'params':>{pw}}  {'FLOPs/tok':>9}  differs from baseline")
    for r in resolved:
        name = r.variant.name + (" *" if r.variant.name == ablation.baseline else "")
        diff = "(baseline)" if r.variant.name == ablation.baseline else (", ".join(r.info.diff) or "(nothing)")
        lines.append(f"{name:<{width}}  {r.info.params:>{pw},}  {report.si(r.info.flops_per_token):>9}  {diff}")
    return "\n".join(lines)


# -- running -----------------------------------------------------------------------------------
@attrs.frozen
class Job:
    variant: str
    seed: int
    name: str
    recipe_text: str
    fingerprint: str


def plan_jobs(ablation: Ablation, resolved: list[Resolved]) -> list[Job]:
    """One job per (variant, seed), variants outermost; the fingerprint is a hash of the resolved recipe."""
    from .recipe import dump_recipe

    jobs = []
    for r in resolved:
        for seed in ablation.seeds:
            text = dump_recipe(_absolute_plugins(ablation, r.recipe_for(ablation, seed)))
            jobs.append(Job(r.variant.name, seed, ablation.run_name(r.variant.name, seed), text,
                            hashlib.sha256(text.encode()).hexdigest()[:16]))
    return jobs


def _absolute_plugins(ablation: Ablation, recipe: Recipe) -> Recipe:
    """Plugin files as absolute paths (validation found them from here), so the recipe copy in the
    output folder trains from any directory."""
    plugins = [str(Path(p).resolve()) if (p.endswith(".py") or "/" in p) and Path(p).is_file() else p
               for p in recipe.plugins]
    return attrs.evolve(recipe, plugins=plugins)


def resume_args(run_dir: Path) -> list[str] | None:
    """``train`` arguments that continue an interrupted run from its newest complete checkpoint,
    or None (no complete checkpoint) to start it over."""
    from .checkpoint import CheckpointError, check_resumable

    try:
        check_resumable(run_dir)
    except CheckpointError:
        return None
    return ["--resume", str(run_dir)]


def last_error_line(log_text: str) -> str | None:
    """The line that says why a run died: the exception line of a traceback, an ``error:`` line, or the last line."""
    lines = [ln.strip() for ln in log_text.replace("\r", "\n").splitlines() if ln.strip()]
    pattern = re.compile(r"^(error:|([A-Za-z_][\w.]*)?(Error|Exception|Interrupt|Exit)\b)")
    for ln in reversed(lines):
        if pattern.match(ln):
            return ln
    return lines[-1] if lines else None


def _gpus() -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        return [d.strip() for d in visible.split(",") if d.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


def child_env(slot: int, parallel: int, gpus: list[str]) -> dict[str, str]:
    """The environment of one training subprocess: its own rendezvous port, and with ``parallel > 1``
    its own GPU or its share of the CPU cores."""
    from .engine import free_port

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    root = str(Path(__file__).resolve().parent.parent)  # the same toolkit as this process, installed or not
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    env.update(PYTHONUNBUFFERED="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    # idle OpenMP threads sleep instead of spinning: on a shared CPU spinning made training ~10x slower
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if parallel > 1:
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[slot]
        else:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(max(1, cores // parallel))
    return env


class _State:
    """``state.json``: per run, the recipe fingerprint it ran with, its status and error."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.runs: dict[str, dict] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            self.runs = {}

    def get(self, name: str) -> dict:
        return self.runs.get(name, {})

    def set(self, name: str, **fields) -> None:
        self.runs[name] = {**self.runs.get(name, {}), **fields}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.runs, indent=1, sort_keys=True))
        tmp.replace(self.path)


def _header(ablation: Ablation, resolved: list[Resolved]) -> list[str]:
    lines = [ablation.description] if ablation.description else []
    lines += [
        _budget_line(ablation, resolved),
        f"seeds: {', '.join(map(str, ablation.seeds))}; baseline: {ablation.baseline}",
        f"ablation file: `{ablation.path}`; per-run recipes in `recipes/`, logs in `logs/`",
    ]
    return lines


def run_ablation(ablation: Ablation, resolved: list[Resolved], out: str | Path, *, parallel: int = 1,
                 progress: bool = True) -> list[report.RunResult]:
    """Train every (variant, seed) not already finished, refreshing the report after each; return all runs."""
    from tqdm import tqdm

    out = Path(out)
    for sub in ("recipes", "logs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ablation.path, out / "ablation.toml")
    state = _State(out / "state.json")
    gpus = _gpus() if parallel > 1 else []
    if gpus and parallel > len(gpus):
        from .cli import UsageError

        raise UsageError(f"--parallel {parallel} needs {parallel} GPUs (one per variant); {len(gpus)} visible")
    jobs = plan_jobs(ablation, resolved)
    infos = [r.info for r in resolved]
    results: dict[str, report.RunResult] = {}
    todo = []
    for job in jobs:
        run_dir = out / job.name
        seen = state.get(job.name)
        res = report.read_run(job.variant, job.seed, run_dir, status=seen.get("status", "pending"), error=seen.get("error"))
        if res.status == "finished" and seen.get("fingerprint") == job.fingerprint:
            results[job.name] = res
            continue
        results[job.name] = report.RunResult(job.variant, job.seed, str(run_dir), "pending")
        todo.append(job)

    def refresh() -> None:
        runs = [results[j.name] for j in jobs]
        report.write_report(out, infos, runs, baseline=ablation.baseline, title=ablation.name,
                            header=_header(ablation, resolved))

    refresh()
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc=ablation.name, unit="run", disable=not progress,
               dynamic_ncols=True)
    say = bar.write if progress else (lambda s: None)
    if len(todo) < len(jobs):
        say(f"{len(jobs) - len(todo)} of {len(jobs)} runs already finished with the same recipe; skipping them")
    active: dict[int, tuple[Job, subprocess.Popen, Any, float]] = {}
    queue = list(todo)
    started = 0

    def launch(slot: int, job: Job) -> None:
        nonlocal started
        run_dir = out / job.name
        seen = state.get(job.name)
        args = None
        if run_dir.exists():
            if seen.get("fingerprint") == job.fingerprint and seen.get("status") in ("running", "interrupted"):
                args = resume_args(run_dir)
            if args is None:
                shutil.rmtree(run_dir)  # a changed recipe, a failed run, or no way to resume: start over
        recipe_path = out / "recipes" / f"{job.name}.toml"
        recipe_path.write_text(job.recipe_text)
        cmd = [sys.executable, "-m", "toolkit", "train", str(recipe_path), "--run-dir", str(run_dir), *(args or [])]
        log = open(out / "logs" / f"{job.name}.log", "a" if args else "w")
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        # its own session: a Ctrl-C at the terminal reaches only this process, which then stops each
        # training with exactly one SIGTERM (a second signal would make it stop without a checkpoint)
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env(slot, parallel, gpus),
                                start_new_session=True)
        started += 1
        state.set(job.name, fingerprint=job.fingerprint, status="running", error=None, started=time.time())
        results[job.name] = report.RunResult(job.variant, job.seed, str(run_dir), "running")
        where = f" on GPU {gpus[slot]}" if gpus else ""
        say(f"start {job.name}{' (resuming)' if args else ''}{where}: run {started} of {len(todo)}, "
            f"{len(todo) - started} waiting")
        active[slot] = (job, proc, log, time.time())

    def finish(slot: int, rc: int) -> None:
        job, proc, log, t0 = active.pop(slot)
        log.close()
        run_dir = out / job.name
        res = report.read_run(job.variant, job.seed, run_dir, status="failed")
        error = None
        if res.status == "interrupted":  # stopped by a signal; the trainer saved a checkpoint to resume from
            error = f"interrupted (exit status {rc})"
            res = attrs.evolve(res, error=error)
        elif rc != 0 or res.status != "finished":
            log_text = (out / "logs" / f"{job.name}.log").read_text(errors="replace")
            if rc < 0:
                error = f"killed by signal {-rc}" + (" (out of memory?)" if -rc == 9 else "")
            else:
                error = res.error or last_error_line(log_text) or f"exit status {rc}"
            if rc == 0:
                error = f"the trainer exited without a finished summary.json ({error})"
            res = attrs.evolve(res, status="failed", error=error)
        results[job.name] = res
        state.set(job.name, status=res.status, error=error, returncode=rc, wall_s=round(time.time() - t0, 1))
        if res.status == "finished":
            loss = res.summary.get("final_val_loss")
            say(f"done  {job.name}: final val loss {loss:.4f}, {time.time() - t0:.0f}s" if isinstance(loss, (int, float))
                else f"done  {job.name}: {time.time() - t0:.0f}s")
        else:
            say(f"{res.status.upper()} {job.name}: {error} (log: {out / 'logs' / (job.name + '.log')})")
        bar.update(1)
        refresh()

    def on_term(signum, frame):  # a scheduler's SIGTERM stops the runs as Ctrl-C does
        raise KeyboardInterrupt

    old_term = signal.signal(signal.SIGTERM, on_term) if threading.current_thread() is threading.main_thread() else None
    try:
        while queue or active:
            for slot in range(parallel):
                if slot not in active and queue:
                    launch(slot, queue.pop(0))
            time.sleep(0.2)
            for slot, (_, proc, _, _) in list(active.items()):
                rc = proc.poll()
                if rc is not None:
                    finish(slot, rc)
    except BaseException:  # Ctrl-C, SIGTERM, or a bug here: never leave training processes behind
        for slot, (job, proc, log, _) in list(active.items()):
            proc.terminate()  # the trainer finishes its step and saves a checkpoint to resume from
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
            state.set(job.name, status="interrupted")
            results[job.name] = attrs.evolve(results[job.name], status="interrupted", error="interrupted")
        refresh()
        raise
    finally:
        bar.close()
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    return [results[j.name] for j in jobs]


def main(path: str, *, dry_run: bool = False, parallel: int = 1, out: str | None = None, progress: bool = True) -> int:
    """``playattention ablate``: validate, then print the plan or run it. 0 when every run finished, 1 otherwise."""
    from .cli import UsageError

    if parallel < 1:
        raise UsageError(f"--parallel must be at least 1, got {parallel}")
    ablation, resolved = load_ablation(path)
    if dry_run:
        print(dry_run_text(ablation, resolved))
        return 0
    out_dir = Path(out) if out else Path("ablations-out") / ablation.name
    runs = run_ablation(ablation, resolved, out_dir, parallel=parallel, progress=progress)
    failed = [r for r in runs if r.status != "finished"]
    print(f"report: {out_dir / 'report.md'}" + (f" ({len(failed)} of {len(runs)} runs failed)" if failed else ""))
    return 1 if failed else 0

