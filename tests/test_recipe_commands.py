"""`playattention recipe list | validate | copy`: the shipped recipes, checking files, starting from one."""
from toolkit import catalog
from toolkit.cli import main
from toolkit.recipe import load_recipe


def test_recipe_list_shows_every_shipped_recipe_with_its_description(capsys):
    assert main(["recipe", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[0] for ln in lines] == [p.stem for p in catalog.shipped_recipes()]
    gpt_cpu = next(ln for ln in lines if ln.startswith("gpt-cpu "))
    assert gpt_cpu.split(None, 1)[1] == load_recipe(catalog.SHIPPED / "gpt-cpu.toml").description


def test_recipe_validate_exits_0_when_all_are_valid_and_2_with_one_line_per_problem(tmp_path, capsys):
    good = catalog.SHIPPED / "smoke.toml"
    assert main(["recipe", "validate", str(good), str(catalog.SHIPPED / "gpt-cpu.toml")]) == 0
    assert capsys.readouterr().out == f"{good}: ok\n{catalog.SHIPPED / 'gpt-cpu.toml'}: ok\n"
    bad = tmp_path / "bad.toml"
    bad.write_text('[model]\nn_head = "twelve"\n[train]\nlr = -1.0\n')
    assert main(["recipe", "validate", str(good), str(bad), str(tmp_path / "gone.toml")]) == 2
    captured = capsys.readouterr()
    assert captured.out == f"{good}: ok\n"
    err = captured.err.splitlines()
    assert len(err) == 3 and all(ln.startswith("error: ") for ln in err)
    assert "$.model.n_head" in err[0] and "$.train.lr" in err[1] and "gone.toml" in err[2]


def test_recipe_copy_writes_a_shipped_recipe_and_its_bases_and_never_overwrites(tmp_path, capsys):
    dest = tmp_path / "mine.toml"
    assert main(["recipe", "copy", "llama-cpu", str(dest)]) == 0
    assert dest.read_text() == (catalog.SHIPPED / "llama-cpu.toml").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt-cpu.toml", "gpt.toml", "mine.toml"]  # what it extends
    assert load_recipe(dest) == load_recipe(catalog.SHIPPED / "llama-cpu.toml")
    capsys.readouterr()
    dest.write_text("# mine now\n")
    assert main(["recipe", "copy", "gpt-cpu", str(dest)]) == 2
    assert capsys.readouterr().err == f"error: {dest}: already exists; not overwritten (give a new file name)\n"
    assert dest.read_text() == "# mine now\n"
    assert main(["recipe", "copy", "lama-cpu", str(tmp_path / "x.toml")]) == 2
    assert "did you mean 'llama-cpu'" in capsys.readouterr().err
