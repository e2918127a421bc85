"""The broken-recipe corpus: each file in tests/recipes/broken/ names the error lines it must produce.

In each file, ``# expect: MESSAGE`` is one whole error line after the ``<recipe path>: `` prefix,
``# expect-start: MESSAGE`` the start of one (for messages that list registered components, which
other plugins extend), ``{path}`` stands for the recipe path, and ``# set: KEY=VALUE`` is passed
as a ``--set`` override. The file must produce exactly these lines, no more.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from toolkit.cli import main
from toolkit.errors import ConfigError
from toolkit.probe import load_buildable
from toolkit.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent
BROKEN = sorted((ROOT / "tests" / "recipes" / "broken").glob("*.toml"))


def _expectations(text: str) -> tuple[list[str], list[str], list[str]]:
    exact = re.findall(r"^# expect: (.+)$", text, re.M)
    starts = re.findall(r"^# expect-start: (.+)$", text, re.M)
    sets = re.findall(r"^# set: (.+)$", text, re.M)
    return exact, starts, sets


def _line(expect: str, rel: str) -> str:
    return expect.format(path=rel) if "{path}" in expect else f"{rel}: {expect}"


def test_corpus_has_at_least_thirty_broken_recipes_each_with_an_expectation():
    assert len(BROKEN) >= 30
    for path in BROKEN:
        exact, starts, _ = _expectations(path.read_text())
        assert exact or starts, f"{path.name} names no expected error"


@pytest.mark.parametrize("path", BROKEN, ids=lambda p: p.stem)
def test_broken_recipe_reports_exactly_its_expected_lines(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # error lines name paths relative to the working directory
    text = path.read_text()
    rel = path.relative_to(ROOT).as_posix()
    exact, starts, sets = _expectations(text)
    with pytest.raises(ConfigError) as info:
        load_buildable(rel, sets)
    lines = info.value.lines
    for expect in exact:
        assert _line(expect, rel) in lines
    for expect in starts:
        assert any(line.startswith(_line(expect, rel)) for line in lines), (expect, lines)
    assert len(lines) == len(exact) + len(starts), lines


def test_cli_prints_every_problem_as_an_error_line_and_exits_2(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    rel = "tests/recipes/broken/many_errors.toml"
    assert main(["recipe", "show", rel]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 5
    assert lines[0] == f'error: {rel}: $.model.n_head: expected int, got "two"'
    assert all(line.startswith(f"error: {rel}: $.") for line in lines)
    assert "Traceback" not in err


@pytest.mark.parametrize("command", [["recipe", "show"], ["inspect"], ["diff", "recipes/gpt.toml"]])
def test_cli_reports_a_missing_recipe_file_in_one_line(command, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    assert main([*command, "recipes/no-such.toml"]) == 2
    assert capsys.readouterr().err == "error: recipes/no-such.toml: no such recipe file\n"


def test_cli_reports_a_malformed_set_in_one_line(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    assert main(["recipe", "show", "recipes/smoke.toml", "--set", "train.lr"]) == 2
    assert capsys.readouterr().err == "error: --set train.lr: expected KEY.PATH=VALUE, e.g. --set train.lr=3e-4\n"


def test_load_recipe_checks_the_values_and_load_buildable_also_builds_the_model_among_the_cross_checks(monkeypatch):
    """toolkit.recipe imports no torch, so it does not build the model; toolkit.probe.load_buildable
    does, at the place among the cross-field checks where the model check always ran."""
    monkeypatch.chdir(ROOT)
    rel = "tests/recipes/broken/n_kv_head_not_dividing.toml"
    assert load_recipe(rel).model.attention.options.n_kv_head == 3  # every value is of its type and range
    with pytest.raises(ConfigError) as info:
        load_buildable(rel, ["deepspeed.config.gradient_clipping=1.0", "train.min_lr=1.0"])
    assert [line.split(": ")[1] for line in info.value.lines] == [
        "$.model.attention", "$.deepspeed.config.gradient_clipping", "$.train.min_lr"]
