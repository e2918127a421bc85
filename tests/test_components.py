"""Behaviour specific to the built-in components: the arithmetic each paper prescribes, checked against
independent references (the conformance kit checks the shared contract; see test_conformance.py)."""
import math

import pytest
import torch

from toolkit.plugins.impl.mlp import gated_hidden_dim
from toolkit.plugins.impl.position import alibi_slopes
from toolkit.plugins.attention import GQAOptions
from toolkit.plugins.mlp import GatedOptions
from toolkit.converter import resolve_spec, structure
from toolkit.errors import ConfigError
from toolkit.contracts import Dims, flops_per_token
from toolkit.families import SPEC_TYPES
from toolkit.model import ModelConfig, Transformer
from toolkit.plugin_manager import PluginManager
from toolkit.registry import UnknownComponentError

SMALL = dict(vocab_size=61, block_size=48, n_layer=2, n_head=4, n_embd=32)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: a second intra-op thread only adds synchronisation (and stalls on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def registry():
    return PluginManager(entry_points=False).registry


def model(registry, seed=0, **kw):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**{**SMALL, **kw}), registry).eval()


def component(registry, family, spec, *args, **dims):
    d = Dims(**{**dict(n_embd=32, n_head=4, n_layer=2, block_size=48, vocab_size=61), **dims}, build=registry.build_in)
    spec = SPEC_TYPES[family](spec) if isinstance(spec, str) else spec
    return registry.build(resolve_spec(registry, spec), d, *args)


def _spec(family, kind, **options):
    return SPEC_TYPES[family](kind, options or None)


def tokens(T=SMALL["block_size"], seed=0):
    return torch.randint(0, SMALL["vocab_size"], (2, T), generator=torch.Generator().manual_seed(seed))


def decode(m, idx, step=1):
    cache = [{} for _ in m.transformer.h]
    out = [m(idx[:, s:s + step], cache=cache, start_pos=s)[0] for s in range(0, idx.size(1), step)]
    return torch.cat(out, dim=1), cache


# -- ALiBi ---------------------------------------------------------------------------------------
def test_alibi_slopes_for_8_heads_are_the_papers_geometric_sequence():
    # Press et al. 2021, section 3: "for 8 heads the slopes are 1/2^1, 1/2^2, ..., 1/2^8"
    assert alibi_slopes(8) == [1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 64, 1 / 128, 1 / 256]


def test_alibi_slopes_for_12_heads_interleave_the_16_head_sequence():
    # not a power of 2: the 8-head slopes, then every other slope of the 16-head sequence (2^-0.5, 2^-1.5, ...)
    want = [2 ** -i for i in range(1, 9)] + [2 ** -0.5, 2 ** -1.5, 2 ** -2.5, 2 ** -3.5]
    assert alibi_slopes(12) == pytest.approx(want, rel=1e-12)
    assert alibi_slopes(16) == pytest.approx([2 ** (-0.5 * i) for i in range(1, 17)], rel=1e-12)


def test_alibi_bias_is_minus_slope_times_distance(registry):
    alibi = component(registry, "position", "alibi", n_head=8, n_embd=64)
    bias = alibi.score_bias(torch.arange(5, 8), torch.arange(8))  # 3 cached-step queries over 8 keys
    assert bias.shape == (8, 3, 8)
    for h, slope in enumerate(alibi_slopes(8)):
        want = torch.tensor([[-(q - k) * slope for k in range(8)] for q in range(5, 8)])
        torch.testing.assert_close(bias[h], want)


# -- RoPE ----------------------------------------------------------------------------------------
def rope_reference(x, pos, theta=10000.0):
    """RoPE as complex rotation: dims (i, i + hs/2) form the pair rotated by pos * theta^(-2i/hs)."""
    hs = x.size(-1)
    z = torch.complex(x[..., : hs // 2].double(), x[..., hs // 2:].double())
    angle = pos.double()[:, None] * theta ** (-torch.arange(0, hs, 2).double() / hs)  # (T, hs/2)
    z = z * torch.polar(torch.ones_like(angle), angle)
    return torch.cat([z.real, z.imag], dim=-1).to(x.dtype)


@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_rope_matches_an_independent_rotation(registry, theta):
    rope = component(registry, "position", _spec("position", "rope", theta=theta), n_embd=64, block_size=16)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 20, 16, generator=g), torch.randn(2, 2, 20, 16, generator=g)
    pos = torch.arange(100, 120)  # past block_size: RoPE has no limit
    q_rot, k_rot = rope.rotate(q, k, pos)
    torch.testing.assert_close(q_rot, rope_reference(q, pos, theta), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(k_rot, rope_reference(k, pos, theta), atol=2e-5, rtol=1e-5)


def test_rope_scores_depend_only_on_the_distance(registry):
    rope = component(registry, "position", "rope", n_embd=64, n_head=4)
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 1, 1, 16, generator=g), torch.randn(1, 1, 1, 16, generator=g)

    def score(m, n):
        q_m, _ = rope.rotate(q, k, torch.tensor([m]))
        _, k_n = rope.rotate(q, k, torch.tensor([n]))
        return (q_m * k_n).sum().item()

    for m, n in [(7, 3), (3, 7), (20, 20)]:
        for shift in (1, 50, 1000):
            assert score(m + shift, n + shift) == pytest.approx(score(m, n), abs=1e-4)
    assert score(7, 3) != pytest.approx(score(9, 3), abs=1e-3)  # and it does depend on the distance


def test_rope_rotates_in_fp32_and_returns_the_input_dtype(registry):
    rope = component(registry, "position", "rope", n_embd=64, n_head=4)
    q = torch.randn(1, 4, 8, 16).bfloat16()
    pos = torch.arange(4000, 4008)
    q_rot, _ = rope.rotate(q, q, pos)
    assert q_rot.dtype == torch.bfloat16
    # rotating bf16 values in fp32 then rounding once: as close as bf16 allows to the exact rotation
    torch.testing.assert_close(q_rot.float(), rope_reference(q.float(), pos), atol=0.02, rtol=0.01)


def test_rope_needs_an_even_head_dim(registry):
    with pytest.raises(ConfigError, match="even head dim"):
        component(registry, "position", "rope", n_embd=36, n_head=4)


# -- sinusoidal, none ----------------------------------------------------------------------------
def test_sinusoidal_encoding_is_the_papers_formula_beyond_block_size(registry):
    sin = component(registry, "position", _spec("position", "sinusoidal", scale=1.0), n_embd=6)
    pos = torch.tensor([0, 1, 500])  # block_size is 48: no limit
    pe = sin.embed(torch.zeros(1, 3, 6), pos)[0]
    want = [[f(p / 10000 ** (2 * (i // 2) / 6)) for i, f in enumerate([math.sin, math.cos] * 3)] for p in (0, 1, 500)]
    torch.testing.assert_close(pe, torch.tensor(want))
    assert sin.max_len is None and not list(sin.state_dict())


def test_sinusoidal_default_scale_matches_the_token_embedding_init(registry):
    sin = component(registry, "position", "sinusoidal", n_embd=64)
    pe = sin.embed(torch.zeros(1, 48, 64), torch.arange(48))[0]
    # unit-amplitude encodings would swamp GPT-2-initialised token embeddings (std 0.02)
    assert 0.005 < pe.std().item() < 0.03


def test_positions_without_a_limit_decode_past_block_size(registry):
    for kind in ("sinusoidal", "rope", "alibi", "none"):
        m = model(registry, block_size=8, position=kind)
        idx = tokens(20)
        full, _ = m(idx)  # a forward longer than block_size is allowed when the position has no limit
        cached, _ = decode(m, idx, step=3)
        torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-4)


def test_nope_adds_nothing_anywhere(registry):
    none = component(registry, "position", "none")
    x = torch.randn(2, 5, 32)
    assert none.embed(x, torch.arange(5)) is x and none.rotate(x, x, torch.arange(5)) == (x, x)
    assert none.score_bias(torch.arange(5), torch.arange(5)) is None and not list(none.parameters())


# -- grouped-query and multi-query attention -----------------------------------------------------
def test_gqa_with_n_kv_head_equal_to_n_head_is_mha_with_gpt2s_layout(registry):
    mha = model(registry, attention="mha", position="rope")
    gqa = model(registry, seed=1, attention={"kind": "gqa", "n_kv_head": 4}, position="rope")
    assert mha.transformer.h[0].attn.c_attn.weight.shape == (3 * 32, 32)  # GPT-2's c_attn
    gqa.load_state_dict(mha.state_dict(), strict=True)
    idx = tokens()
    assert torch.equal(gqa(idx)[0], mha(idx)[0])


@pytest.mark.parametrize("n_kv_head", [1, 2])
def test_gqa_equals_mha_with_each_kv_head_repeated_for_its_query_group(registry, n_kv_head):
    # query head h reads key/value head h // (n_head / n_kv_head) (Ainslie et al. 2023; HF's repeat_kv)
    gqa = model(registry, attention={"kind": "gqa", "n_kv_head": n_kv_head}, position="alibi")
    mha = model(registry, seed=1, attention="mha", position="alibi")
    state = gqa.state_dict()
    C, hs, group = 32, 8, 4 // n_kv_head
    for i in range(SMALL["n_layer"]):
        for name in ("weight", "bias"):
            w = state.pop(f"transformer.h.{i}.attn.c_attn.{name}")
            q, k, v = w.split([C, n_kv_head * hs, n_kv_head * hs])
            k = k.unflatten(0, (n_kv_head, hs)).repeat_interleave(group, dim=0).flatten(0, 1)  # (C, ...)
            v = v.unflatten(0, (n_kv_head, hs)).repeat_interleave(group, dim=0).flatten(0, 1)
            state[f"transformer.h.{i}.attn.c_attn.{name}"] = torch.cat([q, k, v])
    mha.load_state_dict(state, strict=True)
    idx = tokens()
    torch.testing.assert_close(gqa(idx)[0], mha(idx)[0], atol=1e-5, rtol=1e-4)


def test_mqa_is_gqa_with_one_kv_head(registry):
    mqa = model(registry, attention="mqa")
    gqa = model(registry, seed=1, attention={"kind": "gqa", "n_kv_head": 1})
    assert mqa.transformer.h[0].attn.c_attn.weight.shape == ((4 + 2) * 8, 32)
    gqa.load_state_dict(mqa.state_dict(), strict=True)
    idx = tokens()
    assert torch.equal(gqa(idx)[0], mqa(idx)[0])


def test_gqa_rejects_n_kv_head_that_does_not_divide_n_head(registry):
    with pytest.raises(ConfigError, match=r"model\.attention\.n_kv_head \(3\) must divide model\.n_head \(4\)"):
        model(registry, attention={"kind": "gqa", "n_kv_head": 3})
    with pytest.raises(ConfigError, match=r"n_kv_head \(8\) must divide model\.n_head \(4\)"):
        model(registry, attention={"kind": "sliding_window", "n_kv_head": 8})


@pytest.mark.parametrize("table, line", [
    ({"kind": "gqa", "n_kv_head": 0}, "$.model.attention.n_kv_head: must be a positive integer, got 0"),
    ({"kind": "gqa", "n_kv_head": "2"}, '$.model.attention.n_kv_head: expected int, got "2"'),
    ({"kind": "sliding_window", "window": -1}, "$.model.attention.window: must be a positive integer, got -1"),
    ({"kind": "mha", "backend": "flash"}, '$.model.attention.backend: must be one of "sdpa", "flex", "math", got "flash"'),
    ({"kind": "mqa", "qk_norm": 3}, "$.model.attention.qk_norm: expected string, got 3"),
])
def test_bad_attention_options_are_one_line_errors_at_their_path(registry, table, line):
    with pytest.raises(ConfigError) as err:
        structure(registry, {"attention": table}, ModelConfig, "$.model")
    assert err.value.lines == [line]


def test_attention_flops_count_projections_and_the_context_each_query_sees(registry):
    C, nh, hs, T = 32, 4, 8, 40
    cases = {"mha": (4, T), "mqa": (1, T), ("gqa", 2): (2, T), ("sliding_window", 16): (4, 16), ("sliding_window", 64): (4, T)}
    for key, (nkv, context) in cases.items():
        kind, opt = key if isinstance(key, tuple) else (key, None)
        opts = {} if opt is None else {"n_kv_head": opt} if kind == "gqa" else {"window": opt}
        attn = component(registry, "attention", _spec("attention", kind, **opts))
        want = 2 * ((nh + 2 * nkv) * hs * C + C * C) + 4 * context * nh * hs
        assert flops_per_token(attn, T) == want, key


# -- sliding window ------------------------------------------------------------------------------
def masked_reference(attn, x, pos, window):
    """Windowed causal attention built from an explicit (T, T) band mask, for one attention module."""
    B, T, C = x.shape
    nh, nkv, hs = attn.n_head, attn.n_kv_head, attn.head_dim
    q, k, v = attn.c_attn(x).split([nh * hs, nkv * hs, nkv * hs], dim=2)
    q = q.view(B, T, nh, hs).transpose(1, 2)
    k = k.view(B, T, nkv, hs).transpose(1, 2).repeat_interleave(nh // nkv, dim=1)
    v = v.view(B, T, nkv, hs).transpose(1, 2).repeat_interleave(nh // nkv, dim=1)
    i, j = pos[:, None], pos[None, :]
    band = (j <= i) & (j > i - window)  # query i sees keys i - window + 1 .. i
    att = (q @ k.transpose(-2, -1) / math.sqrt(hs)).masked_fill(~band, float("-inf")).softmax(-1)
    return attn.c_proj((att @ v).transpose(1, 2).reshape(B, T, C))


@pytest.mark.parametrize("backend", ["sdpa", "math"])
@pytest.mark.parametrize("n_kv_head", [None, 2])
def test_sliding_window_equals_a_band_masked_reference(registry, backend, n_kv_head):
    opts = {"window": 5, "backend": backend, **({"n_kv_head": n_kv_head} if n_kv_head else {})}
    attn = component(registry, "attention", _spec("attention", "sliding_window", **opts)).eval()
    none = component(registry, "position", "none")
    x = torch.randn(2, 30, 32, generator=torch.Generator().manual_seed(0))
    pos = torch.arange(30)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, none, pos), masked_reference(attn, x, pos, 5), atol=1e-5, rtol=1e-4)


def test_sliding_window_cache_stays_bounded_and_decodes_like_the_full_forward(registry):
    m = model(registry, attention={"kind": "sliding_window", "window": 6}, position="rope")
    idx = tokens(40)
    full, _ = m(idx)
    cache = [{} for _ in m.transformer.h]
    outs = []
    for start, n in [(0, 9), *[(s, 1) for s in range(9, 30)], (30, 10)]:  # prefill, single steps, a chunk
        outs.append(m(idx[:, start:start + n], cache=cache, start_pos=start)[0])
        for layer in cache:
            assert layer["k"].size(2) == layer["v"].size(2) == layer["pos"].numel() == min(6, start + n)
        assert cache[0]["pos"].tolist() == list(range(max(0, start + n - 6), start + n))
    torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=1e-5, rtol=1e-4)


def test_sliding_window_wider_than_the_sequence_is_causal_attention(registry):
    sw = model(registry, attention={"kind": "sliding_window", "window": 48}, position="alibi")
    mha = model(registry, seed=1, attention="mha", position="alibi")
    mha.load_state_dict(sw.state_dict())
    idx = tokens()
    torch.testing.assert_close(sw(idx)[0], mha(idx)[0], atol=1e-5, rtol=1e-4)


# -- backends, qk_norm ---------------------------------------------------------------------------
@pytest.mark.parametrize("attention", [{"kind": "mha"}, {"kind": "gqa", "n_kv_head": 2}, {"kind": "mqa"},
                                       {"kind": "sliding_window", "window": 7}])
@pytest.mark.parametrize("position", ["learned", "rope", "alibi"])
def test_sdpa_and_math_backends_give_the_same_outputs(registry, attention, position):
    sdpa = model(registry, attention={**attention, "backend": "sdpa"}, position=position)
    math_ = model(registry, attention={**attention, "backend": "math"}, position=position)
    idx = tokens()
    torch.testing.assert_close(math_(idx)[0], sdpa(idx)[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(decode(math_, idx, step=5)[0], decode(sdpa, idx, step=5)[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("norm, mean_zero", [("rmsnorm", False), ("layernorm", True)])
def test_qk_norm_normalises_each_head_of_queries_and_keys(registry, norm, mean_zero):
    attn = component(registry, "attention", _spec("attention", "gqa", n_kv_head=2, qk_norm=norm), bias=False)
    seen = {}
    attn.q_norm.register_forward_hook(lambda mod, args, out: seen.__setitem__("q", out))
    attn.k_norm.register_forward_hook(lambda mod, args, out: seen.__setitem__("k", out))
    none = component(registry, "position", "none")
    attn(torch.randn(2, 9, 32) * 30, none, torch.arange(9))
    assert seen["q"].shape == (2, 4, 9, 8) and seen["k"].shape == (2, 2, 9, 8)  # per head, over head_dim
    for t in seen.values():
        torch.testing.assert_close(t.pow(2).mean(-1), torch.ones(t.shape[:-1]), atol=1e-3, rtol=1e-3)  # unit RMS
        if mean_zero:
            torch.testing.assert_close(t.mean(-1), torch.zeros(t.shape[:-1]), atol=1e-5, rtol=0)


def test_qk_norm_makes_attention_blind_to_the_scale_of_queries_and_keys(registry):
    def out(qk_norm, scale):
        opts = {"qk_norm": qk_norm} if qk_norm else {}
        torch.manual_seed(0)
        attn = component(registry, "attention", _spec("attention", "mha", **opts), bias=False)
        with torch.no_grad():
            attn.c_attn.weight[: 2 * 32] *= scale  # q and k rows
        return attn(x, none, torch.arange(9))

    none = component(registry, "position", "none")
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out("rmsnorm", 10.0), out("rmsnorm", 1.0), atol=1e-4, rtol=1e-3)
    assert (out(None, 10.0) - out(None, 1.0)).abs().max() > 1e-2


def test_unknown_qk_norm_names_the_registered_norms(registry):
    with pytest.raises(UnknownComponentError, match="unknown norm 'rms'; did you mean 'rmsnorm'"):
        model(registry, attention={"kind": "mha", "qk_norm": "rms"})


# -- norms ---------------------------------------------------------------------------------------
def test_rmsnorm_matches_llamas_formula_in_fp32_and_bf16(registry):
    norm = component(registry, "norm", "rmsnorm", 16)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 16))
    x = torch.randn(3, 5, 16) * 4 + 1
    want = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), want)
    norm16 = norm.to(torch.bfloat16)
    got = norm16(x.bfloat16())
    assert got.dtype == torch.bfloat16
    # normalised in fp32, rounded to bf16, then scaled in bf16 (as HF Llama does)
    ref = norm16.weight * (x.bfloat16().float() * torch.rsqrt(x.bfloat16().float().pow(2).mean(-1, keepdim=True) + 1e-5)).bfloat16()
    assert torch.equal(got, ref)


def test_rmsnorm_has_a_weight_and_no_bias_and_its_eps_is_an_option(registry):
    norm = component(registry, "norm", _spec("norm", "rmsnorm", eps=1e-6), 16)
    assert [n for n, _ in norm.named_parameters()] == ["weight"] and norm.eps == 1e-6


# -- gated MLPs ----------------------------------------------------------------------------------
@pytest.mark.parametrize("n_embd, options, hidden", [
    (768, {}, 2048),                        # 8/3 * 768 = 2048 exactly
    (4096, {}, 10944),                      # 8/3 * 4096 = 10922.7 -> 171 * 64
    (4096, {"multiple_of": 256}, 11008),    # Llama 7B's width
    (32, {}, 128),                          # 85.3 -> 128
    (32, {"multiple_of": 1}, 86),
    (100, {"multiplier": 1.1, "multiple_of": 1}, 110),  # 1.1 * 100 is 110.00000000000001 in floats: still 110
    (64, {"hidden_dim": 100}, 100),         # explicit width wins, no rounding
])
def test_gated_hidden_size_rounds_multiplier_times_n_embd_up_to_multiple_of(n_embd, options, hidden):
    assert gated_hidden_dim(GatedOptions(**options), n_embd) == hidden


@pytest.mark.parametrize("kind, act", [("swiglu", torch.nn.functional.silu), ("geglu", torch.nn.functional.gelu)])
def test_gated_mlp_is_c_proj_of_act_gate_times_up_with_fused_rows(registry, kind, act):
    mlp = component(registry, "mlp", kind, bias=False)
    C, H = 32, 128
    assert mlp.c_fc.weight.shape == (2 * H, C) and mlp.c_proj.weight.shape == (C, H)
    x = torch.randn(2, 5, C)
    gate_w, up_w = mlp.c_fc.weight[:H], mlp.c_fc.weight[H:]  # rows [gate; up]
    want = (act(x @ gate_w.T) * (x @ up_w.T)) @ mlp.c_proj.weight.T
    torch.testing.assert_close(mlp(x), want)
    # 3 matrices of C x H: parameters and 2 FLOPs per weight
    assert sum(p.numel() for p in mlp.parameters()) == 3 * C * H
    assert flops_per_token(mlp, 16) == 6 * C * H


def test_gated_default_width_keeps_the_parameters_of_a_4x_mlp(registry):
    # Shazeer 2020: hidden 8/3 * C with three matrices ~ hidden 4 * C with two
    gelu, swiglu = component(registry, "mlp", "gelu", n_embd=768, n_head=12), component(registry, "mlp", "swiglu", n_embd=768, n_head=12)
    assert sum(p.numel() for p in swiglu.parameters() if p.dim() == 2) == sum(p.numel() for p in gelu.parameters() if p.dim() == 2)


def test_gqa_options_default_to_one_kv_head_per_query_head(registry):
    assert GQAOptions().n_kv_head is None
    attn = component(registry, "attention", "gqa")
    assert attn.n_kv_head == 4
