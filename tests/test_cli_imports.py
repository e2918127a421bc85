"""`playattention --help` and the light commands import neither torch nor DeepSpeed (issue 20): the CLI
imports a command's module only when that command runs, and looks for plugin commands among installed
packages only, not by loading the built-in components. How long start-up takes is bench/startup.py's
job; this checks what is imported, which does not depend on the machine's load."""
import subprocess
import sys
from pathlib import Path

import pytest

from toolkit import cli

ROOT = Path(__file__).resolve().parent.parent
#: runs cli.main(argv) and prints the heavy packages and the command modules it imported
PROBE = """
import contextlib, io, sys
from toolkit import cli, plugin_manager
# an installed plugin package may import torch itself (its own cost, paid for --help): none here
plugin_manager.PluginManager.load_entry_points = lambda self, group="playattention": None
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    try:
        cli.main(sys.argv[1:])
    except SystemExit:
        pass
print(" ".join(m for m in sys.modules if m in ("torch", "deepspeed") or m.startswith("toolkit.commands.")))
"""


def imported(*argv: str) -> set[str]:
    proc = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return set(proc.stdout.split())


@pytest.mark.parametrize("argv", [["--help"], [], ["trian"], ["plugins", "--help"]], ids=" ".join)
def test_help_and_light_commands_import_neither_torch_nor_deepspeed(argv):
    got = imported(*argv)
    heavy = got & {"torch", "deepspeed"}
    assert not heavy, f"playattention {' '.join(argv)} imported {', '.join(sorted(heavy))}"
    # the command list comes from the table: no command's module is imported but the one that runs
    runs = {"toolkit.commands.plugins"} if argv[:1] == ["plugins"] else set()
    assert {m for m in got if m.startswith("toolkit.")} == runs


@pytest.mark.parametrize("argv", [["plugins"], ["recipe", "show", "recipes/gpt-cpu.toml"], ["recipe", "list"],
                                  ["diff", "recipes/gpt2.toml", "recipes/llama.toml"]], ids=" ".join)
def test_listing_plugins_and_reading_recipes_import_neither_torch_nor_deepspeed(argv, monkeypatch):
    # the built-ins declare their options without torch and register their code by name (plugins/impl/)
    monkeypatch.chdir(ROOT)
    heavy = imported(*argv) & {"torch", "deepspeed"}
    assert not heavy, f"playattention {' '.join(argv)} imported {', '.join(sorted(heavy))}"


def test_recipe_validate_builds_the_model_so_it_imports_torch(monkeypatch):
    monkeypatch.chdir(ROOT)  # a check that the probe above can see torch at all
    assert "torch" in imported("recipe", "validate", "recipes/gpt-cpu.toml")


def test_a_commands_help_imports_only_that_commands_module():
    assert {m for m in imported("runs", "--help") if m.startswith("toolkit.")} == {"toolkit.commands.runs"}


@pytest.mark.parametrize("before", [["--local_rank", "0"], ["--local-rank=0"], ["--local_r", "0"], ["--trace"]],
                         ids=" ".join)
def test_the_command_is_found_after_top_level_options(before, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PLAYATTENTION_TRACE", "0")  # --trace sets it; setenv restores it afterwards
    assert cli.main([*before, "runs", str(tmp_path)]) == 0  # the deepspeed launcher puts --local_rank first
    assert capsys.readouterr().out == f"no run folders in {tmp_path}\n"
