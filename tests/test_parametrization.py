"""The parametrization family: standard changes nothing, mup follows Yang et al. 2021 (Table 3, Adam)."""
import json
import math
import subprocess
import sys
from pathlib import Path

import attrs
import pytest
import torch

from toolkit.cli import main
from toolkit.coordcheck import KINDS, coord_check, growth, render
from toolkit.contracts import Parametrization
from toolkit.errors import ConfigError, HFFormatError
from toolkit.hf import export_architecture
from toolkit.model import ModelConfig, Transformer, model_dims
from toolkit.plugin_manager import default_registry
from toolkit.contracts import param_groups
from toolkit.recipe import load_recipe
from toolkit.probe import load_buildable

ROOT = Path(__file__).resolve().parent.parent

TINY = dict(vocab_size=65, block_size=16, n_layer=2, n_head=4, n_embd=32)

# logits[0, -1, :6] and sum |logits| for seed 1234, recorded with the code before the parametrization
# family existed (commit c4aaee0): the standard parametrization must leave every model as it was
BEFORE = {
    "gpt_learned_mha": (dict(), [-0.1204208, 0.1883051, -0.1894234, 0.1484664, -0.0619842, -0.0120329, 198.7761]),
    "gqa_rope_swiglu_rms": (dict(attention={"kind": "gqa", "n_kv_head": 2}, position="rope", mlp="swiglu",
                                 norm="rmsnorm", tie_embeddings=False, bias=False),
                            [0.0306596, 0.0897972, -0.0297476, 0.0573332, 0.059983, 0.0056275, 181.417]),
    "mla_alibi": (dict(attention="mla", position="alibi"),
                  [0.0436932, 0.023472, -0.0924819, 0.0860411, 0.0197658, -0.1152743, 193.252]),
    "diff_rope": (dict(attention="diff", position="rope"),
                  [-0.1266934, -0.1458062, 0.1576911, 0.117356, -0.010258, -0.1734876, 206.7075]),
    "sliding_moe": (dict(attention={"kind": "sliding_window", "window": 4}, mlp="moe"),
                    [-0.0083679, 0.0566624, -0.2897302, -0.067957, 0.2192844, -0.0381809, 205.3657]),
}


def logits_of(seed=1234, **kw):
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**{**TINY, **kw}))
    idx = torch.randint(0, 65, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return model(idx)[0]


@pytest.mark.parametrize("name", sorted(BEFORE))
def test_standard_parametrization_gives_the_logits_of_before(name):
    kw, expected = BEFORE[name]
    logits = logits_of(**kw)
    got = [float(v) for v in logits[0, -1, :6]] + [float(logits.double().abs().sum())]
    assert got == pytest.approx(expected, abs=2e-6, rel=1e-6)
    assert torch.equal(logits, logits_of(**kw, parametrization="standard"))


@pytest.mark.parametrize("name", ["gpt_learned_mha", "mla_alibi", "diff_rope"])
def test_mup_at_its_base_width_is_the_standard_model(name):
    kw = BEFORE[name][0]
    mup = logits_of(**kw, parametrization={"kind": "mup", "base_width": TINY["n_embd"]})
    torch.testing.assert_close(mup, logits_of(**kw), rtol=0, atol=1e-6)


def test_mup_scales_hidden_matrices_init_and_lr_by_fan_in_and_leaves_vectors():
    wide = dict(TINY, n_embd=128)  # 4x the base width
    torch.manual_seed(0)
    sp = Transformer(ModelConfig(**wide, tie_embeddings=False))
    torch.manual_seed(0)
    mp = Transformer(ModelConfig(**wide, tie_embeddings=False, parametrization={"kind": "mup", "base_width": 32}))
    sp_params, mp_params = dict(sp.named_parameters()), dict(mp.named_parameters())
    for name in ("transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_fc.weight"):
        torch.testing.assert_close(mp_params[name], sp_params[name] / 2)  # std / sqrt(4)
        assert mp_params[name].optim_hints["lr_scale"] == 0.25
    # mlp.c_proj's fan-in is 4x wider too: 512 against the base's 128
    assert mp_params["transformer.h.0.mlp.c_proj.weight"].optim_hints["lr_scale"] == 0.25
    for name in ("transformer.wte.weight", "transformer.wpe.weight", "lm_head.weight", "transformer.h.0.ln_1.weight",
                 "transformer.h.0.attn.c_attn.bias"):
        assert torch.equal(mp_params[name], sp_params[name]), name
        assert "lr_scale" not in getattr(mp_params[name], "optim_hints", {}), name
    assert mp.logit_multiplier == 0.25 and sp.logit_multiplier is None
    hs = 128 // 4  # heads widen with the model: 1/d, equal to 1/sqrt(d) at the base's d = 8
    assert mp.transformer.h[0].attn.scale == pytest.approx(1 / math.sqrt(8) * 8 / hs)
    assert sp.transformer.h[0].attn.scale is None


def test_mup_learning_rates_reach_the_optimizer_groups():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**dict(TINY, n_embd=64), parametrization={"kind": "mup", "base_width": 32}))
    hidden = {id(p) for name, p in model.named_parameters() if ".h." in name and p.dim() == 2}
    lrs = {(id(p) in hidden, group.get("lr", 1e-3)) for group in param_groups(model, 0.1, lr=1e-3)
           for p in group["params"]}
    assert lrs == {(True, 5e-4), (False, 1e-3)}  # hidden matrices at lr / 2 (width 2x), the rest at lr


def test_mup_refuses_a_base_width_the_heads_do_not_divide():
    with pytest.raises(ConfigError, match=r"base_width \(30\) must be divisible by model.n_head \(4\)"):
        Transformer(ModelConfig(**dict(TINY, n_embd=64), parametrization={"kind": "mup", "base_width": 30}))


def test_recipe_validation_reports_a_bad_base_width_at_its_path():
    with pytest.raises(ConfigError, match=r"\$\.model\.parametrization: base_width \(30\) must be divisible"):
        load_buildable(ROOT / "recipes/gpt-cpu.toml", ['model.parametrization={kind="mup", base_width=30}'])


# -- the coordinate check (Yang et al. 2021) -------------------------------------------------------------------
TINY_RECIPE = ["model.n_layer=2", "model.block_size=32", "train.micro_batch=8"]


def test_coordinate_check_is_flat_in_width_under_mup_and_grows_under_standard():
    # widths 32 -> 128, 3 AdamW steps at gpt-cpu's lr 1e-3, seed 0. Measured growth (widest / narrowest
    # mean |activation| after the steps) over seeds 0-2: mup 0.75-1.19 for every kind; standard attention
    # 4.8-5.6, mlp 6.0-6.9, logits 2.8-3.3. Tolerances leave a margin on both sides.
    check = coord_check(load_recipe(ROOT / "recipes/gpt-cpu.toml", TINY_RECIPE), [32, 64, 128], 3, seed=0)
    for kind in KINDS:
        assert 0.6 < growth(check, "mup", kind) < 1.5, (kind, render(check))
    for kind, at_least in (("attention", 3.0), ("mlp", 3.0), ("logits", 2.0)):
        assert growth(check, "standard", kind) > at_least, (kind, render(check))
    # at the base width the two parametrizations are one model: the same numbers at every step
    for kind in KINDS:
        assert [s[0] for s in check["results"]["mup"][kind]] == [s[0] for s in check["results"]["standard"][kind]]


@pytest.mark.slow
def test_coordcheck_command_writes_the_plot_and_numbers(tmp_path, capsys):
    out = tmp_path / "cc.png"
    code = main(["coordcheck", str(ROOT / "recipes/gpt-cpu.toml"), "--widths", "16,32", "--steps", "1",
                 "--out", str(out), "--set", "model.n_layer=1", "--set", "model.block_size=16"])
    assert code == 0
    assert out.stat().st_size > 0 and json.loads(out.with_suffix(".json").read_text())["widths"] == [16, 32]
    assert "mup       logits" in capsys.readouterr().out


@pytest.mark.parametrize("widths, message", [
    ("64,130", "every width must be divisible by model.n_head (4)"),
    ("64", "give two or more increasing widths"),
    ("64,x", "expected integers separated by commas"),
    ("64,128 --lr -1", "--lr must be > 0"),
])
def test_coordcheck_refuses_bad_widths_in_one_line(widths, message, capsys):
    assert main(["coordcheck", str(ROOT / "recipes/gpt-cpu.toml"), "--widths", *widths.split()]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.slow
def test_lr_sweep_bench_writes_the_best_lr_per_width_and_its_plot(tmp_path):
    out, png = tmp_path / "lr.json", tmp_path / "lr.png"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "mup_lr.py"), str(ROOT / "recipes/gpt-cpu.toml"),
                           "--widths", "16,32", "--lrs", "0.001,0.01", "--steps", "3", "--layers", "1",
                           "--val-batches", "1", "--json", str(out), "--plot", str(png)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["loss"]["mup"]["16"] == result["loss"]["standard"]["16"]  # the base width: one model
    assert set(result["best_lr"]["mup"]) == {"16", "32"} and png.stat().st_size > 0
    bad = subprocess.run([sys.executable, str(ROOT / "bench" / "mup_lr.py"), str(tmp_path / "missing.toml")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "missing.toml" in bad.stderr


class _Flat(Parametrization):
    """Attention logits times 1e-4 of standard's: nearly uniform attention, if the attention asks."""

    def attention_scale(self, head_dim, scale=None):
        return 1e-4 * (scale or head_dim ** -0.5)


@pytest.mark.parametrize("kind", ["mha", "gqa", "mqa", "sliding_window", "mla", "diff", "gated"])
def test_every_builtin_attention_takes_its_logit_scale_from_the_parametrization(kind):
    registry = default_registry()
    dims = model_dims(ModelConfig(**TINY), registry.build_in)
    x = torch.randn(2, 8, TINY["n_embd"], generator=torch.Generator().manual_seed(0))
    pos = torch.arange(8)
    position = registry.build_in("position", "rope", dims)

    def out(parametrization):
        torch.manual_seed(0)
        attn = registry.build_in("attention", kind, attrs.evolve(dims, parametrization=parametrization))
        if hasattr(attn, "reset_parameters"):  # differential attention's lambdas start empty until the model's init
            attn.reset_parameters()
        with torch.no_grad():
            return attn(x, position, pos)

    torch.testing.assert_close(out(Parametrization()), out(None))  # the base class is standard
    assert (out(_Flat()) - out(None)).abs().max() > 1e-3


def test_a_mup_model_is_refused_by_the_hugging_face_export_rather_than_written_wrong():
    model = Transformer(ModelConfig(**dict(TINY, n_embd=64), parametrization={"kind": "mup", "base_width": 32}))
    with pytest.raises(HFFormatError, match="parametrization 'mup'"):
        export_architecture(model)
    assert export_architecture(Transformer(ModelConfig(**TINY)))[0].model_type == "gpt2"
