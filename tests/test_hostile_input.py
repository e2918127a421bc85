"""A hostile user's recipes and plugins: each is refused in one line per problem, exit 2, never a
traceback, a hang or an acceptance of something that fails later (issue 15)."""
import os
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from toolkit import cli, plugin_manager
from toolkit.commands import train as train_command
from toolkit.recipe import MAX_DEPTH, MAX_EXTENDS, MAX_PLUGINS, MAX_RECIPE_BYTES, load_recipe

TINY = Path(__file__).resolve().parent / "recipes" / "bases" / "tiny.toml"


@pytest.fixture(autouse=True)
def fresh_registries(monkeypatch):
    monkeypatch.setenv("PLAYATTENTION_TRACE", "0")  # error lines only, whatever ran before
    yield
    plugin_manager.forget_loaded()


def run(argv, capsys) -> tuple[int, list[str], str]:
    """(exit status, stderr lines, stdout) of the CLI in this process."""
    code = cli.main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "Traceback" not in out
    return code, err.splitlines(), out


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def based(tmp_path, body: str, name="r.toml") -> Path:
    """A recipe extending the tiny base, with ``body`` after it."""
    return write(tmp_path / name, f'extends = "{TINY}"\n{body}')


# -- nesting, size, file kinds -------------------------------------------------------------------
@pytest.mark.parametrize("body, where", [
    ("[train]\nbetas = " + "[" * 600 + "]" * 600 + "\n", "$"),
    ("[" + ".".join(["deepspeed", "config"] + ["a"] * 400) + "]\nx = 1\n", "$.deepspeed.config.a"),
    (".".join(["a"] * 400) + " = 1\n", "$.a.a"),
    ("x = " + "{a = " * 300 + "1" + "}" * 300 + "\n", "$"),
], ids=["array-600", "tables-400", "dotted-400", "inline-tables-300"])
def test_deep_nesting_is_one_line_stating_the_limit(tmp_path, capsys, body, where):
    path = write(tmp_path / "deep.toml", body)
    code, err, _ = run(["recipe", "show", str(path)], capsys)
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"error: {path}: {where}") and f"nested more than {MAX_DEPTH} levels deep" in err[0]


def test_a_deep_set_value_is_one_line(tmp_path, capsys):
    value = "[" * 1000 + "]" * 1000
    code, err, _ = run(["recipe", "show", str(TINY), "--set", f"model.n_head={value}"], capsys)
    assert code == 2 and err == [f"error: --set model.n_head=...: the value: nested more than {MAX_DEPTH} levels "
                                 f"deep (tables and arrays), the limit for a recipe"]


def test_a_set_key_path_deeper_than_the_limit_is_one_line(capsys):
    code, err, _ = run(["recipe", "show", str(TINY), "--set", ".".join(["a"] * 400) + "=1"], capsys)
    assert code == 2 and len(err) == 1 and f"more than the limit of {MAX_DEPTH}" in err[0]


def test_an_extends_chain_of_1200_files_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for i in range(1200):
        write(tmp_path / f"c{i}.toml", f'extends = "c{i + 1}.toml"\n' if i < 1199 else 'name = "end"\n')
    code, err, _ = run(["recipe", "show", "c0.toml"], capsys)
    assert code == 2 and err == [f"error: c0.toml: extends chain longer than {MAX_EXTENDS} files, "
                                 f"the limit (at c{MAX_EXTENDS}.toml)"]


def test_a_chain_within_the_limit_still_loads(tmp_path):
    for i in range(MAX_EXTENDS - 2):  # c0 ... c30, then tiny.toml: MAX_EXTENDS files in all
        write(tmp_path / f"c{i}.toml", f'extends = "c{i + 1}.toml"\n')
    write(tmp_path / f"c{MAX_EXTENDS - 2}.toml", f'extends = "{TINY}"\n')
    assert load_recipe(tmp_path / "c0.toml").model.n_layer == 2


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_is_refused_at_once_instead_of_waiting_for_a_writer(tmp_path, capsys):
    fifo = tmp_path / "recipe.toml"
    os.mkfifo(fifo)
    result = {}
    worker = threading.Thread(target=lambda: result.setdefault("code", cli.main(["recipe", "show", str(fifo)])),
                              daemon=True)
    worker.start()
    worker.join(timeout=30)
    if worker.is_alive():  # unblock it so the test run can end, then fail
        with open(fifo, "w"):
            pass
        pytest.fail("reading a FIFO recipe blocked")
    assert result["code"] == 2
    assert capsys.readouterr().err == f"error: {fifo}: not a regular file (a FIFO); a recipe is a TOML file\n"


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero")
def test_a_device_is_refused_instead_of_read_forever(capsys):
    code, err, _ = run(["recipe", "show", "/dev/zero"], capsys)
    assert code == 2 and err == ["error: /dev/zero: not a regular file (a character device); a recipe is a TOML file"]


def test_a_recipe_over_the_size_limit_is_refused_before_parsing(tmp_path, capsys):
    path = write(tmp_path / "big.toml", "plugins = [" + '"x",' * (MAX_RECIPE_BYTES // 4) + "]\n")
    code, err, _ = run(["recipe", "show", str(path)], capsys)
    assert code == 2 and err == [f"error: {path}: larger than {MAX_RECIPE_BYTES // 1024} KiB, the limit for a recipe file"]


def test_a_long_plugins_array_is_one_line_not_a_minute_of_imports(tmp_path, capsys):
    path = based(tmp_path, "plugins = [" + ", ".join(f'"mod{i}"' for i in range(5000)) + "]\n")
    code, err, _ = run(["recipe", "show", str(path)], capsys)
    assert code == 2 and err == [f"error: {path}: $.plugins: 5000 plugins, more than the limit of {MAX_PLUGINS}"]


def test_thousands_of_problems_print_the_first_fifty_and_a_count(tmp_path, capsys):
    path = based(tmp_path, "[model]\n" + "".join(f"unknown_{i} = 1\n" for i in range(20000)))
    code, err, _ = run(["recipe", "show", str(path)], capsys)
    assert code == 2 and len(err) == cli.MAX_ERROR_LINES + 1
    assert all(line.startswith(f"error: {path}: $.model.unknown_") for line in err[:-1])
    assert err[-1] == f"error: ... and {20000 - cli.MAX_ERROR_LINES:,} more"


# -- accepted but wrong ----------------------------------------------------------------------------
@pytest.mark.parametrize("key, value", [
    ("train.lr", "inf"), ("train.weight_decay", "inf"), ("train.min_lr", "nan"), ("generate.temperature", "inf"),
    ("model.norm", '{kind = "layernorm", eps = inf}'), ("model.mlp", '{kind = "gelu", multiplier = inf}'),
    ("model.position", '{kind = "rope", theta = inf}'), ("model.position", '{kind = "sinusoidal", base = inf}'),
    ("train.optimizer", '{kind = "adamw", eps = inf}'), ("train.lr", "1e400"), ("generate.top_p", "nan"),
])
def test_non_finite_numbers_are_refused_in_files_and_in_set(tmp_path, capsys, key, value):
    *table, leaf = key.split(".")
    in_file = based(tmp_path, f"[{'.'.join(table)}]\n{leaf} = {value}\n")
    for argv in (["recipe", "show", str(in_file)], ["recipe", "show", str(TINY), "--set", f"{key}={value}"]):
        code, err, _ = run(argv, capsys)
        assert code == 2 and len(err) == 1, err
        assert "must be a finite number, got " in err[0] and f"$.{key}" in err[0]


@pytest.mark.parametrize("key, value, said", [
    ("train.seed", str(2**70), "$.train.seed: must be between -2**63 and 2**63 - 1"),
    ("generate.seed", str(-2**64), "$.generate.seed: must be between -2**63 and 2**63 - 1"),
    ("model.n_layer", str(10**6), "$.model.n_layer: must be <= 1,024, got 1,000,000"),
    ("model.n_embd", str(2**20), "$.model.n_embd: must be <= 65,536"),
    ("model.vocab_size", str(2**30), "$.model.vocab_size: must be <= 4,194,304"),
    ("train.micro_batch", str(10**9), "$.train.micro_batch: must be <= 65,536"),
])
def test_integers_that_size_things_are_bounded(capsys, key, value, said):
    code, err, _ = run(["recipe", "show", str(TINY), "--set", f"{key}={value}"], capsys)
    assert code == 2 and len(err) == 1 and said in err[0], err


def test_the_inspect_of_a_million_layers_is_refused_at_once(capsys):
    code, err, _ = run(["inspect", str(TINY), "--set", "model.n_layer=1000000"], capsys)
    assert code == 2 and len(err) == 1


@pytest.mark.parametrize("table, recipe_key", [
    ("train_batch_size = 7", "train.micro_batch"), ("train_micro_batch_size_per_gpu = 3", "train.micro_batch"),
    ("gradient_accumulation_steps = 2", "train.grad_accum"), ("gradient_clipping = 0.5", "train.grad_clip"),
    ('optimizer = {type = "Bogus"}', "train.optimizer"), ('scheduler = {type = "WarmupLR"}', "train.schedule"),
    ("zero_optimization = {stage = 2}", "deepspeed.zero_stage"), ("bf16 = {enabled = true}", "deepspeed.precision"),
    ("fp16 = {enabled = true}", "deepspeed.precision"),
])
def test_deepspeed_config_keys_the_toolkit_sets_are_refused_naming_the_recipe_key(tmp_path, capsys, table, recipe_key):
    path = based(tmp_path, f"[deepspeed.config]\n{table}\n")
    code, err, _ = run(["recipe", "show", str(path)], capsys)
    assert code == 2 and len(err) == 1, err
    assert f"set by the toolkit from {recipe_key}" in err[0] and err[0].startswith(f"error: {path}: $.deepspeed.config.")


def test_other_deepspeed_config_keys_pass_through(tmp_path):
    path = based(tmp_path, "[deepspeed.config]\nzero_optimization = {overlap_comm = true}\nbf16 = {immediate_grad_update = true}\n")
    assert load_recipe(path).deepspeed.config["zero_optimization"] == {"overlap_comm": True}


# -- components that break their contract ---------------------------------------------------------------
BAD_COMPONENTS = '''
import torch
from torch import nn
from toolkit.hookspecs import hookimpl


class Raises(nn.Module):
    def __init__(self, opts, dims):
        raise RuntimeError("boom in the factory")


def not_a_module(opts, dims):
    return 42


class WrongShape(nn.Module):
    def __init__(self, opts, dims):
        super().__init__()
        self.up = nn.Linear(dims.n_embd, 2 * dims.n_embd)

    def forward(self, x):
        return self.up(x)  # (B, T, 2C): not the (B, T, C) of the contract


class ForwardRaises(nn.Module):
    def __init__(self, opts, dims):
        super().__init__()
        self.proj = nn.Linear(dims.n_embd, dims.n_embd)

    def forward(self, x):
        raise ValueError("forward broke")


class BadAttention(nn.Module):
    def __init__(self, opts, dims):
        super().__init__()
        self.proj = nn.Linear(dims.n_embd, dims.n_embd)

    def forward(self, x, position, pos, cache=None):
        return self.proj(x)[:, :1]  # (B, 1, C)


@hookimpl
def register_components(register):
    register("mlp", "raises", Raises)
    register("mlp", "not_a_module", not_a_module)
    register("mlp", "wrong_shape", WrongShape)
    register("mlp", "forward_raises", ForwardRaises)
    register("attention", "one_token", BadAttention)
'''


@pytest.mark.parametrize("choice, said", [
    ('mlp = "raises"', "$.model.mlp: mlp 'raises' (from {plugin}) failed to build: RuntimeError: boom in the factory"),
    ('mlp = "not_a_module"', "$.model.mlp: mlp 'not_a_module' (from {plugin}) built int, not a torch.nn.Module"),
    ('mlp = "wrong_shape"', "$.model.mlp: mlp 'wrong_shape' (from {plugin}) at layer 0: forward returned shape "
                            "(2, 8, 64) for input (2, 8, 32); the contract is (B, T, C) -> (B, T, C)"),
    ('mlp = "forward_raises"', "$.model.mlp: mlp 'forward_raises' (from {plugin}) at layer 0: forward failed: "
                               "ValueError: forward broke"),
    ('attention = "one_token"', "$.model.attention: attention 'one_token' (from {plugin}) at layer 0: forward "
                                "returned shape (2, 1, 32) for input (2, 8, 32); the contract is (B, T, C) -> (B, T, C)"),
])
@pytest.mark.parametrize("command", [["recipe", "validate"], ["inspect"]])
def test_a_component_that_breaks_its_contract_fails_validation_naming_its_plugin(tmp_path, capsys, monkeypatch,
                                                                                 choice, said, command):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "bad_parts.py", BAD_COMPONENTS)
    path = based(tmp_path, f'plugins = ["bad_parts.py"]\n[model]\n{choice}\n')
    code, err, _ = run([*command, "r.toml"], capsys)
    assert code == 2 and err == [f"error: r.toml: {said.format(plugin='bad_parts.py')}"]


def test_a_valid_layer_group_is_probed_at_its_own_layers(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "bad_parts.py", BAD_COMPONENTS)
    path = based(tmp_path, 'plugins = ["bad_parts.py"]\n[model.layers.last]\nat = "-1"\nmlp = "wrong_shape"\n')
    code, err, _ = run(["recipe", "validate", path.name], capsys)
    assert code == 2 and len(err) == 1 and "mlp 'wrong_shape' (from bad_parts.py) at layer 1: forward returned" in err[0]


def test_recipe_show_and_diff_read_a_recipe_without_building_its_model(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # reading is torch-free and fast; `recipe validate` is the check that builds
    write(tmp_path / "bad_parts.py", BAD_COMPONENTS)
    based(tmp_path, 'plugins = ["bad_parts.py"]\n[model]\nmlp = "raises"\n')
    code, _, out = run(["recipe", "show", "r.toml"], capsys)
    assert code == 0 and 'kind = "raises"' in out
    assert run(["diff", "r.toml", "r.toml"], capsys)[0] == 0
    assert run(["recipe", "validate", "r.toml"], capsys)[0] == 2


# -- plugins that exit, interrupt, or cannot be named -------------------------------------------------
@pytest.mark.parametrize("body, reason", [
    ("import sys\nsys.exit(0)\n", "SystemExit: called sys.exit(0) while loading"),
    ("import sys\nsys.exit(5)\n", "SystemExit: called sys.exit(5) while loading"),
    ("raise KeyboardInterrupt\n", "KeyboardInterrupt: raised while loading"),
    ("import sys\nfrom toolkit.hookspecs import hookimpl\n\n@hookimpl\ndef register_components(register):\n"
     "    sys.exit(0)\n", "SystemExit: called sys.exit(0) while loading"),
], ids=["exit-0-import", "exit-5-import", "ctrl-c-import", "exit-0-hook"])
def test_a_plugin_that_exits_while_loading_is_that_plugins_failure(tmp_path, capsys, monkeypatch, body, reason):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "quitter.py", body)
    path = based(tmp_path, 'plugins = ["quitter.py"]\n')
    code, err, _ = run(["recipe", "show", path.name], capsys)
    assert code == 2 and err == [f'error: r.toml: $.plugins[0]: cannot load plugin "quitter.py": {reason}']
    # `plugins` keeps going, lists the others, and names the one that failed
    code, err, out = run(["plugins", "--plugin", "quitter.py"], capsys)
    assert code == 2 and err == [f"error: plugin '{tmp_path / 'quitter.py'}' failed: {reason}"]
    pm = plugin_manager.PluginManager(entry_points=False)
    pm.add("quitter.py", strict=False)
    assert [f.reason for f in pm.failures] == [reason] and ("attention", "mha") in pm.registry


def test_an_installed_plugin_that_exits_at_import_is_named_and_the_others_load(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(tmp_path))
    write(tmp_path / "pa_quits.py", "import sys\nsys.exit(0)\n")
    info = tmp_path / "pa_quits-1.0.dist-info"
    info.mkdir()
    write(info / "METADATA", "Metadata-Version: 2.1\nName: pa-quits\nVersion: 1.0\n")
    write(info / "entry_points.txt", "[playattention]\nquits = pa_quits\n")
    plugin_manager.forget_loaded()
    try:
        code, err, out = run(["plugins"], capsys)
    finally:
        sys.modules.pop("pa_quits", None)
    assert code == 0 and "attention:" in out
    assert "plugin 'quits' from pa-quits 1.0 failed: SystemExit: called sys.exit(0) while loading" in out


@pytest.mark.parametrize("text, said", [
    ("[playattention]\nbroken entry\n", "line 2: expected NAME = MODULE:OBJECT, got 'broken entry'"),
    ("[playattention\nx = y\n", "line 1: a section header without its closing ']'"),
    ("[playattention]\nx = \n", "line 2: expected NAME = MODULE:OBJECT, got 'x ='"),
])
def test_a_malformed_entry_points_file_is_named_not_skipped(tmp_path, monkeypatch, text, said):
    monkeypatch.syspath_prepend(str(tmp_path))
    info = tmp_path / "pa_malformed-2.0.dist-info"
    info.mkdir()
    write(info / "METADATA", "Metadata-Version: 2.1\nName: pa-malformed\nVersion: 2.0\n")
    write(info / "entry_points.txt", text)
    pm = plugin_manager.PluginManager()
    (failure,) = [f for f in pm.failures if f.package == "pa-malformed"]
    assert failure.plugin == str(info / "entry_points.txt") and failure.version == "2.0"
    assert failure.reason.startswith(f"malformed entry_points.txt: {said}")
    assert ("attention", "mha") in pm.registry  # everything else still loads


def test_an_undecodable_entry_points_file_of_a_plugin_package_is_named(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    info = tmp_path / "pa_binary-1.0.dist-info"
    info.mkdir()
    write(info / "METADATA", "Metadata-Version: 2.1\nName: pa-binary\nVersion: 1.0\n")
    (info / "entry_points.txt").write_bytes(b"\xff\xfe[playattention]\nx = y\n")
    pm = plugin_manager.PluginManager()
    (failure,) = [f for f in pm.failures if f.package == "pa-binary"]
    assert failure.reason.startswith("cannot read entry_points.txt (UnicodeDecodeError")


def test_a_null_byte_in_a_plugin_path_is_one_line(tmp_path, capsys):
    path = based(tmp_path, 'plugins = ["a\\u0000b.py"]\n')
    code, err, _ = run(["recipe", "show", str(path)], capsys)
    assert code == 2 and err == [f'error: {path}: $.plugins[0]: not a plugin file or module name: "a\\u0000b.py"']
    code, err, _ = run(["recipe", "show", str(TINY), "--set", 'plugins=["x\\u0000.py"]'], capsys)
    assert code == 2 and len(err) == 1 and "not a plugin file or module name" in err[0]
    pm = plugin_manager.PluginManager(entry_points=False)
    pm.add("a\0b.py", strict=False)
    assert pm.failures[0].plugin == "a\\x00b.py" and "not a usable file name" in pm.failures[0].reason


def test_newlines_in_values_keys_and_paths_stay_on_one_line_per_problem(tmp_path, capsys):
    weird = tmp_path / "two\nlines"
    weird.mkdir()
    path = write(weird / "r.toml", f'extends = "{TINY}"\n[model]\n"n\\nhead" = 1\nn_layer = "x\\ny"\n'
                                   '[train]\nout_dir = 3\n')
    code, err, _ = run(["recipe", "show", str(path)], capsys)
    shown = str(path).replace("\n", "\\n")
    assert code == 2 and sorted(err) == sorted([
        f'error: {shown}: $.model."n\\nhead": unknown key; did you mean \'n_head\'?',
        f'error: {shown}: $.model.n_layer: expected int, got "x\\ny"',
        f'error: {shown}: $.train.out_dir: expected string, got 3',
    ])
    code, err, _ = run(["recipe", "show", str(TINY), "--set", "train.lr=\nx"], capsys)
    assert code == 2 and err == [f'error: {TINY}: $.train.lr: expected float, got "x" (from --set train.lr=\\nx)']


# -- small ones -----------------------------------------------------------------------------------------
def test_max_steps_below_warmup_warms_up_over_the_whole_run_with_a_warning(capsys):
    code, err, out = run(["recipe", "show", str(TINY), "--set", "train.max_steps=30", "--set",
                          "train.warmup_steps=100"], capsys)
    assert code == 0 and "max_steps = 30" in out
    assert err == [f"warning: {TINY}: $.train.warmup_steps: 100 is not below max_steps 30: the learning rate warms "
                   f"up over the whole run and reaches 30% of lr at the last step"]
    from toolkit.engine import lr_at
    train = load_recipe(TINY, ["train.max_steps=30", "train.warmup_steps=100"]).train
    lrs = [lr_at(s, train) for s in range(30)]
    assert lrs == sorted(lrs) and lrs[-1] == pytest.approx(1e-3 * 30 / 101)


def test_train_has_out_for_the_folder_runs_go_in(tmp_path, capsys, monkeypatch):
    seen = {}
    monkeypatch.setattr(train_command, "train", lambda recipe, **kw: seen.setdefault("recipe", recipe) and
                        {"status": "failed", "steps": 0, "error": "stop here", "run_dir": str(tmp_path)})
    cli.main(["train", str(TINY), "--out", str(tmp_path / "elsewhere")])
    assert seen["recipe"].train.out_dir == str(tmp_path / "elsewhere")

