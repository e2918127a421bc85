"""Model-wide options the architectures need: head width, embedding multiplier, logit soft-cap, and the
norm and QK-norm variants (each checked against a direct computation)."""
import math

import pytest
import torch

from toolkit import contracts
from toolkit.model import ModelConfig, Transformer


def small(**kw):
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=50, block_size=16, n_layer=2, n_head=4, n_embd=32, **kw)).eval()


def test_head_dim_can_differ_from_n_embd_over_n_head():
    model = small(head_dim=12, attention={"kind": "gqa", "n_kv_head": 2})
    attn = model.transformer.h[0].attn
    assert attn.c_attn.weight.shape == ((4 + 2 * 2) * 12, 32) and attn.c_proj.weight.shape == (32, 4 * 12)
    assert model(torch.randint(0, 50, (2, 16)))[0].shape == (2, 16, 50)


def test_embedding_multiplier_scales_the_token_embeddings():
    plain, scaled = small(position="none"), small(position="none", embedding_multiplier=4.0)
    scaled.load_state_dict(plain.state_dict())
    seen = {}
    for name, model in (("plain", plain), ("scaled", scaled)):
        model.transformer.h[0].register_forward_pre_hook(lambda m, args, name=name: seen.__setitem__(name, args[0]))
        model(torch.randint(0, 50, (1, 5), generator=torch.Generator().manual_seed(1)))
    torch.testing.assert_close(seen["scaled"], 4.0 * seen["plain"])


def test_logit_softcap_is_cap_times_tanh_of_logits_over_cap():
    plain, capped = small(), small(logit_softcap=0.05)
    capped.load_state_dict(plain.state_dict())
    idx = torch.randint(0, 50, (2, 16))
    torch.testing.assert_close(capped(idx)[0], 0.05 * torch.tanh(plain(idx)[0] / 0.05))


def test_rmsnorm_with_an_offset_scales_by_offset_plus_weight_and_starts_at_one():
    model = small(norm={"kind": "rmsnorm", "offset": 1.0})
    norm = model.transformer.h[0].ln_1
    assert torch.equal(norm.weight, torch.zeros(32))  # Gemma's weights are stored around 0
    norm.weight.data.fill_(0.5)
    x = torch.randn(3, 32)
    want = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * 1.5
    torch.testing.assert_close(norm(x), want)


def test_qk_norm_over_all_heads_normalises_the_whole_projection():
    model = small(attention={"kind": "gqa", "n_kv_head": 2, "qk_norm": "rmsnorm", "qk_norm_scope": "all"})
    attn = model.transformer.h[0].attn
    assert attn.q_norm.weight.shape == (4 * 8,) and attn.k_norm.weight.shape == (2 * 8,)
    per_head = small(attention={"kind": "gqa", "n_kv_head": 2, "qk_norm": "rmsnorm"}).transformer.h[0].attn
    assert per_head.q_norm.weight.shape == (8,)
    assert math.isclose(attn.flops_per_token(16), per_head.flops_per_token(16))  # norms are elementwise


@pytest.mark.parametrize("softcap", [None, 0.5], ids=["plain", "softcapped"])
@pytest.mark.parametrize("backend", ["sdpa", "math", "flex"])
@pytest.mark.parametrize("kind", ["gqa", "sliding_window"])
def test_attention_scale_replaces_one_over_sqrt_head_dim(backend, kind, softcap, monkeypatch):
    # scaling q.k by s is the default attention with every query multiplied by s * sqrt(head_dim)
    monkeypatch.setattr(contracts, "FLEX_COMPILE", False)  # the arithmetic, not the kernel (no_grad: flex runs)
    opts = {"kind": kind, "n_kv_head": 2, "backend": backend, "softcap": softcap,
            **({"window": 5} if kind == "sliding_window" else {})}
    scaled, plain = small(attention={**opts, "scale": 3.0}), small(attention=opts)
    plain.load_state_dict(scaled.state_dict())
    with torch.no_grad():
        for block in plain.transformer.h:
            block.attn.c_attn.weight[: 4 * 8] *= 3.0 * math.sqrt(8)  # the query rows
            block.attn.c_attn.bias[: 4 * 8] *= 3.0 * math.sqrt(8)
    idx = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(scaled(idx)[0], plain(idx)[0], atol=1e-5, rtol=1e-4)
        assert (scaled(idx)[0] - small(attention=opts)(idx)[0]).abs().max() > 1e-3  # and the scale mattered


def test_qk_norm_of_the_models_norm_kind_takes_its_eps_and_offset():
    model = small(norm={"kind": "rmsnorm", "eps": 1e-6, "offset": 1.0},
                  attention={"kind": "gqa", "n_kv_head": 2, "qk_norm": "rmsnorm", "qk_norm_scope": "all"})
    attn = model.transformer.h[0].attn
    assert (attn.q_norm.eps, attn.q_norm.offset, attn.k_norm.eps) == (1e-6, 1.0, 1e-6)
    other = small(norm={"kind": "layernorm", "eps": 1e-6}, attention={"kind": "mha", "qk_norm": "rmsnorm"})
    assert other.transformer.h[0].attn.q_norm.eps == 1e-5  # another kind: its own defaults
