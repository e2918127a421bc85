"""Positions per layer: ``[model.layers.<name>] position`` gives some layers their own rotation or score
bias (Llama 4's iRoPE: RoPE on local layers, no position on global ones); a position that adds to the
embeddings stays the model's and is refused per layer in one line; conformance skips may depend on options."""
import re

import attrs
import pytest
import torch

from toolkit.converter import structure
from toolkit.contracts import attend
from toolkit.errors import ConfigError
from toolkit.model import ModelConfig, Transformer
from toolkit.plugin_manager import PluginManager, default_registry
from toolkit.recipe import load_recipe
from toolkit.probe import load_buildable
from toolkit.testing.conformance import ConformanceError, check_component
from toolkit.trainer import train

IROPE = {"model.n_layer": 4, "model.position": "rope", "model.layers.global": {"at": [1, 3], "position": "none"}}


def small(**changes) -> Transformer:
    torch.manual_seed(0)
    cfg = structure(default_registry(), {"vocab_size": 50, "block_size": 24, "n_layer": 4, "n_head": 2, "n_embd": 16,
                                         **changes}, ModelConfig)
    return Transformer(cfg).eval()


def rotated_layers(model: Transformer) -> list[bool]:
    """A probe: for each layer, whether the position its attention was handed rotates queries."""
    handed = {}
    hooks = [b.attn.register_forward_pre_hook(lambda _m, args, i=i: handed.__setitem__(i, args[1]))
             for i, b in enumerate(model.transformer.h)]
    with torch.no_grad():
        model(torch.zeros(1, 6, dtype=torch.long))
    for h in hooks:
        h.remove()
    q = torch.randn(1, 2, 6, 8)
    return [not torch.equal(handed[i].rotate(q, q, torch.arange(6))[0], q) for i in range(len(model.transformer.h))]


def test_global_layers_with_position_none_get_no_rotation_and_decode_through_a_cache():
    model = small(position="rope", layers={"global": {"at": [1, 3], "position": "none"}})
    assert rotated_layers(model) == [True, False, True, False]
    assert set(model.state_dict()) == set(small(position="rope").state_dict())  # rope and none save nothing
    idx = torch.randint(0, 50, (1, 4))
    assert torch.equal(model.generate(idx, 16, temperature=0), model.generate(idx, 16, temperature=0, use_cache=False))


@pytest.mark.parametrize("kind", ["learned", "sinusoidal"])
def test_a_position_that_adds_to_the_embeddings_is_refused_per_layer_in_one_line(tmp_path, tiny_recipe, kind):
    said = (f"$.model.layers.global.position: position '{kind}' adds to the embeddings (embed), which the model "
            "does once, before the first layer; a layer's own position must rotate q and k or bias the scores")
    with pytest.raises(ConfigError) as err:
        load_buildable(tiny_recipe(tmp_path, {**IROPE, "model.layers.global": {"at": [1, 3], "position": kind}}))
    assert len(err.value.lines) == 1 and said in err.value.lines[0], err.value.lines
    with pytest.raises(ConfigError, match=re.escape(said)):
        small(position="rope", layers={"global": {"at": [1], "position": kind}})


@pytest.mark.slow
def test_an_irope_recipe_trains_and_generates_with_no_rotation_on_its_global_layers(tmp_path, tiny_recipe):
    from toolkit.generate import load_run

    path = tiny_recipe(tmp_path, {**IROPE, "train.max_steps": 3})
    assert train(load_recipe(path), run_dir=tmp_path / "run", progress=False)["status"] == "finished"
    model, tokenizer, _ = load_run(tmp_path / "run")
    assert rotated_layers(model) == [True, False, True, False]
    idx = torch.tensor([tokenizer.encode("ROMEO:")])
    assert torch.equal(model.generate(idx, 40, temperature=0.0), model.generate(idx, 40, temperature=0.0, use_cache=False))


@attrs.frozen
class MaybeRopeOptions:
    rotate: bool = True


class MaybeRopeAttention(torch.nn.Module):
    """Causal attention that may leave the position out (a global layer's NoPE, chosen by an option)."""

    Options = MaybeRopeOptions

    @staticmethod
    def conformance_skip(opts):
        return {} if opts.rotate else {"position_hooks": "rotate = false: this layer takes no position"}

    def __init__(self, opts, dims):
        super().__init__()
        self.rotate, self.nh = opts.rotate, dims.n_head
        self.c_attn, self.c_proj = torch.nn.Linear(dims.n_embd, 3 * dims.n_embd), torch.nn.Linear(dims.n_embd, dims.n_embd)

    def forward(self, x, position, pos, cache=None):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.nh, C // self.nh).transpose(1, 2) for t in self.c_attn(x).split(C, dim=2))
        if self.rotate:
            q, k = position.rotate(q, k, pos)
        y = attend(q, k, v, pos, pos, position if self.rotate else None)  # no cache: the kit's kv_cache is not run
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


def test_a_conformance_skip_may_depend_on_the_options():
    registry = PluginManager(entry_points=False).registry
    registry.register("attention", "maybe_rope", MaybeRopeAttention)
    registry.register("attention", "never_skips", type("NeverSkips", (MaybeRopeAttention,), {"conformance_skip": {}}))
    assert check_component("attention", "maybe_rope", {"rotate": False}, registry=registry,
                           checks=["position_hooks", "causal"]) == ["causal"]
    assert check_component("attention", "maybe_rope", {"rotate": True}, registry=registry,
                           checks=["position_hooks"]) == ["position_hooks"]
    with pytest.raises(ConformanceError, match="position_hooks: expected one call position.rotate"):
        check_component("attention", "never_skips", {"rotate": False}, registry=registry, checks=["position_hooks"])
