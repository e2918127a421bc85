"""Facts README.md and docs/ state that the code (or a recipe) also knows, read from both and compared,
so a new attention kind or a new timing cannot leave the docs behind."""
import ast
import re

from test_layers import ROOT
from toolkit.cli import main
from toolkit.plugin_manager import default_registry
from toolkit.recipe import load_recipe

README = (ROOT / "README.md").read_text()


def test_the_registry_example_and_the_components_table_list_every_attention_kind():
    kinds = default_registry().names("attention")
    printed = re.search(r'print\(registry\.names\("attention"\)\)\s+# (\[.*\])', README).group(1)
    assert ast.literal_eval(printed) == kinds
    row = next(ln for ln in README.splitlines() if ln.startswith("| attention |"))
    assert {k for k in kinds if not re.search(rf"\b{k}\b", row)} == set()


def test_the_error_sample_is_what_train_prints(tmp_path, capsys, monkeypatch):
    sample = README.split("$ playattention train broken.toml\n", 1)[1].split("```", 1)[0].strip().splitlines()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "broken.toml").write_text('[model]\nn_head = "twelve"\n[model.attention]\nkind = "mah"\n'
                                          '[train]\nlr = -1.0\n')
    assert main(["train", "broken.toml"]) == 2
    assert capsys.readouterr().err.splitlines() == sample


def test_the_cpu_recipes_time_is_the_one_its_description_gives():
    recipe = ROOT / "recipes" / "gpt-cpu.toml"
    minutes = re.search(r"~(\d+) minutes", load_recipe(recipe).description).group(1)
    assert f"takes about {minutes} minutes on 2 CPU cores" in README
    assert f"about {minutes} minutes" in recipe.read_text().splitlines()[0]
    row = next(ln for ln in (ROOT / "docs" / "recipes.md").read_text().splitlines() if "`gpt-cpu.toml`" in ln)
    assert f"about {minutes} minutes" in row
