"""Errors are data until they are printed: a recipe's problems carry their path and origin as parts."""
from __future__ import annotations

from pathlib import Path

import pytest

from toolkit.errors import ConfigError, Problem, format_problem
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
