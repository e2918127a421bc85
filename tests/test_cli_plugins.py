"""`playattention plugins`: every family, each component's options with type and default, and its source."""
import importlib
import os
import re
import subprocess
import sys
import textwrap

import pytest

from toolkit import cli, plugin_manager
from toolkit.registry import Source


@pytest.fixture(autouse=True)
def no_trace(monkeypatch):
    # setenv, not delenv: `--trace` sets the variable, and only setenv restores its absence afterwards
    monkeypatch.setenv("PLAYATTENTION_TRACE", "0")
    yield
    plugin_manager.forget_loaded()  # a traced load must not stay cached for the next test


def section(out: str, family: str) -> str:
    """The lines of one family's block in the listing."""
    block = out.split(f"{family}:\n", 1)[1]
    return block.split("\n\n", 1)[0]


def test_lists_every_family_with_options_types_defaults_and_source(capsys):
    assert cli.main(["plugins"]) == 0
    out = capsys.readouterr().out
    for family in ("attention", "norm", "position", "mlp"):
        assert f"{family}:\n" in out
    attention = section(out, "attention")
    assert "  mha " in attention and "Causal multi-head self-attention" in attention
    assert "backend: str = 'sdpa'" in attention
    assert "from playattention 0.1.0 (toolkit.plugins.attention)" in attention
    norm = section(out, "norm")
    assert "eps: float = 1e-05" in norm and "bias: bool | None = None" in norm
    mlp = section(out, "mlp")
    assert "approximate: str = 'tanh'" in mlp and "multiplier: float = 4.0" in mlp
    assert "from playattention 0.1.0 (toolkit.plugins.mlp)" in mlp
    assert "failed plugins" not in out


def test_an_extra_plugin_file_is_listed_with_its_path(tmp_path, capsys):
    plugin = tmp_path / "myattn.py"
    plugin.write_text(textwrap.dedent("""
        import attrs
        from torch import nn
        from toolkit.hookspecs import hookimpl

        @attrs.frozen
        class Opts:
            window: int = 128

        class Local(nn.Module):
            '''Sliding-window attention for tests.'''
            Options = Opts

        @hookimpl
        def register_components(register):
            register("attention", "local_test", Local)
    """))
    assert cli.main(["plugins", "--plugin", str(plugin)]) == 0
    attention = section(capsys.readouterr().out, "attention")
    assert "  local_test " in attention and "Sliding-window attention for tests." in attention
    assert f"from {plugin}" in attention and "window: int = 128" in attention


def test_a_broken_plugin_file_is_one_error_line_and_exit_2(tmp_path, capsys):
    plugin = tmp_path / "broken.py"
    plugin.write_text("import not_a_real_module_xyz\n")
    assert cli.main(["plugins", "--plugin", str(plugin)]) == 2
    captured = capsys.readouterr()
    assert captured.err == (f"error: plugin '{plugin}' failed: "
                            "ModuleNotFoundError: No module named 'not_a_real_module_xyz'\n")
    assert "Traceback" not in captured.err and captured.out == ""


def test_failed_entry_point_plugins_are_listed_and_strict_exits_1(capsys, monkeypatch):
    def load_entry_points(self, group="playattention"):
        self.failures.append(plugin_manager.PluginFailure("fancy", "fancy-attn", "0.3", "ImportError: no triton"))

    monkeypatch.setattr(plugin_manager.PluginManager, "load_entry_points", load_entry_points)
    assert cli.main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith("failed plugins:\n  plugin 'fancy' from fancy-attn 0.3 failed: ImportError: no triton")
    assert cli.main(["plugins", "--strict"]) == 1


def test_python_dash_m_toolkit_plugins_with_trace():
    env = {**os.environ, "PLAYATTENTION_TRACE": ""}
    proc = subprocess.run([sys.executable, "-m", "toolkit", "--trace", "plugins"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    attention = section(proc.stdout, "attention")
    assert "  mha " in attention and "backend: str = 'sdpa'" in attention
    assert "[playattention] playattention 0.1.0 (toolkit.plugins.attention) registered attention 'mha'" in proc.stderr
    assert "[playattention] playattention 0.1.0 (toolkit.plugins.mlp) registered mlp 'relu'" in proc.stderr


def test_trace_flag_in_process_reports_registrations_on_stderr(capsys):
    assert cli.main(["--trace", "plugins"]) == 0
    err = capsys.readouterr().err
    assert "[playattention] playattention 0.1.0 (toolkit.plugins.norm) registered norm 'layernorm'" in err


def test_hooks_flag_lists_every_hook_and_each_familys_place_in_a_recipe(capsys):
    from toolkit.families import FAMILIES, HOOKS

    assert cli.main(["plugins", "--hooks"]) == 0
    out = capsys.readouterr().out
    for hook, doc in HOOKS.items():
        assert f"  {hook}(register)  {doc}" in out
    for fam in FAMILIES:
        assert f"\n{fam.name}:  ({fam.hook}; " in out
    assert "schedule:  (register_schedules; recipe: train.schedule;" in out
    schedules = out.split("schedule:  (", 1)[1].split("\n\n", 1)[0]
    assert "  wsd " in schedules and "decay_fraction: float = 0.2" in schedules


def test_a_plugin_package_adds_a_command(tmp_path, monkeypatch, capsys):
    (tmp_path / "pa_cmd.py").write_text(textwrap.dedent("""
        from toolkit.hookspecs import hookimpl

        def greet(parser):
            '''Greets someone.'''
            parser.add_argument("--who", default="world")

            def run(args):
                print(f"hello {args.who}")
                return 3

            return run

        @hookimpl
        def register_commands(register):
            register("greet", greet)
            register("train", greet)  # a built-in name: not added
    """))
    monkeypatch.syspath_prepend(str(tmp_path))

    def load_entry_points(self, group="playattention"):  # as if pa-cmd 0.2 were installed
        self._register_plugin(importlib.import_module("pa_cmd"), "entrypoint:pa-cmd:greet", Source("greet", "pa-cmd", "0.2"))

    monkeypatch.setattr(plugin_manager.PluginManager, "load_entry_points", load_entry_points)
    plugin_manager.forget_loaded()
    assert cli.main(["greet", "--who", "you"]) == 3
    captured = capsys.readouterr()
    assert captured.out == "hello you\n"
    assert "warning: command 'train' from pa-cmd 0.2 (greet) is not added: a built-in command has that name" in captured.err
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert re.search(r"\n    greet +Greets someone. \(from pa-cmd 0.2 \(greet\)\)\n", capsys.readouterr().out)


def test_a_family_argument_lists_only_that_family_and_a_name_only_that_component(capsys):
    assert cli.main(["plugins", "norm"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("norm:\n") and "rmsnorm" in out and "\nattention:" not in out
    assert cli.main(["plugins", "norm", "rmsnorm"]) == 0
    out = capsys.readouterr().out
    assert "  rmsnorm " in out and "layernorm" not in out and "dyt" not in out


def test_an_unknown_family_or_name_is_one_line_with_a_suggestion(capsys):
    assert cli.main(["plugins", "attenton"]) == 2
    assert "did you mean 'attention'" in capsys.readouterr().err
    assert cli.main(["plugins", "norm", "rmsnrom"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "rmsnorm" in err


def test_each_option_is_listed_with_its_one_line_description(capsys):
    assert cli.main(["plugins", "attention", "gqa"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if "n_kv_head:" in ln)
    assert "key/value heads, each shared by n_head / n_kv_head query heads" in line
    scale = next(ln for ln in out.splitlines() if "scale:" in ln)
    assert scale.endswith("(Vaswani et al. 2017).")  # "al. 2017" does not end the sentence; "Gemma 2 27B" does


def test_every_built_in_option_has_a_description():
    """The house convention (CONTRIBUTING.md): a comment above each options field, or at the end of its line."""
    registry = plugin_manager.default_registry()
    missing = [f"{c.family} {c.name}: {opt}" for c in registry if c.source.plugin.startswith("toolkit.plugins")
               for opt, _, _ in c.option_fields() if opt not in c.option_docs()]
    assert not missing, f"describe these options with a comment above the field: {missing}"
