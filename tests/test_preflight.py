"""Checked before anything starts (issue 19, items 5-7): [deepspeed.config] by DeepSpeed's own config
code, a model's memory against the machine's, and degenerate models; each refusal is one line."""
from pathlib import Path

import pytest
import tomli_w

from toolkit import cli, plugin_manager
from toolkit.commands import train as train_command
from toolkit.errors import ConfigError
from toolkit.inspection import check_fits
from toolkit.recipe import load_recipe

TINY = Path(__file__).resolve().parent / "recipes" / "bases" / "tiny.toml"


@pytest.fixture(autouse=True)
def fresh_registries(monkeypatch):
    monkeypatch.setenv("PLAYATTENTION_TRACE", "0")
    yield
    plugin_manager.forget_loaded()


@pytest.fixture
def no_training(monkeypatch):
    """train() must not be reached: everything here is refused before a process or a model exists."""
    def refuse(*args, **kwargs):
        raise AssertionError("training started")
    monkeypatch.setattr(train_command, "train", refuse)
    monkeypatch.setattr(train_command, "launch_ranks", refuse)


def recipe(tmp_path, body: str) -> str:
    path = tmp_path / "r.toml"
    path.write_text(f'extends = "{TINY}"\n{body}')
    return str(path)


@pytest.mark.parametrize("table, said", [
    ({"zero_optimization": {"reduce_bucket_size": -5}}, "$.deepspeed.config.zero_optimization.reduce_bucket_size: must be > 0"),
    ({"zero_optimization": {"overlap_comm": "maybe"}}, "$.deepspeed.config.zero_optimization.overlap_comm: must be a valid boolean"),
    ({"communication_data_type": "fp8"}, "Invalid communication_data_type"),
    ({"steps_per_print": "often"}, "$.deepspeed.config.steps_per_print: expected an integer, got 'often'"),
    ({"elasticity": {"enabled": True}}, "Elastic training has been removed"),
    ({"data_types": {"grad_accum_dtype": "int8"}}, "$.deepspeed.config.data_types.grad_accum_dtype: expected one of fp32"),
    ({"aio": {"block_size": "big"}}, "$.deepspeed.config.aio.block_size: expected an integer"),
    ({"zero_optimization": {"overlap_comms": True}}, "overlap_comms: not a DeepSpeed setting; did you mean 'overlap_comm'?"),
    ({"zero_optimizaton": {}}, "$.deepspeed.config.zero_optimizaton: not a DeepSpeed setting; did you mean 'zero_optimization'?"),
], ids=lambda x: str(x)[:40])
@pytest.mark.parametrize("command", ["train", "inspect"])
def test_a_hostile_deepspeed_value_is_one_line_before_anything_starts(tmp_path, capsys, no_training, table, said,
                                                                     command):
    path = recipe(tmp_path, tomli_w.dumps({"deepspeed": {"config": table}}))
    argv = ["train", path, "--nproc", "2"] if command == "train" else ["inspect", path]
    code = cli.main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if not ln.startswith("warning: ")]
    assert code == 2 and len(lines) == 1 and said in lines[0], err


def test_deepspeed_settings_it_knows_pass(tmp_path, capsys):
    body = tomli_w.dumps({"deepspeed": {"config": {"zero_optimization": {"overlap_comm": True, "reduce_bucket_size": 5e7},
                                                   "communication_data_type": "fp32", "steps_per_print": 100}}})
    assert cli.main(["inspect", recipe(tmp_path, body)]) == 0


@pytest.mark.parametrize("body", [
    "[model]\nn_layer = 1024\nn_embd = 65536\nn_head = 512\n",
    "[model.mlp]\nkind = \"gelu\"\nhidden_dim = 2147483648\n",
    "[model]\nvocab_size = 4194304\nn_embd = 65536\nn_head = 512\n",
    "[model]\nhead_dim = 1048576\nn_head = 64\n",
], ids=["1024x65536", "hidden-2**31", "vocab-4M", "head_dim-2**20"])
def test_a_model_beyond_the_machine_is_refused_with_its_numbers_before_it_is_built(tmp_path, capsys, no_training,
                                                                                  body):
    code = cli.main(["train", recipe(tmp_path, body)])
    err = [ln for ln in capsys.readouterr().err.splitlines() if not ln.startswith("warning: ")]
    assert code == 2 and len(err) == 1, err
    assert "parameters need about" in err[0] and "GiB available in host memory" in err[0]


def test_the_memory_check_counts_weights_optimizer_and_activations_per_rank(tmp_path):
    r = load_recipe(recipe(tmp_path, ""))
    check_fits(r, 1, (2**30, "free"))  # a tiny model fits in a GiB
    with pytest.raises(ConfigError, match=r"need about .* x 2 ranks on this host .* more than the 1.0 KiB free"):
        check_fits(r, 2, (1024, "free"))


@pytest.mark.parametrize("body, said", [
    ('[model.mlp]\nkind = "gelu"\nmultiplier = 1e-9\n', "leaves a hidden layer 0 wide"),
    ('[model.mlp]\nkind = "swiglu"\nmultiplier = 1e-9\n', "leaves a hidden layer 0 wide"),
    ('[model.attention]\nkind = "mla"\nrope_dim = 3\n', "$.model.attention.rope_dim: must be even"),
    ('[model.mlp]\nkind = "moe"\nexperts = 100000\n', "$.model.mlp.experts: must be <= 512"),
])
def test_a_degenerate_model_is_one_line(tmp_path, capsys, body, said):
    code = cli.main(["recipe", "validate", recipe(tmp_path, body)])
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and len(err) == 1 and said in err[0], err


@pytest.mark.parametrize("value", ["1e-308", "1e-40", "-1.0"])
def test_a_temperature_whose_logits_overflow_is_refused_in_the_recipe(tmp_path, capsys, value):
    code = cli.main(["recipe", "show", recipe(tmp_path, f"[generate]\ntemperature = {value}\n")])
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and len(err) == 1 and "$.generate.temperature: must be 0 (greedy) or at least 0.0001" in err[0]
