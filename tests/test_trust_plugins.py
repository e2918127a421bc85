"""A run folder or recipe from elsewhere runs no code without consent (issue 19, item 2): the plugin
files it names run only with --trust-plugins, from the current project, or by --plugin; the
read-only commands (recipe show, diff) work without running them."""
from pathlib import Path

import pytest
import tomli_w

from toolkit import cli, plugin_manager
from toolkit.recipe import load_recipe

TINY = Path(__file__).resolve().parent / "recipes" / "bases" / "tiny.toml"


@pytest.fixture(autouse=True)
def fresh_registries(monkeypatch):
    monkeypatch.setenv("PLAYATTENTION_TRACE", "0")
    yield
    plugin_manager.trust()
    plugin_manager.forget_loaded()


def evil_source(marker: Path) -> str:
    return f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"


def handed_run(root: Path, spec: str) -> tuple[Path, Path]:
    """A run folder as someone hands it over (recipe.toml naming their plugin file), and the marker
    file its plugin would write."""
    run, marker = root / "theirs", root / "MARKER"
    plugin = run / spec
    plugin.parent.mkdir(parents=True, exist_ok=True)
    plugin.write_text(evil_source(marker))
    text = tomli_w.dumps({"name": "theirs", "plugins": [spec]}) + TINY.read_text()
    (run / "recipe.toml").write_text(text)
    for name in ("model.safetensors", "tokenizer.json", "versions.json"):
        (run / name).write_text("{}")
    return run, marker


COMMANDS = {
    "generate": lambda run, here: ["generate", str(run), "--max-new-tokens", "2"],
    "eval": lambda run, here: ["eval", str(run), "--task", "perplexity"],
    "convert": lambda run, here: ["convert", str(run), str(here / "hf"), "--to", "hf"],
    "inspect": lambda run, here: ["inspect", str(run)],
}


@pytest.mark.parametrize("spec", ["evil.py", "./sub/evil.py"])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_handed_run_folders_plugin_runs_only_with_trust_plugins(tmp_path, capsys, monkeypatch, command, spec):
    run, marker = handed_run(tmp_path / "elsewhere", spec)
    here = tmp_path / "project"
    here.mkdir()
    monkeypatch.chdir(here)
    code = cli.main(COMMANDS[command](run, here))
    out, err = capsys.readouterr()
    assert code == 2 and not marker.exists() and "Traceback" not in err
    errors = [ln for ln in err.splitlines() if not ln.startswith("warning: ")]  # e.g. no export.json
    assert len(errors) == 1, err
    line = errors[0]
    assert str(run / spec.removeprefix("./")) in line and "--trust-plugins" in line and "outside the current project" in line

    cli.main([*COMMANDS[command](run, here), "--trust-plugins"])
    capsys.readouterr()
    assert marker.exists()  # consent given: it ran (the made-up weights may then fail; not the point)


@pytest.mark.parametrize("argv", [["recipe", "show", "{run}"], ["diff", "{run}", str(TINY)]], ids=["show", "diff"])
def test_read_only_commands_show_a_handed_recipe_without_running_its_plugin(tmp_path, capsys, monkeypatch, argv):
    run, marker = handed_run(tmp_path / "elsewhere", "evil.py")
    (run / "recipe.toml").write_text((run / "recipe.toml").read_text() + '[model.mlp]\nkind = "evil_mlp"\nwidth = 3\n')
    monkeypatch.chdir(tmp_path)
    code = cli.main([a.format(run=run) for a in argv])
    out, err = capsys.readouterr()
    assert not marker.exists() and "Traceback" not in err
    warnings = [ln for ln in err.splitlines() if ln.startswith("warning: ")]
    assert len(warnings) == 1 and str(run / "evil.py") in warnings[0] and "--trust-plugins" in warnings[0]
    assert "not loaded" in warnings[0]
    if argv[0] == "recipe":
        assert code == 0 and 'kind = "evil_mlp"' in out and "width = 3" in out  # the unknown component's table as written
    else:
        assert code == 1 and 'model.mlp.kind: "evil_mlp" -> "gelu"' in out


def test_a_plugin_of_the_current_project_runs_without_asking(tmp_path, monkeypatch):
    marker = tmp_path / "MARKER"
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "mine.py").write_text(evil_source(marker))
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "r.toml").write_text(f'extends = "{TINY}"\nplugins = ["../plugins/mine.py"]\n')
    monkeypatch.chdir(tmp_path)
    load_recipe("recipes/r.toml")
    assert marker.exists()


def test_a_plugin_inside_a_run_folder_under_the_project_still_needs_consent(tmp_path, monkeypatch):
    run, marker = handed_run(tmp_path, "evil.py")  # e.g. unpacked into the project's runs/
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Exception, match=r"inside the run folder .*--trust-plugins"):
        load_recipe(run)
    assert not marker.exists()


def test_a_symlink_in_the_project_to_a_file_outside_is_outside(tmp_path, monkeypatch):
    marker = tmp_path / "MARKER"
    (tmp_path / "outside.py").write_text(evil_source(marker))
    project = tmp_path / "project"
    project.mkdir()
    (project / "link.py").symlink_to(tmp_path / "outside.py")
    (project / "r.toml").write_text(f'extends = "{TINY}"\nplugins = ["link.py"]\n')
    monkeypatch.chdir(project)
    with pytest.raises(Exception, match=r"outside\.py.*outside the current project"):
        load_recipe(project / "r.toml")
    assert not marker.exists()


def test_a_plugin_file_named_by_plugin_on_the_command_line_is_consented(tmp_path, capsys, monkeypatch):
    marker = tmp_path / "MARKER"
    (tmp_path / "mine.py").write_text(evil_source(marker))
    (tmp_path / "project").mkdir()
    monkeypatch.chdir(tmp_path / "project")
    assert cli.main(["recipe", "show", str(TINY), "--plugin", str(tmp_path / "mine.py")]) == 0
    assert marker.exists()


@pytest.mark.slow
def test_resuming_a_run_whose_plugin_lies_elsewhere_needs_trust_plugins(tmp_path, capsys, monkeypatch):
    mine, marker = tmp_path / "mine", tmp_path / "MARKER"
    mine.mkdir()
    (mine / "plug.py").write_text(evil_source(marker))
    (mine / "r.toml").write_text(f'extends = "{TINY}"\nplugins = ["plug.py"]\n')
    monkeypatch.chdir(mine)  # trained in its own project: the plugin runs
    assert cli.main(["train", "r.toml", "--run-dir", str(tmp_path / "run"), "--set", "train.max_steps=4"]) == 0
    marker.unlink()
    (tmp_path / "other").mkdir()
    monkeypatch.chdir(tmp_path / "other")  # resumed from elsewhere: the run folder's plugin is not this project's
    capsys.readouterr()
    resume = ["train", "--resume", str(tmp_path / "run"), "--extend", "1"]
    assert cli.main(resume) == 2 and not marker.exists()
    err = [ln for ln in capsys.readouterr().err.splitlines() if not ln.startswith("extending ")]
    assert len(err) == 1 and str(mine / "plug.py") in err[0] and "--trust-plugins" in err[0], err
    assert cli.main([*resume, "--trust-plugins"]) == 0  # (imported once per process: no new marker here)
