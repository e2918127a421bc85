"""The composed Transformer: same function as a hand-written GPT-2, GPT-2's names and init, tying, dropout, accounting."""
import math

import pytest
import torch
from oracle_gpt2 import GPT, GPTConfig

from toolkit.contracts import flops_per_token
from toolkit.model import ModelConfig, Transformer

SMALL = dict(vocab_size=97, block_size=24, n_layer=3, n_head=4, n_embd=32)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Perturb every parameter (zero biases and unit norms hide mapping mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def composed(bias=True, tie=True, layout="pre", approximate="tanh", backend="sdpa", dropout=0.0, **kw):
    torch.manual_seed(0)
    cfg = ModelConfig(**{**SMALL, **kw}, bias=bias, tie_embeddings=tie, layout=layout, dropout=dropout,
                      attention={"kind": "mha", "backend": backend}, norm="layernorm", position="learned",
                      mlp={"kind": "gelu", "approximate": approximate})
    return Transformer(cfg)


def oracle(bias=True, tie=True, post_norm=False, approximate="tanh", dropout=0.0):
    torch.manual_seed(1)
    model = GPT(GPTConfig(block_size=SMALL["block_size"], vocab_size=SMALL["vocab_size"], n_layer=SMALL["n_layer"],
                          n_head=SMALL["n_head"], n_embd=SMALL["n_embd"], dropout=dropout, bias=bias, tie_weights=tie,
                          post_norm=post_norm, gelu_approximate=approximate))
    randomise(model)
    return model.eval()


def batch(T=SMALL["block_size"], seed=2):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, SMALL["vocab_size"], (3, T), generator=g)
    targets = torch.randint(0, SMALL["vocab_size"], (3, T), generator=g)
    targets[0, :5] = -1  # ignored positions, as nanoGPT allows
    return idx, targets


@pytest.mark.parametrize("backend", ["sdpa", "math"])
@pytest.mark.parametrize("approximate", ["tanh", "none"])
@pytest.mark.parametrize("bias, tie", [(True, True), (False, True), (True, False), (False, False)])
def test_composed_gpt2_matches_the_oracle(bias, tie, approximate, backend):
    ref = oracle(bias=bias, tie=tie, approximate=approximate)
    ours = composed(bias=bias, tie=tie, approximate=approximate, backend=backend).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)  # same names, same shapes
    idx, targets = batch()
    with torch.no_grad():
        want_logits, want_loss = ref(idx, targets)
        logits, loss = ours(idx, targets)
    assert rel_err(logits, want_logits) < 1e-5
    assert abs(loss.item() - want_loss.item()) < 1e-5


def test_post_norm_matches_the_post_norm_oracle_and_differs_from_pre_norm():
    post_ref = oracle(post_norm=True)
    post = composed(layout="post").eval()
    post.load_state_dict(post_ref.state_dict(), strict=True)  # no ln_f in either
    pre = composed(layout="pre").eval()
    missing, unexpected = pre.load_state_dict(post_ref.state_dict(), strict=False)
    assert sorted(missing) == ["transformer.ln_f.bias", "transformer.ln_f.weight"] and not unexpected
    idx, _ = batch()
    with torch.no_grad():
        want = post_ref(idx)[0]
        assert rel_err(post(idx)[0], want) < 1e-5
        assert rel_err(pre(idx)[0], want) > 0.1  # same weights, different function


def test_parameter_names_follow_gpt2():
    model = composed(n_layer=1)
    assert list(dict(model.named_parameters())) == [
        "transformer.wte.weight", "transformer.wpe.weight",
        "transformer.h.0.ln_1.weight", "transformer.h.0.ln_1.bias",
        "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_attn.bias",
        "transformer.h.0.attn.c_proj.weight", "transformer.h.0.attn.c_proj.bias",
        "transformer.h.0.ln_2.weight", "transformer.h.0.ln_2.bias",
        "transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_fc.bias",
        "transformer.h.0.mlp.c_proj.weight", "transformer.h.0.mlp.c_proj.bias",
        "transformer.ln_f.weight", "transformer.ln_f.bias",
    ]  # lm_head.weight is wte.weight, so named_parameters lists it once
    assert "lm_head.weight" in model.state_dict()


def test_gpt2_init_std_and_residual_projection_scaling():
    torch.manual_seed(0)
    n_layer, C = 8, 256
    model = Transformer(ModelConfig(vocab_size=2048, block_size=256, n_layer=n_layer, n_head=4, n_embd=C))
    params = dict(model.named_parameters())
    scaled = 0.02 / math.sqrt(2 * n_layer)
    for name, p in params.items():
        if name.endswith("c_proj.weight"):
            assert p.std().item() == pytest.approx(scaled, rel=0.05), name
        elif name.endswith(("c_attn.weight", "c_fc.weight", "wte.weight", "wpe.weight")):
            assert p.std().item() == pytest.approx(0.02, rel=0.05), name
            assert abs(p.mean().item()) < 0.002, name
        elif ".ln_" in name and name.endswith("weight"):
            assert torch.equal(p, torch.ones_like(p)), name
        elif name.endswith("bias"):
            assert torch.equal(p, torch.zeros_like(p)), name


def test_weight_tying_shares_storage_and_gradients():
    tied = composed(tie=True)
    assert tied.lm_head.weight is tied.transformer.wte.weight
    idx, targets = batch()
    tied(idx, targets)[1].backward()
    # one tensor, so the head's and the embedding's gradients accumulate in one place
    assert tied.transformer.wte.weight.grad is tied.lm_head.weight.grad
    untied = composed(tie=False)
    assert untied.lm_head.weight.data_ptr() != untied.transformer.wte.weight.data_ptr()
    vocab_by_width = SMALL["vocab_size"] * SMALL["n_embd"]
    assert untied.num_params() - tied.num_params() == vocab_by_width


def test_num_params_leaves_out_position_parameters_only():
    model = composed()
    total = sum(p.numel() for p in model.parameters())
    assert model.num_params(non_embedding=False) == total
    assert model.num_params() == total - SMALL["block_size"] * SMALL["n_embd"]


def test_dropout_acts_only_in_training():
    noisy = composed(dropout=0.3)
    clean = composed(dropout=0.0)
    clean.load_state_dict(noisy.state_dict())
    idx, _ = batch()
    noisy.eval()
    with torch.no_grad():
        a, b, want = noisy(idx)[0], noisy(idx)[0], clean.eval()(idx)[0]
        assert torch.equal(a, b) and torch.allclose(a, want, atol=1e-6)
        noisy.train()
        c, d = noisy(idx)[0], noisy(idx)[0]
    assert not torch.allclose(c, d) and not torch.allclose(c, want)


def test_dropout_model_matches_the_oracle_in_eval_mode():
    ref = oracle(dropout=0.2)
    ours = composed(dropout=0.2).eval()
    ours.load_state_dict(ref.state_dict())
    idx, targets = batch()
    with torch.no_grad():
        assert rel_err(ours(idx)[0], ref(idx)[0]) < 1e-5


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    plain, ckpt = composed(), composed()
    ckpt.load_state_dict(plain.state_dict())
    ckpt.activation_checkpointing = True
    idx, targets = batch()
    plain(idx, targets)[1].backward()
    ckpt(idx, targets)[1].backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-7), name


def test_last_only_returns_the_last_positions_logits():
    model = composed().eval()
    idx, _ = batch()
    with torch.no_grad():
        full, last = model(idx)[0], model(idx, last_only=True)[0]
    assert last.shape == (3, 1, SMALL["vocab_size"]) and torch.allclose(last[:, 0], full[:, -1], atol=1e-6)


def test_sequences_beyond_learned_positions_are_refused_clearly():
    model = composed()
    with pytest.raises(ValueError, match="sequence of 25 tokens exceeds the positional limit 24"):
        model(torch.zeros(1, 25, dtype=torch.long))


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_embd=30, n_head=4), r"n_embd \(30\) must be divisible by n_head \(4\)"),
    (dict(n_layer=0), "n_layer must be > 0, got 0"),
    (dict(layout="sandwich"), "'layout' must be in"),
    (dict(dropout=1.0), "'dropout' must be < 1.0"),
])
def test_model_config_rejects_bad_shapes(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kwargs)


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("T", [24, 7])
def test_component_report_matches_the_6n_plus_12lhqt_accounting(tie, T):
    model = composed(tie=tie)
    L, C, V, H = SMALL["n_layer"], SMALL["n_embd"], SMALL["vocab_size"], SMALL["n_head"]
    Q = C // H
    rows = {r["component"]: r for r in model.component_report(T)}
    # Kaplan et al. 2020, table 1: per layer 4C^2 (qkv, out) + 8C^2 (MLP) matmul weights; de-embedding V*C
    n_matmul = L * 12 * C * C + V * C
    assert rows["attention"]["flops_per_token"] == L * (2 * 4 * C * C + 4 * T * C)
    assert rows["mlp"]["flops_per_token"] == L * 2 * 8 * C * C
    assert rows["lm_head"]["flops_per_token"] == 2 * V * C
    assert rows["embedding"]["flops_per_token"] == rows["position"]["flops_per_token"] == 0
    forward = rows["total"]["flops_per_token"]
    assert forward == 2 * n_matmul + 4 * L * C * T == model.flops_per_token(T)
    # PaLM (Chowdhery et al. 2022, app. B): training = 6N + 12 L H Q T per token, three times the forward
    assert 3 * forward == 6 * n_matmul + 12 * L * H * Q * T
    # independently: 2 FLOPs per weight of every nn.Linear in the model, plus the attention products
    linear = sum(2 * m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert forward == linear + 4 * L * C * T
    assert rows["total"]["params"] == sum(p.numel() for p in model.parameters())
    assert rows["lm_head"]["params"] == (0 if tie else V * C)


def test_component_report_defaults_to_block_size_and_sums_over_layers():
    model = composed()
    rows = {r["component"]: r for r in model.component_report()}
    assert rows["attention"]["params"] == sum(p.numel() for b in model.transformer.h for p in b.attn.parameters())
    assert rows["norm"]["params"] == (2 * SMALL["n_layer"] + 1) * 2 * SMALL["n_embd"]
    assert rows["attention"]["flops_per_token"] == sum(flops_per_token(b.attn, SMALL["block_size"])
                                                       for b in model.transformer.h)
    assert [r["kind"] for r in model.component_report()][:2] == ["wte", "learned"]
