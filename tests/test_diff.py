"""`playattention diff`: key-by-key differences of resolved recipes or run folders; 0 same, 1 differ, 2 error."""
from __future__ import annotations

from pathlib import Path

from toolkit.cli import main
from toolkit.recipe import diff_recipes, dump_recipe, load_recipe, toml_inline

ROOT = Path(__file__).resolve().parent.parent
GPT, CPU = str(ROOT / "recipes" / "gpt.toml"), str(ROOT / "recipes" / "gpt-cpu.toml")


def test_diff_lists_each_changed_key_and_exits_1(capsys):
    assert main(["diff", GPT, CPU]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert "model.n_layer: 6 -> 4" in lines
    assert "model.dropout: 0.2 -> 0.0" in lines
    assert "train.eval_batches: 200 -> 20" in lines
    assert 'name: "gpt" -> "gpt-cpu"' in lines
    assert not any(line.startswith("train.lr:") for line in lines)  # equal after resolution


def test_diff_of_a_recipe_with_itself_is_empty_and_exits_0(capsys):
    assert main(["diff", CPU, CPU]) == 0
    assert capsys.readouterr().out == ""


def test_a_run_folder_compares_equal_to_the_recipe_it_was_written_from(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.toml").write_text(dump_recipe(load_recipe(CPU)))
    assert main(["diff", str(run), CPU]) == 0
    assert main(["diff", str(run), CPU, "--set", "train.seed=1"]) == 0  # --set applies to both sides
    assert capsys.readouterr().out == ""


def test_diff_shows_options_only_one_component_has_as_unset():
    a = load_recipe(ROOT / "recipes" / "smoke.toml")
    b = load_recipe(ROOT / "recipes" / "smoke.toml", ["model.attention.kind=gqa", "model.attention.n_kv_head=1"])
    lines = diff_recipes(a, b)
    assert lines[0] == 'model.attention.kind: "mha" -> "gqa"'
    assert "model.attention.n_kv_head: (unset) -> 1" in lines


def test_diff_values_are_written_as_you_would_pass_them_to_set():
    assert [toml_inline(v) for v in ("a\"b", True, 3, 0.5, [0.9, 0.95], {"k": 1})] == [
        '"a\\"b"', "true", "3", "0.5", "[0.9, 0.95]", "{k = 1}"]


def test_diff_of_a_missing_or_broken_recipe_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\nn_head = 'x'\n")
    assert main(["diff", GPT, str(bad)]) == 2
    assert capsys.readouterr().err == f'error: {bad}: $.model.n_head: expected int, got "x"\n'
