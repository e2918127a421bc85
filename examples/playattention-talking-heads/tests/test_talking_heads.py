"""Talking-heads attention: the playattention conformance kit, plus what is special about it."""
import pytest
import torch

from toolkit.converter import ConfigError, structure
from toolkit.model import ModelConfig, Transformer
from toolkit.plugin_manager import PluginManager
from toolkit.testing import ComponentConformance


class TestTalkingHeads(ComponentConformance):
    family = "attention"
    name = "talking_heads"


class TestTalkingHeadsLogitsOnly(ComponentConformance):
    family = "attention"
    name = "talking_heads"
    options = {"mix": "logits"}


def small(attention, seed=0):
    registry = PluginManager().registry  # built-ins plus installed packages, this one included
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=50, block_size=12, n_layer=2, n_head=4, n_embd=32, attention=attention)
    return Transformer(cfg, registry).eval()


def test_is_found_through_its_entry_point():
    comp = PluginManager().registry.get("attention", "talking_heads")
    assert comp.source.package == "playattention-talking-heads"


def test_identity_mixing_is_multi_head_attention():
    th, mha = small("talking_heads"), small("mha", seed=1)
    mha.load_state_dict({k: v for k, v in th.state_dict().items() if "mix_" not in k})
    idx = torch.randint(0, 50, (2, 12))
    torch.testing.assert_close(th(idx)[0], mha(idx)[0], atol=1e-5, rtol=1e-4)


def test_learned_mixing_changes_the_outputs():
    th = small("talking_heads")
    idx = torch.randint(0, 50, (2, 12))
    before = th(idx)[0]
    with torch.no_grad():
        th.transformer.h[0].attn.mix_logits.copy_(torch.randn(4, 4))
    assert (th(idx)[0] - before).abs().max() > 1e-3


def test_unknown_mix_is_a_clear_error():
    registry = PluginManager().registry
    with pytest.raises(ConfigError) as err:
        structure(registry, {"attention": {"kind": "talking_heads", "mix": "sideways"}}, ModelConfig, "$.model")
    assert err.value.lines[0].startswith("$.model.attention.mix:")
    assert "sideways" in err.value.lines[0]


def test_inverse_sqrt_schedule_warms_up_then_decays_with_the_square_root_of_the_step():
    from toolkit.families import SPEC_TYPES
    from toolkit.recipe import TrainConfig

    schedule = PluginManager().registry.build(SPEC_TYPES["schedule"]("inverse_sqrt"), TrainConfig(lr=1.0, warmup_steps=4))
    assert [schedule(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]  # linear warmup to train.lr
    assert schedule(15) == 0.5 and schedule(63) == 0.25  # lr * sqrt(4 / 16), lr * sqrt(4 / 64)


def test_mixing_matrices_are_exempt_from_weight_decay():
    from toolkit.contracts import param_groups

    model = small({"kind": "talking_heads"})
    no_decay = next(g for g in param_groups(model, 0.1) if g["weight_decay"] == 0.0)
    mixes = [m.mix_logits for m in model.modules() if hasattr(m, "mix_logits")]
    assert mixes and all(any(p is m for p in no_decay["params"]) for m in mixes)
