"""The speedrun's state-passing pieces as built-ins (plugins/shortcuts.py): the x0 shortcut and U-net
skips with learned weights (block shortcut_block) and value residual (attention value_residual). The
conformance kit runs on both with every other built-in (tests/test_conformance.py)."""
import torch

from toolkit.converter import structure
from toolkit.model import ModelConfig, Transformer
from toolkit.plugin_manager import default_registry


def small(**changes) -> Transformer:
    torch.manual_seed(0)
    cfg = structure(default_registry(), {"vocab_size": 50, "block_size": 24, "n_layer": 4, "n_head": 2, "n_embd": 16,
                                         "position": "rope", **changes}, ModelConfig)
    return Transformer(cfg).eval()


def test_unet_skips_join_layer_i_to_layer_l_minus_1_minus_i_and_x0_is_mixed_in_with_learned_weights():
    model = small(block="shortcut_block")
    h = model.transformer.h
    assert [b.save for b in h] == ["unet0", "unet1", None, None]
    assert [b.skip_from for b in h] == [None, None, "unet1", "unet0"]
    idx = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(1))
    _, loss = model.train()(idx, idx)
    loss.backward()
    assert all(b.lambdas.grad[1].abs() > 0 for b in h)  # b starts at 0, and learns
    assert h[3].skip_weight.grad.abs() > 0 and h[0].skip_weight is None
    with torch.no_grad():
        before, _ = model.eval()(idx)
        h[3].skip_weight.zero_()  # the last layer's skip from layer 0 is really added
        assert not torch.allclose(model(idx)[0], before)
    prompt = idx[:, :3]
    assert torch.equal(model.generate(prompt, 10, temperature=0), model.generate(prompt, 10, temperature=0, use_cache=False))


def test_value_residual_with_lambda_one_is_multi_head_attention_and_below_one_mixes_in_the_first_layers_values():
    mha = small(attention="mha")
    same = small(attention={"kind": "value_residual", "init_lambda": 1.0})
    mixed = small(attention={"kind": "value_residual", "init_lambda": 0.5})
    assert same.transformer.h[0].attn.lam is None
    for model in (same, mixed):
        missing, unexpected = model.load_state_dict(mha.state_dict(), strict=False)
        assert not unexpected and all(k.endswith(".attn.lam") for k in missing)
    idx = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(same(idx)[0], mha(idx)[0], atol=1e-6)
        assert not torch.allclose(mixed(idx)[0], mha(idx)[0], atol=1e-3)
