"""TOML recipes: the typed schema, composition (``extends``, ``--set``) and validation; no torch.

A recipe is one TOML file structured by the one converter (:func:`toolkit.converter.make_converter`)
into the frozen attrs classes of :mod:`.schema`. :func:`load_recipe` resolves it in this order:

1. read the file, then ``extends`` and ``--set`` (:mod:`.compose`: hardened reads, deep merges,
   which file or ``--set`` gave each value);
2. load the plugins (paths relative to the recipe file that names them), then structure and
   validate everything (:mod:`.validate`), collecting every problem, one line each, prefixed with
   the recipe path.

Whether the model builds is asked of torch, a layer above: :func:`toolkit.probe.load_buildable`
is this with the model built and probed on the meta device (``model_check``).
:mod:`.tree` holds the plain-data helpers (deep merge, flatten, differences, inline TOML).
"""
from __future__ import annotations

import itertools
from pathlib import Path

import attrs
import tomli_w

from ..converter import make_converter
from ..errors import ConfigError, Problem
from ..plugin_manager import is_path_spec, refusal
from .compose import (MAX_DEPTH, MAX_EXTENDS, MAX_PLUGINS, MAX_RECIPE_BYTES, _Sources, _top, overrides_table,
                      parse_override, read_toml, recipe_file, resolve_data, too_deep)
from .schema import (DataConfig, DeepSpeedConfig, GenerateConfig, LayerGroup, ModelConfig, Recipe, TrackersConfig,
                     TrainConfig, WandbConfig, select_layers)
from .tree import MISSING, _drop_none, deep_merge, diff_data, diff_lines, differences, flatten, toml_inline
from .validate import (SECTIONS, TRACKER_PACKAGES, ModelCheck, chosen_components, recipe_warnings, registry_of,
                       validate)

__all__ = [
    "MAX_DEPTH", "MAX_EXTENDS", "MAX_PLUGINS", "MAX_RECIPE_BYTES", "MISSING", "SECTIONS", "TRACKER_PACKAGES",
    "DataConfig", "DeepSpeedConfig", "GenerateConfig", "LayerGroup", "ModelCheck", "ModelConfig", "Recipe",
    "TrackersConfig", "TrainConfig", "WandbConfig",
    "chosen_components", "deep_merge", "diff_data", "diff_lines", "diff_recipes", "differences", "dump_recipe",
    "flatten", "load_for_reading", "load_recipe", "overrides_table", "parse_override", "read_toml", "recipe_file",
    "recipe_to_dict", "recipe_warnings", "registry_of", "resolve_data", "select_layers", "toml_inline", "too_deep",
    "validate",
]


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = (),
                plugins: list[str] | tuple[str, ...] = (), *, model_check: ModelCheck | None = None) -> Recipe:
    """Read, resolve and validate a recipe file (or a run folder's recipe.toml).

    ``overrides`` are ``--set`` strings (``"train.lr=3e-4"``), ``plugins`` extra plugin files or
    modules (``--plugin``), ``model_check`` the model's own check among the cross-field checks
    (:func:`toolkit.probe.load_buildable` passes one that builds it). Raises
    :class:`toolkit.errors.ConfigError` with every problem, one line each, prefixed with the recipe path.
    """
    sources = _Sources()
    data = resolve_data(path, overrides, plugins, _sources=sources)
    recipe, problems = validate(data, model_check)
    if problems:
        raise ConfigError(problems=[_with_origin(p, sources) for p in problems], file=_top(path)[1])
    return recipe


def load_for_reading(path: str | Path, overrides=(), plugins=()) -> tuple[Recipe | None, dict, list[str]]:
    """(recipe, its plain data, a line per plugin file not loaded) for commands that only show a recipe.

    Checked as :func:`load_recipe` checks, without building the model (no torch): `recipe validate`
    and the commands that build it use :func:`toolkit.probe.load_buildable`.

    A plugin file that may not run here (:func:`toolkit.plugin_manager.refusal`) is not imported:
    the data is then the recipe as written (``extends`` and ``--set`` applied), unchecked, since
    checking its components' options would run the plugin; the recipe is None.
    """
    data = resolve_data(path, overrides, plugins)
    held = [(i, p, why) for i, p in enumerate(data.get("plugins", []))
            if is_path_spec(p) and (why := refusal(Path(p)))]
    if not held:
        recipe = load_recipe(path, overrides, plugins)
        return recipe, recipe_to_dict(recipe), []
    return None, data, [f"$.plugins[{i}]: plugin \"{p}\" not loaded: {why}; the recipe is shown as written, unchecked "
                        f"(--trust-plugins loads and checks it)" for i, p, why in held]


def _with_origin(problem: Problem, sources: _Sources) -> Problem:
    """The problem with the base file or ``--set`` that gave its value, where that is not the recipe itself."""
    if problem.path is None:
        return problem
    keys = tuple(itertools.takewhile(lambda k: isinstance(k, str), problem.path))  # a table's, not an array item's
    return attrs.evolve(problem, origin=sources.lookup(keys))


def recipe_to_dict(recipe: Recipe) -> dict:
    """The fully resolved recipe as plain data (every component's options spelled out)."""
    return _drop_none(make_converter(registry_of(recipe)).unstructure(recipe))


def dump_recipe(recipe: Recipe) -> str:
    """The fully resolved recipe as TOML text; loading it gives back an equal recipe."""
    return tomli_w.dumps(recipe_to_dict(recipe))


def diff_recipes(a: Recipe, b: Recipe) -> list[str]:
    """``key: a -> b`` for every resolved key whose value differs (``(unset)`` where one has none)."""
    return diff_data(recipe_to_dict(a), recipe_to_dict(b))
