"""Per-layer choices and blocks: a recipe gives layers their own attention, norm, MLP or block, factories
see their layer index, and the rest of the toolkit (recipe show, inspect, diff, ablations, checkpoints,
cached generation) follows."""
import pytest
import torch

from toolkit.cli import main
from toolkit.converter import structure
from toolkit.errors import ConfigError
from toolkit.model import ModelConfig, Transformer, select_layers
from toolkit.plugin_manager import default_registry
from toolkit.probe import load_buildable
from toolkit.recipe import diff_recipes, dump_recipe, load_recipe
from toolkit.trainer import train

LOCAL_GLOBAL = {"model.n_layer": 4, "model.attention": {"kind": "sliding_window", "window": 8},
                "model.layers.global": {"at": "1::2", "attention": "mha"},
                "model.layers.moe": {"at": [1, 3], "mlp": {"kind": "moe", "experts": 4, "top_k": 2}}}


def small(**changes) -> Transformer:
    torch.manual_seed(0)
    cfg = structure(default_registry(), {"vocab_size": 50, "block_size": 24, "n_layer": 4, "n_head": 2, "n_embd": 16,
                                         **changes}, ModelConfig)
    return Transformer(cfg).eval()


@pytest.mark.parametrize("at, n, want", [("1::2", 4, [1, 3]), ("5::6", 12, [5, 11]), ("0:2", 4, [0, 1]),
                                         ("-1", 4, [3]), ([0, 3], 4, [0, 3]), ([-1], 4, [3])])
def test_layers_are_chosen_by_slice_or_index(at, n, want):
    assert select_layers(at, n) == want


def test_each_layer_gets_its_groups_components_and_the_others_the_models():
    model = small(attention={"kind": "sliding_window", "window": 8},
                  layers={"global": {"at": "1::2", "attention": "mha"}, "last": {"at": "-1", "norm": "rmsnorm"}})
    kinds = [type(b.attn).__name__ for b in model.transformer.h]
    assert kinds == ["SlidingWindowAttention", "MultiHeadAttention"] * 2
    assert [type(b.ln_1).__name__ for b in model.transformer.h] == ["LayerNorm"] * 3 + ["RMSNorm"]
    assert type(model.transformer.ln_f).__name__ == "LayerNorm"  # the final norm is the model's


def test_a_later_group_wins_where_two_name_the_same_layer():
    model = small(layers={"a": {"at": "0:4", "mlp": "relu"}, "b": {"at": [2], "mlp": "swiglu"}})
    assert [type(b.mlp).__name__ for b in model.transformer.h] == ["ReluMLP", "ReluMLP", "SwiGLU", "ReluMLP"]


def test_factories_get_their_layer_index_and_norms_their_place(tmp_path):
    seen = []

    class Probe(torch.nn.Module):
        """Records dims.layer and dims.role."""

        def __init__(self, opts, dims, dim):
            super().__init__()
            seen.append((dims.layer, dims.role))

        def forward(self, x):
            return x

    registry = default_registry()
    from toolkit.plugin_manager import PluginManager

    pm = PluginManager(entry_points=False)
    pm.registry.register("norm", "probe", Probe)
    Transformer(ModelConfig(vocab_size=50, block_size=8, n_layer=2, n_head=2, n_embd=16, norm="probe"), pm.registry)
    assert seen == [(0, "attention"), (0, "mlp"), (1, "attention"), (1, "mlp"), (None, "final")]
    assert registry is default_registry()


@pytest.mark.parametrize("block, final", [("pre_norm", "LayerNorm"), ("post_norm", "Identity"),
                                          ("parallel", "LayerNorm"), ("sandwich", "LayerNorm")])
def test_blocks_are_registered_parts_and_say_whether_a_final_norm_follows(block, final):
    model = small(block=block)
    assert type(model.transformer.ln_f).__name__ == final
    idx = torch.randint(0, 50, (2, 24))
    assert model(idx)[0].shape == (2, 24, 50)


def test_parallel_block_adds_both_branches_to_the_same_input():
    model = small(block="parallel")
    b = model.transformer.h[0]
    x = torch.randn(2, 5, 16)
    pos = torch.arange(5)
    h = b.ln_1(x)
    want = x + b.attn(h, model.transformer.wpe, pos) + b.mlp(h)
    torch.testing.assert_close(b(x, model.transformer.wpe, pos), want)


def test_layout_post_is_the_older_spelling_of_the_post_norm_block():
    assert ModelConfig(layout="post") == ModelConfig(block="post_norm")
    with pytest.raises(ValueError, match='layout = "post" and block = "parallel" disagree'):
        ModelConfig(layout="post", block="parallel")


def test_a_recipe_with_local_global_attention_and_moe_every_other_layer(tmp_path, tiny_recipe, capsys):
    path = tiny_recipe(tmp_path, LOCAL_GLOBAL)
    recipe = load_recipe(path)
    again = tmp_path / "again.toml"
    again.write_text(dump_recipe(recipe))
    assert load_recipe(again) == recipe  # recipe show round-trips the layer groups
    plain = tiny_recipe(tmp_path, {"model.n_layer": 4, "model.attention": {"kind": "sliding_window", "window": 8}},
                        name="plain")
    lines = diff_recipes(load_recipe(plain), recipe)
    assert 'model.layers.global.at: (unset) -> "1::2"' in lines and 'model.layers.moe.mlp.kind: (unset) -> "moe"' in lines
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "layers global [1, 3]: attention mha" in out and "layers moe [1, 3]: mlp moe" in out
    assert "sliding_window" in out and " moe " in out


@pytest.mark.parametrize("changes, line", [
    ({"model.layers.g": {"at": "12::2", "attention": "mha"}}, "$.model: layers.g.at: '12::2' selects none of the 2 layers"),
    ({"model.layers.g": {"at": [7], "attention": "mha"}}, "$.model: layer 7 is out of range for n_layer 2"),
    ({"model.layers.g": {"at": "1::2", "attention": "mah"}},
     "$.model.layers.g.attention.kind: unknown attention 'mah'; did you mean 'mha'?"),
    ({"model.layers.g": {"at": "::2", "attention": {"kind": "gqa", "n_kv_head": 3}}},
     "$.model.layers.g.attention: model.attention.n_kv_head (3) must divide model.n_head (2)"),
    ({"model.layers.g": {"at": "::2", "atention": "mha"}}, "$.model.layers.g.atention: unknown key; did you mean 'attention'?"),
])
def test_a_bad_layer_group_is_one_line_at_its_path(tmp_path, tiny_recipe, changes, line):
    with pytest.raises(ConfigError) as err:
        load_buildable(tiny_recipe(tmp_path, changes))
    assert len(err.value.lines) == 1 and line in err.value.lines[0], err.value.lines


def test_which_layers_are_global_is_a_one_line_grid(tmp_path, tiny_recipe):
    from toolkit.ablation import load_ablation

    tiny_recipe(tmp_path, {"model.n_layer": 4, "model.attention": {"kind": "sliding_window", "window": 8},
                           "model.layers.global": {"at": "1::2", "attention": "mha"}}, name="base")
    path = tmp_path / "abl.toml"
    path.write_text('recipe = "base.toml"\nsteps = 4\n[grid]\n"model.layers.global.at" = ["1::2", "3::4", "0:4"]\n')
    _, resolved = load_ablation(path)
    assert [r.variant.name for r in resolved] == ["1-2", "3-4", "0-4"]
    assert [r.recipe.model.layers["global"].at for r in resolved] == ["1::2", "3::4", "0:4"]


@pytest.mark.slow
def test_a_per_layer_model_trains_checkpoints_resumes_and_generates_with_a_cache(tmp_path, tiny_recipe):
    from toolkit.generate import load_run

    path = tiny_recipe(tmp_path, {**LOCAL_GLOBAL, "train.max_steps": 6, "train.checkpoint_interval": 3,
                                  "train.eval_interval": 3})
    run = tmp_path / "run"
    assert train(load_recipe(path, ["train.max_steps=3"]), run_dir=run, progress=False)["status"] == "finished"
    resumed = train(load_recipe(run, ["train.max_steps=6"]), run_dir=run, resume=True, progress=False)
    assert resumed["status"] == "finished" and resumed["steps"] == 6
    model, tokenizer, recipe = load_run(run)
    assert [type(b.mlp).__name__ for b in model.transformer.h] == ["GeluMLP", "MoE", "GeluMLP", "MoE"]
    idx = torch.tensor([tokenizer.encode("ROMEO:")])
    cached = model.generate(idx, 40, temperature=0.0)  # past the window of 8 and the block of 32
    recomputed = model.generate(idx, 40, temperature=0.0, use_cache=False)
    assert torch.equal(cached, recomputed)
