"""FlexAttention: the same attention as the math path for every attention and position kind, cache or not."""
import warnings

import pytest
import torch

from toolkit import contracts
from toolkit.contracts import Position, attend, dense_score_mod
from toolkit.model import ModelConfig, Transformer, model_dims
from toolkit.plugin_manager import PluginManager

BUILTINS = PluginManager(entry_points=False).registry
ATTENTIONS = {"mha": {}, "gqa": {"n_kv_head": 2}, "mqa": {}, "sliding_window": {"window": 5}}
V, T = 50, 24


@pytest.fixture(autouse=True)
def eager_flex(monkeypatch):
    """Flex's reference implementation: the same mask_mod and score_mod, no inductor compile per shape."""
    monkeypatch.setattr(contracts, "FLEX_COMPILE", False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        yield


def tiny(attention, position, backend, dropout=0.0, n_layer=2, **options):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=V, block_size=T, n_layer=n_layer, n_head=4, n_embd=32, dropout=dropout,
                      attention={"kind": attention, **ATTENTIONS[attention], "backend": backend, **options},
                      position=position)
    return Transformer(cfg, BUILTINS).eval()


def tokens(n=T):
    return torch.randint(0, V, (2, n), generator=torch.Generator().manual_seed(0))


def decode(model, idx, chunks):
    """Logits for idx fed through the KV cache in chunks of the given sizes."""
    cache, out, start = [{} for _ in model.transformer.h], [], 0
    for n in chunks:
        out.append(model(idx[:, start:start + n], cache=cache, start_pos=start)[0])
        start += n
    return torch.cat(out, dim=1)


class Counting:
    """Counts the calls that reach FlexAttention."""

    def __init__(self, monkeypatch):
        self.calls, self.flex_attend = 0, contracts.flex_attend
        monkeypatch.setattr(contracts, "flex_attend", self)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.flex_attend(*args, **kwargs)


@pytest.mark.parametrize("position", BUILTINS.names("position"))
@pytest.mark.parametrize("attention", list(ATTENTIONS))
def test_flex_equals_the_math_path_with_and_without_a_kv_cache(attention, position, monkeypatch):
    flex, math_ = tiny(attention, position, "flex"), tiny(attention, position, "math")
    counting = Counting(monkeypatch)
    idx = tokens()
    with torch.no_grad():
        want = math_(idx)[0]
        torch.testing.assert_close(flex(idx)[0], want, atol=1e-5, rtol=1e-4)
        assert counting.calls == 2  # one per layer: flex did run
        # a prefill, single tokens past the sliding window's 5 (its rolling cache), then a chunk
        torch.testing.assert_close(decode(flex, idx, [7, 1, 1, 1, 6, 8]), want, atol=1e-5, rtol=1e-4)
    assert counting.calls == 2 + 2 * 6


class LearnedBias(Position):
    """A third-party position with a dense score_bias only (a learned bias per head and distance, T5-like)."""

    def __init__(self, n_head, max_distance=T):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(n_head, max_distance, generator=torch.Generator().manual_seed(3)))

    def score_bias(self, q_pos, k_pos):
        distance = (q_pos[:, None] - k_pos[None, :]).clamp(0, self.table.size(1) - 1)  # (Tq, Tk)
        return self.table[:, distance]  # (nh, Tq, Tk)


class SharedBias(Position):
    """A score_bias shared by all heads: (1, Tq, Tk)."""

    def score_bias(self, q_pos, k_pos):
        return -0.3 * (q_pos[:, None] - k_pos[None, :]).float().abs()[None]


@pytest.mark.parametrize("make_position", [lambda: LearnedBias(4), SharedBias], ids=["per-head", "shared"])
@pytest.mark.parametrize("window", [None, 3])
def test_a_position_with_only_a_dense_score_bias_still_works_with_flex(make_position, window):
    position = make_position()
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 4, 10, 8, generator=g), torch.randn(2, 2, 10, 8, generator=g), torch.randn(2, 2, 10, 8, generator=g)
    pos = torch.arange(10)
    with torch.no_grad():
        want = attend(q, k, v, pos, pos, position, window=window, backend="math")
        torch.testing.assert_close(attend(q, k, v, pos, pos, position, window=window, backend="flex"), want)
        # 3 new queries over 10 cached keys
        torch.testing.assert_close(attend(q[:, :, 7:], k, v, pos[7:], pos, position, window=window, backend="flex"),
                                   want[:, :, 7:])


def test_alibi_score_mod_adds_exactly_its_score_bias():
    alibi = BUILTINS.get("position", "alibi").factory(None, model_dims(ModelConfig(n_head=6, n_embd=48)))
    q_pos, k_pos = torch.tensor([5, 6, 9]), torch.tensor([0, 2, 5, 6, 7, 9])  # cached keys, not contiguous
    mod = alibi.score_mod(q_pos, k_pos)
    scores = torch.randn(6, 3, 6)
    h, i, j = torch.meshgrid(torch.arange(6), torch.arange(3), torch.arange(6), indexing="ij")
    torch.testing.assert_close(mod(scores, 0, h, i, j), scores + alibi.score_bias(q_pos, k_pos))
    torch.testing.assert_close(dense_score_mod(alibi.score_bias(q_pos, k_pos))(scores, 0, h, i, j),
                               scores + alibi.score_bias(q_pos, k_pos))


def test_flex_falls_back_where_it_cannot_run_training_on_cpu_and_dropout(monkeypatch):
    counting = Counting(monkeypatch)
    idx = tokens()
    # training on CPU: FlexAttention has no backward there, so the step runs SDPA with the same result
    flex, sdpa = tiny("sliding_window", "alibi", "flex").train(), tiny("sliding_window", "alibi", "sdpa").train()
    loss = flex(idx, idx)[1]
    loss.backward()
    torch.testing.assert_close(loss, sdpa(idx, idx)[1])
    assert flex.transformer.h[0].attn.c_attn.weight.grad is not None
    # attention dropout: flex has none, so dropout > 0 in training mode takes SDPA (same draws, same output)
    flex, sdpa = tiny("mha", "alibi", "flex", dropout=0.5).train(), tiny("mha", "alibi", "sdpa", dropout=0.5).train()
    with torch.no_grad():
        torch.manual_seed(7)
        got = flex(idx)[0]
        torch.manual_seed(7)
        torch.testing.assert_close(got, sdpa(idx)[0])
        assert counting.calls == 0
        flex.eval()(idx)  # evaluation has no dropout: flex again
    assert counting.calls == 2


@pytest.mark.parametrize("attention, position, fused", [
    ("mha", "learned", False),           # plain causal: SDPA's flash-eligible is_causal path
    ("mha", "alibi", True),              # a closed-form bias: score_mod
    ("sliding_window", "rope", True),    # a window: block mask
    ("sliding_window", "alibi", True),
])
def test_the_default_backend_takes_flex_only_where_sdpa_would_need_a_mask(attention, position, fused, monkeypatch):
    monkeypatch.setattr(contracts, "prefer_flex", lambda q, fresh: fresh)  # as on CUDA
    counting = Counting(monkeypatch)
    model = tiny(attention, position, "sdpa")
    idx = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], tiny(attention, position, "math")(idx)[0], atol=1e-5, rtol=1e-4)
        assert counting.calls == (2 if fused else 0)
        decode(model, idx, [20, 1])  # prefill: fresh; the step over the cache: SDPA with its small mask
    assert counting.calls == (4 if fused else 0)


def test_the_default_backend_keeps_sdpa_for_a_dense_bias_it_already_built(monkeypatch):
    monkeypatch.setattr(contracts, "prefer_flex", lambda q, fresh: fresh)
    counting = Counting(monkeypatch)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 6, 8, generator=g) for _ in range(3))
    pos = torch.arange(6)
    with torch.no_grad():
        attend(q, k, v, pos, pos, LearnedBias(4), backend="sdpa")
    assert counting.calls == 0


def test_the_default_backend_never_takes_flex_on_cpu(monkeypatch):
    counting = Counting(monkeypatch)
    with torch.no_grad():
        tiny("sliding_window", "alibi", "sdpa")(tokens())
    assert counting.calls == 0


def test_unknown_backend_is_refused_naming_the_choices():
    x, pos = torch.zeros(1, 1, 2, 4), torch.arange(2)
    with pytest.raises(ValueError, match="'flash'.*sdpa, flex, math"):
        attend(x, x, x, pos, pos, backend="flash")


@pytest.mark.slow
def test_an_eager_flex_model_equals_the_math_path_with_compiled_flex_on(monkeypatch):
    """What an eager model with backend "flex" runs (on a GPU inductor's fused kernel; on a CPU the reference,
    since the CPU kernel gave NaN on an AVX2 machine): gqa, window, ALiBi, cache."""
    monkeypatch.setattr(contracts, "FLEX_COMPILE", True)
    torch._dynamo.reset()
    flex = tiny("sliding_window", "alibi", "flex", n_layer=1, n_kv_head=2)
    math_ = tiny("sliding_window", "alibi", "math", n_layer=1, n_kv_head=2)
    idx = tokens()
    with torch.no_grad():
        want = math_(idx)[0]
        torch.testing.assert_close(flex(idx)[0], want, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(decode(flex, idx, [20, 1, 1, 2]), want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("position", ["rope", "alibi"])
@pytest.mark.parametrize("attention", ["gqa", "sliding_window"])
def test_soft_capped_logits_are_the_same_through_flex_and_the_math_path(attention, position, monkeypatch):
    # a cap near the logits of a freshly initialised model (about 0.01), so that it bends them
    flex, math, sdpa = (tiny(attention, position, backend, softcap=0.005) for backend in ("flex", "math", "sdpa"))
    counting = Counting(monkeypatch)
    idx = tokens()
    with torch.no_grad():
        # SDPA cannot cap: on a CPU the "sdpa" backend takes the math path, which flex must equal
        torch.testing.assert_close(sdpa(idx)[0], math(idx)[0], atol=1e-6, rtol=1e-5)
        assert counting.calls == 0
        torch.testing.assert_close(flex(idx)[0], math(idx)[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(decode(flex, idx, [5, 1, 1, 17]), math(idx)[0], atol=1e-5, rtol=1e-4)
    assert counting.calls > 0
    uncapped = tiny(attention, position, "math")
    with torch.no_grad():
        assert not torch.allclose(uncapped(idx)[0], math(idx)[0], atol=1e-3)  # the cap does something


def test_alibi_gives_the_head_count_an_attention_asks_for():
    alibi = BUILTINS.build_in("position", "alibi", model_dims(ModelConfig(vocab_size=V, block_size=T, n_head=8, n_embd=32)))
    pos = torch.arange(6)
    assert alibi.score_bias(pos, pos).shape == (8, 6, 6)
    half = alibi.score_bias(pos, pos, n_head=4)  # differential attention: half as many heads
    assert half.shape == (4, 6, 6) and torch.allclose(half[0, 5, 0], torch.tensor(-5 * 2 ** -2.0))


@pytest.mark.slow
def test_a_compiled_model_with_backend_flex_decodes_over_a_long_cache():
    """A compiled model asked for flex: its prefill in inductor's flex kernel, and a step over 256
    cached keys, which on CPU inductor cannot lower in flex and so takes the masked SDPA path."""
    torch.manual_seed(0)
    cfg = dict(vocab_size=V, block_size=260, n_layer=1, n_head=4, n_embd=32, position="alibi")
    flex = Transformer(ModelConfig(**cfg, attention={"kind": "gqa", "n_kv_head": 2, "backend": "flex"}), BUILTINS).eval()
    math_ = Transformer(ModelConfig(**cfg, attention={"kind": "gqa", "n_kv_head": 2, "backend": "math"}), BUILTINS).eval()
    math_.load_state_dict(flex.state_dict())
    torch._dynamo.reset()
    compiled = torch.compile(flex)
    idx = tokens(258)
    cache = [{}]
    with torch.no_grad():
        out = [compiled(idx[:, :256], cache=cache)[0], compiled(idx[:, 256:257], cache=cache, start_pos=256)[0]]
        torch.testing.assert_close(torch.cat(out, dim=1), math_(idx[:, :257])[0], atol=1e-5, rtol=1e-4)
