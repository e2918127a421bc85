"""`playattention inspect`: counts on the meta device, the FLOPs cross-check, ZeRO memory accounting."""
from __future__ import annotations

from pathlib import Path

import attrs
import pytest

from toolkit import inspection, probe
from toolkit.cli import main
from toolkit.errors import ConfigError
from toolkit.inspection import activation_bytes, flops_check, kv_cache, measured_activations, memory_per_gpu
from toolkit.probe import build_meta_model
from toolkit.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def gpt2():
    return load_recipe(ROOT / "recipes" / "gpt2.toml")


def test_gpt2_is_built_on_the_meta_device_with_gpt2_smalls_parameter_count(gpt2):
    model = build_meta_model(gpt2)
    assert all(p.is_meta for p in model.parameters())
    report = model.component_report(gpt2.model.block_size)
    # GPT-2 small with the vocabulary padded to 50304, position table included (nanoGPT: 124.47M)
    assert report[-1]["params"] == 124_475_904
    assert sum(r["params"] for r in report[:-1]) == report[-1]["params"]


@pytest.mark.parametrize("name", ["gpt2", "llama", "gpt"])
def test_component_flops_agree_with_the_6n_plus_attention_estimate(name):
    recipe = load_recipe(ROOT / "recipes" / f"{name}.toml")
    model = build_meta_model(recipe)
    check = flops_check(recipe, model, model.component_report(recipe.model.block_size))
    # the table leaves out biases and norms, which 6N counts; everything else is the same matmuls
    assert check.ratio == pytest.approx(1.0, abs=0.01)


def test_zero_stages_shard_optimizer_then_gradients_then_weights(gpt2):
    n, world = 1_000_000, 8
    rows = memory_per_gpu(gpt2, n, world)  # bf16: 2 + 2 + 12 bytes per parameter (ZeRO paper)
    act = activation_bytes(gpt2)
    assert [r["total"] - act for r in rows] == [
        16 * n,
        4 * n + 12 * n // world,
        2 * n + 14 * n // world,
        16 * n // world,
    ]
    fp32 = attrs.evolve(gpt2, deepspeed=attrs.evolve(gpt2.deepspeed, precision="fp32"))
    assert memory_per_gpu(fp32, n, 1)[0]["total"] - activation_bytes(fp32) == 16 * n  # 4 + 4 + 8


def test_cpu_offload_takes_the_optimizer_states_off_the_gpu(gpt2):
    offload = attrs.evolve(gpt2, deepspeed=attrs.evolve(gpt2.deepspeed, zero_stage=2, offload="cpu"))
    rows = memory_per_gpu(offload, 1000, 1)
    assert [r["optimizer_on_host"] for r in rows] == [False, False, True, True]
    assert rows[2]["total"] == rows[2]["weights"] + rows[2]["grads"] + rows[2]["activations"]


def test_activation_checkpointing_and_a_bigger_micro_batch_move_the_activation_estimate(gpt2):
    base = activation_bytes(gpt2)
    ckpt = attrs.evolve(gpt2, train=attrs.evolve(gpt2.train, activation_checkpointing=True))
    double = attrs.evolve(gpt2, train=attrs.evolve(gpt2.train, micro_batch=2 * gpt2.train.micro_batch))
    assert activation_bytes(ckpt) < base
    assert activation_bytes(double) == pytest.approx(2 * base, rel=1e-4)  # (position indices do not grow)


def test_inspect_prints_the_table_batch_arithmetic_deepspeed_config_and_memory(capsys):
    assert main(["inspect", str(ROOT / "recipes" / "gpt2.toml"), "--world-size", "8"]) == 0
    out = capsys.readouterr().out
    assert "total" in out and "124,475,904" in out
    assert "6N + 12*L*H*Q*T" in out
    assert "x 4 accumulation steps x 8 GPUs = 524,288 tokens per optimizer step" in out
    assert '"train_micro_batch_size_per_gpu": 16' in out and '"gradient_accumulation_steps": 4' in out
    assert "ESTIMATE" in out
    assert [line.split()[:2] for line in out.splitlines() if line.strip().startswith("ZeRO ")] == [
        ["ZeRO", "0"], ["ZeRO", "1"], ["ZeRO", "2"], ["ZeRO", "3"]]


def test_inspect_takes_set_and_refuses_a_world_size_the_batch_does_not_divide(capsys):
    recipe = str(ROOT / "recipes" / "gpt2.toml")
    assert main(["inspect", recipe, "--set", "model.n_layer=2"]) == 0
    assert "2 layers" in capsys.readouterr().out
    assert main(["inspect", recipe, "--world-size", "3"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {recipe}: --world-size 3: ")
    assert "not divisible" in err[0]


def test_inspect_measures_the_kv_cache_each_attention_keeps_and_a_moes_active_parameters(tmp_path, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'extends = "{ROOT / "recipes" / "gpt-cpu.toml"}"\n[model.attention]\nkind = "gqa"\nn_kv_head = 1\n'
                      '[model.layers.local]\nat = "::2"\nattention = { kind = "sliding_window", window = 16 }\n'
                      '[model.layers.moe]\nat = "1::2"\nmlp = { kind = "moe", experts = 4, top_k = 1 }\n')
    model = build_meta_model(load_recipe(recipe))
    rows = kv_cache(model, "fp32")
    hs = 128 // 4  # head dim of gpt-cpu
    # gqa with one key/value head: k and v of 32 numbers per token; the window keeps 16 of 64 tokens
    assert [(r["kind"], r["bytes_per_token"], r["tokens_kept"]) for r in rows] == [
        ("sliding_window", 2 * 4 * hs * 4, 16), ("gqa", 2 * 1 * hs * 4, 64)] * 2
    assert main(["inspect", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "active" in out.splitlines()[out.splitlines().index(next(ln for ln in out.splitlines()
                                                                      if "fwd FLOPs/token" in ln))]
    moe = next(ln for ln in out.splitlines() if ln.strip().startswith("mlp") and " moe " in ln)
    assert int(moe.split()[2].replace(",", "")) > int(moe.split()[4].replace(",", ""))  # params > active


def test_measured_activations_see_what_a_component_really_keeps(gpt2):
    plain = measured_activations(gpt2)
    attention = {k: v for k, v in plain.items() if k[0] == "attention"}
    math = attrs.evolve(gpt2, model=attrs.evolve(gpt2.model, attention=attrs.evolve(
        gpt2.model.attention, options=attrs.evolve(gpt2.model.attention.options, backend="math"))))
    spelled_out = {k: v for k, v in measured_activations(math).items() if k[0] == "attention"}
    # the math path keeps the (B, nh, T, T) scores and softmax: far more than a fused kernel's q, k, v, out
    assert sum(spelled_out.values()) > 4 * sum(attention.values())


LION = "tests/recipes/plugins/lion.py"


def test_optimizer_memory_counts_the_states_the_chosen_optimizer_declares(gpt2):
    def optimizer_bytes(kind):  # ZeRO 0 in bf16: fp32 master weights plus 4 bytes per state
        recipe = load_recipe(ROOT / "recipes" / "gpt2.toml", [f"train.optimizer={kind}", "deepspeed.zero_stage=0"],
                             plugins=[LION])
        return inspection.memory_per_gpu(recipe, 1000, 1, 0, inspection.optimizer_states(
            recipe, [(n, p, 1) for n, p in build_meta_model(recipe).named_parameters()]))[0]["optimizer"]

    assert optimizer_bytes("adamw") == 12_000 and optimizer_bytes("undeclared") == 12_000  # Adam's 2 by default
    assert optimizer_bytes("lion") == 8_000
    muon = optimizer_bytes("muon")  # one momentum for the block matrices (85M of 124M), Adam's two for the rest
    assert 4_000 + 4 * 1_000 < muon < 12_000 and muon == pytest.approx(4_000 + 4 * 1_317, rel=1e-3)


def test_inspect_and_the_memory_check_say_which_optimizer_they_counted(tmp_path):
    recipe = load_recipe(ROOT / "recipes" / "gpt2.toml", ["train.optimizer=lion"], plugins=[LION])
    said = inspection.inspect_recipe(recipe)
    assert "optimizer lion (states per parameter: 1): 2+2+8 bytes per parameter" in said
    named = probe.estimated_named_params(recipe)
    assert sum(p.numel() * k for _, p, k in named) == 124_475_904 and inspection.optimizer_states(recipe, named) == 1
    adam = attrs.evolve(recipe, train=attrs.evolve(recipe.train, optimizer=recipe.train.optimizer.__class__("adamw")))
    need = {}
    for name, r in (("lion", recipe), ("adamw", adam)):
        with pytest.raises(ConfigError) as info:
            inspection.check_fits(r, 1, (1024, "free"))
        need[name] = str(info.value)
    assert "optimizer 949.7 MiB" in need["lion"] and "optimizer 1.39 GiB" in need["adamw"]
