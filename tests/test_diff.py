"""`playattention diff`: key-by-key differences of resolved recipes or run folders; 0 same, 1 differ, 2 error."""
from __future__ import annotations

from pathlib import Path

from toolkit.cli import main
from toolkit.ablation import recipe_diff
from toolkit.recipe import diff_data, diff_recipes, dump_recipe, flatten, load_recipe, toml_inline

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


def test_an_empty_table_is_a_value_in_a_flat_recipe_and_its_diff():
    assert flatten({"a": {}, "b": {"c": 1, "d": {}}}) == {"a": {}, "b.c": 1, "b.d": {}}
    assert diff_data({"deepspeed": {"config": {}}}, {}) == ["deepspeed.config: {} -> (unset)"]
    # emptied or filled: the keys that came or went say it, not a line for the table as well
    assert diff_data({"model": {"layers": {}}}, {"model": {"layers": {"first": {"at": "0"}}}}) == [
        'model.layers.first.at: (unset) -> "0"']
    assert diff_data({"model": {"layers": {"first": {"at": "0"}}}}, {"model": {"layers": {}}}) == [
        'model.layers.first.at: "0" -> (unset)']


def test_an_ablation_variant_lists_the_keys_it_adds_or_removes_from_a_table():
    plain = load_recipe(CPU)
    grouped = load_recipe(CPU, ['model.layers.first.at="0"', 'model.layers.first.mlp="relu"'])
    assert recipe_diff(grouped, plain) == ("model.layers.first.at=0", "model.layers.first.mlp.kind=relu")
    assert recipe_diff(plain, grouped) == ("model.layers.first.at=(unset)", "model.layers.first.mlp.kind=(unset)",
                                           "model.layers.first.mlp.multiplier=(unset)")
