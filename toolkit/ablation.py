"""Ablation files: what to compare, read through the recipe converter and resolved into one recipe per variant.

The file (paths are relative to it; see docs/ablations.md)::

    name = "positions"               # optional; default: the file's stem. Names the output folder.
    description = "..."              # optional; copied into the report
    recipe = "../gpt-cpu.toml"       # the base recipe
    plugins = ["my_attention.py"]    # optional: plugin files or modules every variant may use
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
after their values (``rope``, ``rope-n_layer=4``). Plugin files named by ``plugins`` or by a
``plugins`` override are relative to the ablation file.

**The budget.** Every run gets ``train.max_steps = steps`` (with ``tokens = N``: N divided by the
variant's tokens per optimizer step, rounded up) and ``train.seed`` from ``seeds``; the same seed
gives every variant the same initialisation stream and data order. The schedule keeps its shape:
``warmup_steps`` and ``decay_steps`` scale by the ratio of the budget to the base recipe's
``max_steps``, and ``eval_interval = steps // evals`` so every curve has the same evaluation points.
A key you set yourself (``set`` or a variant's ``set``) is left as you set it.

**Validation.** The file itself goes through the recipe converter (:mod:`toolkit.converter`), so its
errors read like a recipe's. Then every variant's recipe is resolved, each with the registry of its
own plugins, and every problem in every variant is reported, one line each, at its place in the
ablation file::

    recipes/ablations/x.toml: all variants: $.grid."model.positon.kind": unknown key; did you mean "model.position.kind"?

:mod:`toolkit.ablate` runs what this module resolves.
"""
from __future__ import annotations

import difflib
import itertools
import math
import os
import re
import typing
from pathlib import Path
from typing import Any

import attrs
from attrs import validators as v

from . import families, report, scaling
from .converter import _show as _got  # a value as the recipe errors show it
from .converter import field_problems, make_converter, structure_fields
from .convert import check_init
from .engine import batch_plan
from .errors import ConfigError, PluginLoadError, Problem, UserError, format_path, format_problem
from .families import Spec
from .plugin_manager import default_registry, is_path_spec, load_registry
from .probe import load_buildable, model_counts
from .recipe import (MISSING, Recipe, differences, flatten, load_recipe, parse_override, read_toml,
                     recipe_to_dict, registry_of, toml_inline)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=,-]*$")
# recipe keys the ablation sets itself
RESERVED = {
    "train.max_steps": "the ablation sets it: use `steps = N` or `tokens = N` at the top of the file",
    "train.seed": "the ablation sets it: use `seeds = [...]` at the top of the file",
}


# -- the file's schema (structured by the recipe converter) -----------------------------------------
def _name(_, attribute, value):
    if value is not None and not NAME_RE.match(value):
        raise ValueError(f"expected a name of letters, digits and ._+=,- , got {_got(value)}")


def _unique(_, attribute, value):
    if not value:
        raise ValueError(f"expected a non-empty array of ints, got {_got(value)}")
    if len(set(value)) != len(value):
        raise ValueError(f"repeats a seed: {_got(value)}")


@attrs.frozen
class VariantTable:
    """One ``[[variant]]``: a name and its overrides."""

    name: str = attrs.field(validator=_name)
    set: Any = attrs.Factory(dict)  # a table of "dotted.key" = value, or an array of "dotted.key=value"


def _widths(_, attribute, value):
    if len(set(value)) != len(value) or any(w <= 0 for w in value):
        raise ValueError(f"expected distinct positive widths, got {_got(value)}")


@attrs.frozen
class RungTable:
    """One ``[[scale.rung]]``: a model size given as overrides."""

    name: str = attrs.field(validator=_name)
    set: Any = attrs.Factory(dict)


@attrs.frozen
class ScaleTable:
    """``[scale]``: the ladder of model sizes every variant runs at, and the budget rule per rung."""

    widths: list[int] = attrs.field(factory=list, validator=_widths)  # model.n_embd of each rung
    head_dim: int | None = attrs.field(default=None, validator=v.optional(v.gt(0)))  # n_head = width / head_dim
    n_layer: int | None = attrs.field(default=None, validator=v.optional(v.gt(0)))  # the same depth at every rung
    aspect: int | None = attrs.field(default=None, validator=v.optional(v.gt(0)))  # n_layer = width / aspect
    rung: list[RungTable] = attrs.Factory(list)  # or explicit rungs, each a set of overrides
    # the budget: tokens = k x the parameters of the baseline at each rung (Chinchilla: k about 20)
    tokens_per_param: float | None = attrs.field(default=None, validator=v.optional(v.gt(0)))


@attrs.frozen
class AblationFile:
    """An ablation file as written."""

    recipe: str
    name: str | None = attrs.field(default=None, validator=_name)
    description: str = ""
    plugins: list[str] = attrs.Factory(list)
    steps: int | None = attrs.field(default=None, validator=v.optional(v.gt(0)))
    tokens: int | None = attrs.field(default=None, validator=v.optional(v.gt(0)))
    seeds: list[int] = attrs.field(factory=lambda: [1337], validator=_unique)
    evals: int = attrs.field(default=10, validator=v.gt(0))
    set: Any = attrs.Factory(list)
    baseline: str | None = None
    grid: dict[str, Any] = attrs.Factory(dict)
    variant: list[VariantTable] = attrs.Factory(list)
    # a run or Hugging Face folder every run starts from (train --init-from; relative to this file):
    # then the variants may change the training, not the model
    init_from: str | None = None
    scale: ScaleTable | None = None  # a size sweep: every variant at every rung


# -- what the file means ----------------------------------------------------------------------------
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
class Rung:
    """One size of a sweep: its name and the overrides that make it."""

    name: str
    overrides: tuple[Override, ...]


@attrs.frozen
class Scale:
    """A size sweep: the rungs, how they were made, and the budget rule (None: the file's steps or tokens)."""

    rungs: tuple[Rung, ...]
    rule: str  # e.g. "n_embd in 64, 96, 128; n_head = n_embd / 32; n_layer = 4"
    tokens_per_param: float | None = None


@attrs.frozen
class Ablation:
    """A parsed ablation file (nothing resolved yet)."""

    path: Path
    name: str
    description: str
    recipe: Path
    plugins: tuple[str, ...]  # absolute paths of plugin files, or module names
    steps: int | None
    tokens: int | None
    seeds: tuple[int, ...]
    evals: int
    shared: tuple[Override, ...]
    variants: tuple[Variant, ...]
    baseline: str
    init_from: Path | None = None  # the folder every run's weights start from
    scale: Scale | None = None  # a size sweep: every variant runs at every rung as "<variant>@<rung>"

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
def _show(value: Any) -> str:
    """A value for people: strings bare, the rest as TOML."""
    return value if isinstance(value, str) else toml_inline(value)


# -- the recipe schema, for checking override keys ---------------------------------------------
def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, f.type) for f in attrs.fields(cls)}


def _is_table(tp: Any) -> bool:
    return tp is dict or typing.get_origin(tp) is dict


def _spec_family(tp: Any) -> str | None:
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


def chosen_kinds(recipe: Recipe) -> dict[str, str]:
    """The kind the recipe chooses in every family it holds one of."""
    out = {}
    for fam in families.FAMILIES:
        if fam.where and not fam.many:
            holder = getattr(recipe, fam.section) if fam.section else recipe
            out[fam.name] = getattr(holder, fam.key).kind
    return out


def _apply_kinds(kinds: dict[str, str], overrides) -> dict[str, str]:
    """The component kinds after these overrides (``model.attention = "gqa"``, ``... = {kind=...}``, ``....kind``)."""
    kinds = dict(kinds)
    places = {fam.where: fam.name for fam in families.FAMILIES if fam.where and not fam.many}
    for ov in overrides:
        if ov.key in places:
            if isinstance(ov.value, str):
                kinds[places[ov.key]] = ov.value
            elif isinstance(ov.value, dict) and isinstance(ov.value.get("kind"), str):
                kinds[places[ov.key]] = ov.value["kind"]
        elif ov.key.endswith(".kind") and ov.key[:-5] in places and isinstance(ov.value, str):
            kinds[places[ov.key[:-5]]] = ov.value
    return kinds


# -- parsing -----------------------------------------------------------------------------------
def parse_overrides(value: Any, where: str, errors: list[str], base: Path) -> list[Override]:
    """A ``set``: a table of ``"dotted.key" = value`` or an array of ``"dotted.key=value"`` strings.

    Plugin files in a ``plugins`` override are made absolute, relative to ``base`` (the ablation file's folder).
    """
    out: list[Override] = []
    if isinstance(value, dict):
        for k, val in value.items():
            for key, item in _subkeys(k, val):
                loc = f'{where}."{key}"'
                out.append(Override(key, toml_inline(item), item, loc, loc))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            loc = f"{where}[{i}]"
            if not isinstance(item, str) or "=" not in item or not all(k.strip() for k in item.split("=", 1)[0].split(".")):
                errors.append(f'{loc}: expected "dotted.key=value", got {_got(item)}')
                continue
            keys, parsed = parse_override(item)
            out.append(Override(".".join(keys), item.split("=", 1)[1].strip(), parsed, loc, loc))
    else:
        errors.append(f'{where}: expected a table of "dotted.key" = value or an array of "dotted.key=value", got {_got(value)}')
    return [_absolute_plugins(ov, base) for ov in out]


def _absolute_plugins(ov: Override, base: Path) -> Override:
    if ov.key != "plugins" or not isinstance(ov.value, list):
        return ov
    value = [str((base / p).resolve()) if isinstance(p, str) and is_path_spec(p) else p for p in ov.value]
    return attrs.evolve(ov, value=value, text=toml_inline(value))


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


def _flatten_grid(data: dict) -> None:
    """``[grid] model.position.kind = [...]`` (unquoted dotted keys nest in TOML) back to one dotted key."""
    grid = data.get("grid")
    if isinstance(grid, dict):
        flat = {}
        for key, values in grid.items():
            flat.update(_subkeys(key, values) if isinstance(values, dict) and values else [(key, values)])
        data["grid"] = flat


#: the keys of an ablation file that ``ablate --set`` changes (the budget); any other key is a recipe's
BUDGET_KEYS = ("steps", "tokens", "seeds", "evals")


def _cli_overrides(data: dict, sets: list[str] | tuple[str, ...], errors: list[str]) -> list[Override]:
    """``ablate --set``: a budget key replaces the file's (``steps=50``; steps and tokens exclude each
    other); any other key is a recipe override for every variant, after the file's ``set``."""
    out = []
    for item in sets:
        if "=" not in item or not all(k.strip() for k in item.split("=", 1)[0].split(".")):
            errors.append(f'--set {item}: expected "dotted.key=value"')
            continue
        keys, parsed = parse_override(item)
        key = ".".join(keys)
        if key in BUDGET_KEYS:
            data.pop({"steps": "tokens", "tokens": "steps"}.get(key, ""), None)
            if key in ("steps", "tokens") and isinstance(data.get("scale"), dict):
                data["scale"].pop("tokens_per_param", None)  # one budget rule: the one given here
            data[key] = parsed
        else:
            loc = f"--set {item}"
            out.append(_absolute_plugins(Override(key, item.split("=", 1)[1].strip(), parsed, loc, loc), Path.cwd()))
    return out


def _parse(path: Path, sets: list[str] | tuple[str, ...] = ()) -> tuple[Ablation | None, list[str]]:
    """The ablation and the problems with its structure; None where it is too broken to resolve.
    ``sets``: ``ablate --set`` strings (:func:`_cli_overrides`)."""
    if not path.is_file():
        raise ConfigError([f"{path}: no such ablation file"])
    data = read_toml(path)
    _flatten_grid(data)
    cli_errors: list[str] = []
    cli = _cli_overrides(data, sets, cli_errors)
    kwargs, errs = structure_fields(make_converter(default_registry()), data, AblationFile)
    refused = field_problems(errs)
    errors = cli_errors + [format_problem(p) for p in refused]
    given = {k: kwargs.get(k, getattr(attrs.fields(AblationFile), k).default) for k in attrs.fields_dict(AblationFile)}
    given = {k: (val.factory() if isinstance(val, attrs.Factory) else val) for k, val in given.items()}

    recipe_path = Path()
    if "recipe" in kwargs:
        recipe_path = Path(os.path.normpath(path.parent / kwargs["recipe"]))
        if not recipe_path.is_file():
            errors.append(f"$.recipe: no such file: {recipe_path}")
    init_from = None
    if given["init_from"] is not None:
        init_from = Path(os.path.normpath(path.parent / given["init_from"]))
        if not init_from.is_dir():
            errors.append(f"$.init_from: no such folder: {init_from}")
    per_param = isinstance(data.get("scale"), dict) and "tokens_per_param" in data["scale"]
    if per_param and ("steps" in data or "tokens" in data):
        errors.append("$.scale.tokens_per_param: give one budget rule: steps, tokens or scale.tokens_per_param")
    elif "steps" in data and "tokens" in data:
        errors.append("$.tokens: give either steps or tokens, not both")
    elif "steps" not in data and "tokens" not in data and not per_param:
        errors.append("$: no budget: add steps = N or tokens = N (every variant trains for the same budget)")
    plugins = tuple(str((path.parent / p).resolve()) if is_path_spec(p) else p for p in given["plugins"])

    shared = parse_overrides(given["set"], "$.set", errors, path.parent) + cli
    variants: list[Variant] = []
    axes = []
    for key, values in given["grid"].items():
        if not isinstance(values, list) or not values:
            errors.append(f'$.grid."{key}": expected a non-empty array of values, got {_got(values)}')
        else:
            axes.append((key, values))
    if axes:
        for combo in itertools.product(*(range(len(vals)) for _, vals in axes)):
            ovs, labels = [], []
            for (key, values), i in zip(axes, combo):
                ovs.append(_absolute_plugins(
                    Override(key, toml_inline(values[i]), values[i], f'$.grid."{key}"[{i}]', f'$.grid."{key}"'), path.parent))
                labels.append(_label(key, values[i]))
            variants.append(Variant("-".join(labels), tuple(ovs)))
    for i, item in enumerate(given["variant"]):
        variants.append(Variant(item.name, tuple(parse_overrides(item.set, f"$.variant[{i}].set", errors, path.parent))))

    if not variants and not errors:
        errors.append("$: no variants: add a [grid] table or [[variant]] tables")
    seen: dict[str, int] = {}
    for variant in variants:
        seen[variant.name] = seen.get(variant.name, 0) + 1
    for vname, n in seen.items():
        if n > 1:
            errors.append(f"$: variant name {vname!r} is used {n} times; names must be unique")
    baseline = given["baseline"] if given["baseline"] is not None else (variants[0].name if variants else "")
    if variants and baseline not in seen and ("baseline",) not in {p.path for p in refused}:
        hint = difflib.get_close_matches(baseline, list(seen), n=1)
        errors.append(f"$.baseline: no variant named {baseline!r}" + (f"; did you mean {hint[0]!r}?" if hint else "")
                      + f" (variants: {', '.join(seen)})")
    scale = _parse_scale(given["scale"], errors, path.parent) if given["scale"] is not None else None
    if not (recipe_path.is_file() and variants and baseline in seen):
        return None, errors
    return Ablation(path, given["name"] or path.stem, given["description"], recipe_path, plugins, given["steps"],
                    given["tokens"], tuple(given["seeds"]), given["evals"], tuple(shared), tuple(variants),
                    baseline, init_from, scale), errors


def _parse_scale(table: ScaleTable, errors: list[str], base: Path) -> Scale | None:
    """The rungs of ``[scale]``: from widths by its rule (head_dim, n_layer or aspect), or explicit ``[[scale.rung]]``s."""
    n = len(errors)
    if table.widths and table.rung:
        errors.append("$.scale.rung: give widths or [[scale.rung]] tables, not both")
    elif len(table.widths) + len(table.rung) < 2:
        errors.append(f"$.scale: a sweep needs at least 2 rungs (widths = [...] or [[scale.rung]] tables), "
                      f"got {len(table.widths) + len(table.rung)}")
    if table.rung:
        for key in ("head_dim", "n_layer", "aspect"):
            if getattr(table, key) is not None:
                errors.append(f"$.scale.{key}: a rule for widths; [[scale.rung]] tables set what they change themselves")
    if table.n_layer is not None and table.aspect is not None:
        errors.append("$.scale.aspect: give the depth as n_layer (fixed) or aspect (n_layer = width / aspect), not both")
    rungs, rule = [], []
    for i, w in enumerate(table.widths):
        at = f"$.scale.widths[{i}]"
        sets = {"model.n_embd": (w, "$.scale.widths")}
        if table.head_dim is not None:
            sets["model.n_head"] = (w // table.head_dim, "$.scale.head_dim")
            if w % table.head_dim:
                errors.append(f"{at}: {w} is not a multiple of head_dim {table.head_dim}")
        if table.aspect is not None:
            sets["model.n_layer"] = (w // table.aspect, "$.scale.aspect")
            if w % table.aspect:
                errors.append(f"{at}: {w} is not a multiple of aspect {table.aspect} (n_layer = width / aspect)")
        elif table.n_layer is not None:
            sets["model.n_layer"] = (table.n_layer, "$.scale.n_layer")
        ovs = [Override(k, str(val), val, at + ("" if k == "model.n_embd" else f" (sets {k}={val})"), key_at)
               for k, (val, key_at) in sets.items()]
        rungs.append(Rung(f"w{w}", tuple(ovs)))
    if table.widths:
        rule = [f"n_embd in {', '.join(map(str, table.widths))}"]
        rule += [f"n_head = n_embd / {table.head_dim}"] * (table.head_dim is not None)
        rule += ([f"n_layer = n_embd / {table.aspect}"] if table.aspect is not None
                 else [f"n_layer = {table.n_layer}"] if table.n_layer is not None else ["n_layer from the recipe"])
    for i, item in enumerate(table.rung):
        rungs.append(Rung(item.name, tuple(parse_overrides(item.set, f"$.scale.rung[{i}].set", errors, base))))
    if table.rung:
        rule = [f"rungs {', '.join(r.name for r in rungs)} as [[scale.rung]] sets"]
    names = [r.name for r in rungs]
    for name in sorted({x for x in names if names.count(x) > 1}):
        errors.append(f"$.scale.rung: rung name {name!r} is used {names.count(name)} times; names must be unique")
    if len(errors) > n:
        return None
    return Scale(tuple(rungs), "; ".join(rule), table.tokens_per_param)


# -- resolving ---------------------------------------------------------------------------------
def _map_lines(exc: ConfigError, overrides: list[Override], blamed: list[Override] | None = None) -> list[str]:
    """The lines of a recipe's error, each that an override caused moved to that override's place in the
    ablation file (and that override added to ``blamed``)."""
    return [_map_problem(p, line, overrides, blamed) for p, line in zip(exc.problems, exc.lines)]


def _map_problem(problem: Problem, line: str, overrides: list[Override], blamed: list[Override] | None) -> str:
    if not problem.path:
        return line
    dotted = format_path(problem.path, root="")[1:].replace('"', "")
    best = None
    for ov in overrides:  # the last matching override wins, as it does when applied
        if dotted == ov.key or dotted.startswith(ov.key + ".") or dotted.startswith(ov.key + "["):
            if best is None or len(ov.key) >= len(best.key):
                best = ov
    if best is None:
        return line
    if blamed is not None:
        blamed.append(best)
    origin = problem.origin if problem.origin and not problem.origin.startswith("--set ") else None  # the --set is the override
    return best.where + dotted[len(best.key):] + ": " + format_problem(attrs.evolve(problem, path=None, origin=origin))


def budget_overrides(ablation: Ablation, recipe: Recipe) -> list[Override]:
    """The overrides that give ``recipe`` the ablation's budget: max_steps, warmup and decay scaled
    with it, and the eval interval. Overrides in the file come after them, so they win."""
    t = recipe.train
    steps = ablation.steps or math.ceil(ablation.tokens / batch_plan(recipe).tokens_per_step)
    ratio = steps / t.max_steps
    values: dict[str, int] = {"max_steps": steps, "warmup_steps": min(round(t.warmup_steps * ratio), steps - 1)}
    if t.decay_steps is not None:
        values["decay_steps"] = max(1, round(t.decay_steps * ratio))
    values["eval_interval"] = max(1, steps // ablation.evals)
    at = "$.steps" if ablation.steps else "$.tokens"
    return [Override(f"train.{k}", str(val), val, f"{at} (sets train.{k}={val})", at) for k, val in values.items()]


def recipe_diff(recipe: Recipe, baseline: Recipe) -> tuple[str, ...]:
    """``key=value`` for each setting of ``recipe`` that differs from ``baseline`` (name, description
    and seed aside). Where a component's kind changed, its options are listed only where they differ
    from that kind's defaults."""
    mine, base = flatten(recipe_to_dict(recipe)), flatten(recipe_to_dict(baseline))
    registry = registry_of(recipe)
    converter = make_converter(registry)
    changed_kind = {}  # recipe place of a component whose kind changed -> that kind's default options
    places = [(fam.where, fam.name) for fam in families.FAMILIES if fam.where and not fam.many]
    places += [(f"model.layers.{group}.{name}", name) for group in recipe.model.layers for name in families.PER_LAYER]
    for where, name in places:
        kind = mine.get(f"{where}.kind")
        if kind != base.get(f"{where}.kind") and (name, kind) in registry:
            changed_kind[where] = flatten(converter.unstructure(registry.get(name, kind).options()))
    out = []
    for key, value, _ in differences(mine, base):
        if key in ("name", "description", "train.seed"):
            continue
        if value is MISSING:
            if not any(key.startswith(w + ".") for w in changed_kind):
                out.append(f"{key}=(unset)")
            continue
        place = next((w for w in changed_kind if key.startswith(w + ".") and key != f"{w}.kind"), None)
        if place is not None and changed_kind[place].get(key[len(place) + 1:], MISSING) == value:
            continue  # the new kind's default
        out.append(f"{key}={_show(value)}")
    return tuple(out)


def _check_variant(ablation: Ablation, base: Recipe, overrides: list[Override], checked: list[Override],
                   blamed: list[Override] | None = None) -> tuple[list[str], Recipe | None]:
    """The recipe with all of ``overrides``, or the problems with the keys of ``checked``, or with the recipe
    (each override a problem is said at is added to ``blamed``).

    Each variant is checked against the registry of its own plugins (the base recipe's, the
    file's, and its own ``plugins`` override): a kind that one variant's plugin file provides
    never validates another variant.
    """
    plugins = [*base.plugins, *ablation.plugins]
    for ov in overrides:
        if ov.key == "plugins" and isinstance(ov.value, list):
            plugins = [*ablation.plugins, *(p for p in ov.value if isinstance(p, str))]
    try:
        registry = load_registry(plugins)
    except PluginLoadError as exc:
        at = next((o for o in overrides if o.key == "plugins"), None)
        if at is not None and blamed is not None:
            blamed.append(at)
        return [f"{at.where if at else '$.plugins'}: {exc}"], None
    kinds = _apply_kinds(chosen_kinds(base), overrides)
    problems, bad = [], []
    for ov in checked:
        if p := check_key(ov.key, kinds, registry):
            problems.append(f"{ov.key_where}: {p}")
            bad.append(ov)
    if blamed is not None:  # a rung's key problem is said at the rung, not at the override's value
        blamed += [ov for ov in bad if ov.key_where.startswith(ov.where)]
    good = [ov for ov in overrides if ov not in bad]  # the rest is still checked, for every problem at once
    try:
        recipe = load_buildable(ablation.recipe, [ov.arg for ov in good], plugins=ablation.plugins)
    except ConfigError as exc:
        return problems + _map_lines(exc, good, blamed), None
    return problems, None if problems else recipe


def resolve(ablation: Ablation) -> list[Resolved]:
    """Every variant's recipe, validated, with its budget, differences, parameters and FLOPs.

    Raises ConfigError listing every problem of every variant (identical problems merged)."""
    if ablation.scale is not None:
        return resolve_scaled(ablation)
    where = str(ablation.path)
    try:
        base = load_buildable(ablation.recipe, plugins=ablation.plugins)
    except ConfigError as exc:
        raise _ResolveError(where, [(None, f"base recipe {ablation.recipe}: {line}") for line in exc.lines]) from None

    # shared overrides first: their problems are reported once, and variants are checked without them
    blamed: list[Override] = []
    shared_problems, _ = _check_variant(ablation, base, list(ablation.shared), list(ablation.shared), blamed)
    said: list[tuple[str | None, str]] = [(None, p) for p in shared_problems]
    shared = [ov for ov in ablation.shared if ov not in blamed]

    by_problem: dict[str, list[str]] = {}
    resolved: dict[str, tuple[Variant, Recipe, int, int]] = {}
    for variant in ablation.variants:
        overrides = shared + list(variant.overrides)
        problems, recipe = _check_variant(ablation, base, overrides, list(variant.overrides))
        if not problems:
            overrides = budget_overrides(ablation, recipe) + overrides
            try:
                # the budget sets train keys only: the model, built and checked just above, is the same
                recipe = load_recipe(ablation.recipe, [ov.arg for ov in overrides], plugins=ablation.plugins)
                recipe = attrs.evolve(recipe, train=attrs.evolve(recipe.train, seed=ablation.seeds[0]))
            except ConfigError as exc:
                problems = _map_lines(exc, overrides)
        if not problems:
            try:
                params, flops = model_counts(recipe)
            except Exception as exc:  # noqa: BLE001 - a component that cannot be built is a user problem
                problems = [f"$: cannot build the model: {type(exc).__name__}: {exc}"]
            else:
                resolved[variant.name] = (variant, recipe, params, flops)
        for p in problems:
            by_problem.setdefault(p, []).append(variant.name)
    if by_problem or said:
        n = len(ablation.variants)
        for p, names in by_problem.items():
            who = "all variants" if len(names) == n > 1 else ("variant " if len(names) == 1 else "variants ") + ", ".join(
                repr(x) for x in names)
            said.append((who, p))
        raise _ResolveError(where, said)

    base_recipe = resolved[ablation.baseline][1]
    out = []
    for variant, recipe, params, flops in resolved.values():
        diff = () if variant.name == ablation.baseline else recipe_diff(recipe, base_recipe)
        out.append(Resolved(variant, recipe, report.VariantInfo(variant.name, diff, params, flops)))
    return out


def at_rung(ablation: Ablation, rung: Rung) -> Ablation:
    """The ablation at one rung, without a sweep: variants named ``<variant>@<rung>``, the rung's overrides
    before the shared ones (a ``set`` or ``ablate --set`` of yours wins)."""
    return attrs.evolve(ablation, scale=None, shared=(*rung.overrides, *ablation.shared),
                        variants=tuple(Variant(f"{x.name}@{rung.name}", x.overrides) for x in ablation.variants),
                        baseline=f"{ablation.baseline}@{rung.name}")


class _ResolveError(ConfigError):
    """:func:`resolve`'s problems, each with the variants it is said for (None: said once, for the
    file or its shared overrides), kept as parts so that a rung's can be merged (:func:`_named_once`)."""

    def __init__(self, where: str, said: list[tuple[str | None, str]]):
        self.said = said
        super().__init__([f"{where}: {who}: {p}" if who else f"{where}: {p}" for who, p in said])


def _named_once(exc: ConfigError) -> list[str]:
    """A rung's problem once: a rung's overrides are shared by its variants, so the recipe reports a problem
    they cause both for the shared overrides and for each variant; keep the line that names the variants (and so the rung)."""
    if not isinstance(exc, _ResolveError):
        return exc.lines
    named = {p for who, p in exc.said if who}
    return [line for (who, p), line in zip(exc.said, exc.lines) if who or p not in named]


def resolve_scaled(ablation: Ablation) -> list[Resolved]:
    """Every variant at every rung, rung by rung; with ``tokens_per_param`` each rung's budget is k times
    the parameters of the baseline there, the same tokens for every variant of the rung."""
    plain = attrs.evolve(ablation, scale=None)
    # the variants at the base recipe's size first, so a variant's own problem is reported once, not once per rung
    resolve(plain if plain.steps or plain.tokens else attrs.evolve(plain, steps=1))
    out, lines = [], []
    for rung in ablation.scale.rungs:
        sub = at_rung(plain, rung)
        try:
            if ablation.scale.tokens_per_param is not None:
                base = [x for x in sub.variants if x.name == sub.baseline]
                (first,) = resolve(attrs.evolve(sub, steps=1, variants=tuple(base)))
                sub = attrs.evolve(sub, steps=None, tokens=math.ceil(ablation.scale.tokens_per_param * first.info.params))
            done = resolve(sub)
        except ConfigError as exc:
            lines += [ln for ln in _named_once(exc) if ln not in lines]
            continue
        for r, variant in zip(done, ablation.variants):
            out.append(attrs.evolve(r, info=attrs.evolve(r.info, group=variant.name, rung=rung.name)))
    if lines:
        raise ConfigError(lines)
    return out


def load_ablation(path: str | Path, sets: list[str] | tuple[str, ...] = ()) -> tuple[Ablation, list[Resolved]]:
    """Parse and resolve an ablation file (with ``ablate --set`` strings); raises ConfigError with every
    problem of the file and of every variant."""
    ablation, errors = _parse(Path(path), sets)
    lines = [f"{path}: {e}" for e in errors]
    if ablation is not None:
        per_param = ablation.scale is not None and ablation.scale.tokens_per_param is not None
        if not (ablation.steps or ablation.tokens or per_param):  # a broken budget: resolve with a stand-in, report the rest
            ablation = attrs.evolve(ablation, steps=1)
        try:
            resolved = resolve(ablation)
        except ConfigError as exc:
            lines += exc.lines
        else:
            lines += _init_problems(ablation, resolved)
    if lines:
        raise ConfigError(lines)
    return ablation, resolved


def _init_problems(ablation: Ablation, resolved: list[Resolved]) -> list[str]:
    """With init_from, every variant must keep the model of the folder it starts from (one line per difference)."""
    if ablation.init_from is None or not ablation.init_from.is_dir():
        return []
    lines = []
    for r in resolved:
        try:
            check_init(ablation.init_from, r.recipe.model, r.recipe.plugins)
        except (ConfigError, UserError) as exc:
            lines += [f"{ablation.path}: variant {r.variant.name!r}: {line}" for line in str(exc).splitlines()]
    return lines


# -- dry run -----------------------------------------------------------------------------------
def budget_line(ablation: Ablation, resolved: list[Resolved]) -> str:
    if ablation.scale is not None:
        return scale_budget_line(ablation, resolved)
    steps = sorted({r.recipe.train.max_steps for r in resolved})
    what = f"{ablation.steps} steps" if ablation.steps else f"{report.si(ablation.tokens)} tokens ({'/'.join(map(str, steps))} steps)"
    n, s = len(resolved), len(ablation.seeds)
    return f"{n} variant{'s' * (n != 1)} x {s} seed{'s' * (s != 1)} = {n * s} runs of {what}, base recipe {ablation.recipe}"


def dry_run_text(ablation: Ablation, resolved: list[Resolved]) -> str:
    """Every variant with its parameters, FLOPs per token and differing keys."""
    if ablation.scale is not None:
        return scale_dry_run_text(ablation, resolved)
    lines = [f"ablation {ablation.name}: {budget_line(ablation, resolved)}",
             f"seeds {', '.join(map(str, ablation.seeds))}; baseline {ablation.baseline}", ""]
    width = max(len("variant"), *(len(r.variant.name) + 2 for r in resolved))
    pw = max(len("params"), *(len(f"{r.info.params:,}") for r in resolved))
    lines.append(f"{'variant':<{width}}  {'params':>{pw}}  {'FLOPs/tok':>9}  differs from baseline")
    for r in resolved:
        name = r.variant.name + (" *" if r.variant.name == ablation.baseline else "")
        diff = "(baseline)" if r.variant.name == ablation.baseline else (", ".join(r.info.diff) or "(nothing)")
        lines.append(f"{name:<{width}}  {r.info.params:>{pw},}  {report.si(r.info.flops_per_token):>9}  {diff}")
    return "\n".join(lines)


def scale_budget_line(ablation: Ablation, resolved: list[Resolved]) -> str:
    sc = ablation.scale
    nv, nr, s = len(ablation.variants), len(sc.rungs), len(ablation.seeds)
    what = (f"tokens = {sc.tokens_per_param:g} x the baseline's parameters at each rung" if sc.tokens_per_param
            else f"{ablation.steps} steps" if ablation.steps else f"{report.si(ablation.tokens)} tokens")
    return (f"{nv} variant{'s' * (nv != 1)} x {nr} rungs x {s} seed{'s' * (s != 1)} = {nv * nr * s} runs, "
            f"{what}; rungs: {sc.rule}; base recipe {ablation.recipe}")


def scale_dry_run_text(ablation: Ablation, resolved: list[Resolved]) -> str:
    """Every run of a sweep: its size, budget and training FLOPs (3 x forward, as `inspect` counts), and the total."""
    lines = [f"ablation {ablation.name}: {budget_line(ablation, resolved)}",
             f"seeds {', '.join(map(str, ablation.seeds))}; baseline {ablation.baseline} (at each rung)", ""]
    rows = []
    total = 0.0
    for r in resolved:
        tokens = r.recipe.train.max_steps * batch_plan(r.recipe).tokens_per_step
        flops = scaling.train_flops(r.info.flops_per_token, tokens)
        total += flops * len(ablation.seeds)
        diff = "(baseline)" if r.info.group == ablation.baseline else (", ".join(r.info.diff) or "(nothing)")
        rows.append([r.variant.name, f"{r.info.params:,}", report.si(r.info.flops_per_token), f"{r.recipe.train.max_steps:,}",
                     report.si(tokens), f"{tokens / r.info.params:.2g}", f"{flops:.3g}", diff])
    head = ["run", "params", "FLOPs/tok", "steps", "tokens", "tok/param", "train FLOPs", "differs from baseline"]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    lines.append("  ".join(h.ljust(w) if i in (0, 7) else h.rjust(w) for i, (h, w) in enumerate(zip(head, widths))).rstrip())
    for row in rows:
        lines.append("  ".join(c.ljust(w) if i in (0, 7) else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip())
    lines += ["", f"total: {total:.3g} training FLOPs over {len(resolved) * len(ablation.seeds)} runs "
                  f"(each run above once per seed)"]
    return "\n".join(lines)
