"""Errors are data until they are printed: a recipe's problems carry their path and origin as parts."""
from __future__ import annotations

from pathlib import Path

import attrs
import pytest
from attrs import validators as v

from toolkit.ablation import parse_ablation
from toolkit.converter import refusal
from toolkit.errors import ConfigError, InvalidValue, Problem, format_problem
from toolkit.recipe import load_recipe

TINY = Path(__file__).resolve().parent / "recipes" / "bases" / "tiny.toml"


def test_a_problem_is_formatted_in_one_place_with_file_path_and_origin():
    p = Problem(("model", "layers", "odd key", 0), "must be > 0, got -1", "base.toml")
    assert format_problem(p, "r.toml") == 'r.toml: $.model.layers."odd key"[0]: must be > 0, got -1 (from base.toml)'
    assert format_problem(Problem((), "an empty recipe")) == "$: an empty recipe"
    assert format_problem(Problem(None, "a line with no path")) == "a line with no path"


def test_config_error_keeps_plain_lines_and_problems_side_by_side():
    exc = ConfigError(["a plain line"], problems=[Problem(("train", "lr"), "bad")], file="r.toml")
    assert exc.lines == ["a plain line", "r.toml: $.train.lr: bad"]
    assert exc.problems == [Problem(None, "a plain line"), Problem(("train", "lr"), "bad")]
    assert ConfigError("one").lines == ["one"]


def test_a_recipe_error_carries_its_path_and_the_set_that_gave_the_value_as_data(tmp_path):
    child = tmp_path / "child.toml"
    child.write_text(f'extends = "{TINY.as_posix()}"\n')
    with pytest.raises(ConfigError) as info:
        load_recipe(child, ["train.lr=-1"])
    (problem,) = info.value.problems
    assert problem == Problem(("train", "lr"), "must be > 0, got -1.0", "--set train.lr=-1")
    assert info.value.file == str(child)
    assert info.value.lines == [f"{child}: $.train.lr: must be > 0, got -1.0 (from --set train.lr=-1)"]


def test_a_value_from_a_base_file_names_it_from_the_data_not_the_text(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a base file is named relative to the working folder
    base = tmp_path / "base.toml"
    base.write_text(f'extends = "{TINY.as_posix()}"\n[train]\nmin_lr = 1.0\n')
    child = tmp_path / "child.toml"
    child.write_text('extends = "base.toml"\n')
    with pytest.raises(ConfigError) as info:
        load_recipe(child)
    assert [(p.path, p.origin) for p in info.value.problems] == [(("train", "min_lr"), "base.toml")]


@attrs.define
class _C:
    x: object = None


def _field():
    return attrs.fields(_C).x


@pytest.mark.parametrize("validator, value, said", [
    (v.gt(0.0), -1.0, "must be > 0, got -1.0"),
    (v.le(1.5), 2.0, "must be <= 1.5, got 2.0"),
    (v.in_(("head", "all")), "heda", 'must be one of "head", "all", got "heda"; did you mean "head"?'),
    (v.instance_of(bool), 1, "expected bool, got 1"),
    (v.optional([v.instance_of(int), v.gt(0)]), 0, "must be > 0, got 0"),
    (v.optional(v.gt(0)), None, None),
    ([v.ge(0.0), v.lt(1.0)], 0.5, None),
])
def test_attrs_validators_are_read_by_their_parts_not_their_message(validator, value, said):
    assert refusal(validator, _field(), value) == said


def test_a_validator_says_its_message_as_data_and_a_plugins_leading_field_name_is_dropped():
    def ours(_, attribute, value):
        raise InvalidValue("must be odd, got 2", attribute.name)

    def a_plugins(_, attribute, value):
        raise ValueError(f"{attribute.name} must be a positive integer, got {value!r}")

    assert refusal(ours, _field(), 2) == "must be odd, got 2"
    assert str(InvalidValue("must be odd, got 2", "x")) == "x must be odd, got 2"  # built in Python: names its field
    assert refusal(a_plugins, _field(), 0) == "must be a positive integer, got 0"


def test_a_plugin_that_cannot_load_is_said_with_its_reason_as_data_whatever_its_file_is_called(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a plugin file is named relative to the working folder
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'extends = "{TINY.as_posix()}"\nplugins = ["why failed: here.py"]\n')
    with pytest.raises(ConfigError) as info:
        load_recipe(recipe)
    assert info.value.problems == [Problem(("plugins", 0), 'cannot load plugin "why failed: here.py": no such file')]


def test_an_ablation_baseline_of_the_wrong_type_is_said_once(tmp_path):
    path = tmp_path / "a.toml"
    path.write_text(f'recipe = "{TINY.as_posix()}"\nsteps = 1\nbaseline = 3\n[grid]\n"model.n_layer" = [1, 2]\n')
    with pytest.raises(ConfigError) as info:
        parse_ablation(path)
    assert info.value.lines == [f"{path}: $.baseline: expected string, got 3"]
