"""The conformance kit over every built-in component, over component grids, and against broken components
(a kit that passes everything would prove nothing)."""
import math

import pytest
import torch
from torch import nn

from toolkit.contracts import Position, attend, update_cache
from toolkit.plugin_manager import PluginManager
from toolkit.testing import ComponentConformance, conformance
from toolkit.families import MODEL_FAMILIES
from toolkit.testing.conformance import ConformanceError, check_component

BUILTINS = PluginManager(entry_points=False).registry

# options worth checking beyond the defaults (sliding_window's default window is wider than the tiny model)
VARIANTS = {
    ("attention", "gqa"): [{"n_kv_head": 2}, {"n_kv_head": 1, "qk_norm": "rmsnorm", "backend": "math"},
                           {"n_kv_head": 2, "softcap": 0.05}],
    ("attention", "mla"): [None, {"q_rank": 16, "rope_dim": 2, "v_dim": 12}],
    ("attention", "diff"): [None, {"lambda_init": 0.5, "backend": "math"}],
    ("attention", "mha"): [None, {"qk_norm": "layernorm"}],
    ("attention", "gated"): [None, {"gate": "headwise", "n_kv_head": 2}],
    ("attention", "sliding_window"): [{"window": 4}, {"window": 3, "n_kv_head": 2, "qk_norm": "rmsnorm"},
                                      {"window": 4, "window_start": 2}],
    # the speedrun's attention: value residual, value embeddings, QK-norm and a growing window at once
    ("attention", "value_residual"): [None, {"value_embeds": 1, "window": 4, "window_start": 2, "qk_norm": "rmsnorm"}],
    ("norm", "rmsnorm"): [None, {"eps": 1e-6}],
    # scaled RoPE (Llama 3.1, YaRN) rotates by fixed, rescaled frequencies: the same contract as plain rope
    ("position", "rope"): [None, {"scaling": "llama3", "factor": 8.0, "original_max_len": 16},
                           {"scaling": "yarn", "factor": 4.0, "original_max_len": 16}],
    ("mlp", "swiglu"): [None, {"hidden_dim": 40}],
    ("mlp", "geglu"): [None, {"approximate": "tanh", "multiple_of": 8}],
}
CASES = [(c.family, c.name, opts) for c in BUILTINS if c.family in MODEL_FAMILIES
         for opts in VARIANTS.get((c.family, c.name), [None])]


@pytest.mark.parametrize("family, name, options", CASES, ids=[f"{f}-{n}-{o}" for f, n, o in CASES])
def test_builtin_component_passes_the_conformance_kit(family, name, options):
    check_component(family, name, options, registry=BUILTINS)


ATTENTIONS = [("mha", None), ("gqa", {"n_kv_head": 2}), ("mqa", None), ("sliding_window", {"window": 4})]


@pytest.mark.parametrize("position", BUILTINS.names("position"))
@pytest.mark.parametrize("kind, options", ATTENTIONS, ids=[a for a, _ in ATTENTIONS])
def test_every_attention_works_with_every_position(kind, options, position):
    subject = conformance.make_subject("attention", kind, options, BUILTINS, model={"position": position})
    for check in ("shape_and_dtype", "causal", "kv_cache", "gradients"):
        conformance.run_check(subject, check)


@pytest.mark.parametrize("layout", ["pre", "post"])
@pytest.mark.parametrize("mlp", BUILTINS.names("mlp"))
@pytest.mark.parametrize("norm", BUILTINS.names("norm"))
def test_every_norm_works_with_every_mlp_in_both_layouts(norm, mlp, layout):
    subject = conformance.make_subject("norm", norm, None, BUILTINS,
                                       model={"mlp": mlp, "layout": layout, "position": "rope", "attention": "mqa"})
    for check in ("causal", "kv_cache", "gradients"):
        conformance.run_check(subject, check)


class TestSlidingWindowThroughTheConformanceClass(ComponentConformance):
    """The pytest-class form of the kit, as a plugin package would use it."""

    family = "attention"
    name = "sliding_window"
    options = {"window": 5, "n_kv_head": 2}
    model = {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu"}
    compile_backend = "aot_eager"  # the inductor compiles are timed in test_compiled_* below


# CPU inductor compiles are slow (about 20 s for the first in a process, 3-8 s after, on 2 idle cores),
# so inductor compiles the Llama-like model only; the other attention kinds go through Dynamo and
# AOTAutograd with backend="aot_eager", which is where a plugin's Python would break a compile.
COMPILED = [("gqa", {"n_kv_head": 2}, "rope", "rmsnorm", "swiglu", "inductor"),
            ("mha", None, "learned", "layernorm", "gelu", "aot_eager"),
            ("mqa", None, "alibi", "layernorm", "geglu", "aot_eager"),
            ("sliding_window", {"window": 4}, "sinusoidal", "rmsnorm", "relu", "aot_eager")]


@pytest.mark.slow
@pytest.mark.parametrize("kind, options, position, norm, mlp, backend", COMPILED, ids=[f"{c[0]}-{c[-1]}" for c in COMPILED])
def test_compiled_model_matches_eager(kind, options, position, norm, mlp, backend):
    check_component("attention", kind, options, BUILTINS, checks=["compile"], compile_backend=backend,
                    model={"position": position, "norm": norm, "mlp": mlp})


# -- the kit catches broken components -----------------------------------------------------------
class Leaky(nn.Module):
    """Attention without a causal mask."""

    def __init__(self, opts, dims):
        super().__init__()
        self.n_head = dims.n_head
        self.c_attn = nn.Linear(dims.n_embd, 3 * dims.n_embd)
        self.c_proj = nn.Linear(dims.n_embd, dims.n_embd)

    def heads(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        return [t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v)]  # (B, nh, T, hs)

    def merge(self, y):
        B, nh, T, hs = y.shape
        return self.c_proj(y.transpose(1, 2).reshape(B, T, nh * hs))

    def forward(self, x, position, pos, cache=None):
        q, k, v = self.heads(x)
        k, v, _ = update_cache(cache, k, v, pos)
        return self.merge(torch.nn.functional.scaled_dot_product_attention(q, k, v))


class Forgetful(Leaky):
    """Attention that never stores keys and values in the cache."""

    def forward(self, x, position, pos, cache=None):
        q, k, v = self.heads(x)
        q, k = position.rotate(q, k, pos)
        return self.merge(attend(q, k, v, pos, pos, position))


class Unrotated(Leaky):
    """Attention that ignores the position's rotate hook (so RoPE does nothing)."""

    def forward(self, x, position, pos, cache=None):
        q, k, v = self.heads(x)
        k, v, k_pos = update_cache(cache, k, v, pos)
        return self.merge(attend(q, k, v, pos, k_pos, position))


class UnusedScale(nn.Module):
    """Norm with a parameter forward never uses."""

    def __init__(self, opts, dims, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.unused = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return torch.nn.functional.layer_norm(x, x.shape[-1:], self.weight)


class SequenceNorm(nn.Module):
    """Norm over the sequence as well as the features: sees the future."""

    def __init__(self, opts, dims, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return self.weight * (x - x.mean(dim=(1, 2), keepdim=True))


class Upcast(nn.Module):
    """MLP that returns fp32 whatever it is given."""

    def __init__(self, opts, dims):
        super().__init__()
        self.c_fc = nn.Linear(dims.n_embd, dims.n_embd)

    def forward(self, x):
        return self.c_fc(x).float()


class Noisy(Upcast):
    """MLP with fresh noise in eval mode and a random buffer left out of the state_dict."""

    def __init__(self, opts, dims):
        super().__init__(opts, dims)
        self.register_buffer("shift", torch.randn(dims.n_embd), persistent=False)

    def forward(self, x):
        return self.c_fc(x) + self.shift + 0.01 * torch.randn_like(x)


class ShrinkingFlops(Upcast):
    """MLP whose FLOP count falls as the sequence grows."""

    def forward(self, x):
        return self.c_fc(x)

    def flops_per_token(self, seq_len):
        return 1000 // seq_len


class WrongBias(Position):
    """Position whose score bias ignores the query positions."""

    def __init__(self, opts, dims):
        super().__init__()

    def score_bias(self, q_pos, k_pos):
        return -(k_pos[None, None, :] - k_pos[:, None]).abs().float()  # (Tk, Tk): wrong shape once cached


class LateLeak(Leaky):
    """Attention whose causal mask stops at position 20: later queries see the future (the kit's old 16-token model missed it)."""

    def forward(self, x, position, pos, cache=None):
        q, k, v = self.heads(x)
        q, k = position.rotate(q, k, pos)
        k, v, k_pos = update_cache(cache, k, v, pos)
        visible = (k_pos[None, :] <= pos[:, None]) | (pos[:, None] >= 20)  # (Tq, Tk)
        mask = torch.zeros(visible.shape).masked_fill(~visible, float("-inf"))
        return self.merge(torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask))


class ShortMemory(Leaky):
    """Attention whose KV cache keeps only the last 20 keys."""

    def forward(self, x, position, pos, cache=None):
        q, k, v = self.heads(x)
        q, k = position.rotate(q, k, pos)
        k, v, k_pos = update_cache(cache, k, v, pos)
        if cache is not None:
            cache["k"], cache["v"], cache["pos"] = cache["k"][:, :, -20:], cache["v"][:, :, -20:], cache["pos"][-20:]
        return self.merge(attend(q, k, v, pos, k_pos, position))


class OverScaled(Leaky):
    """Attention that divides q.k by the head dimension instead of its square root."""

    def forward(self, x, position, pos, cache=None):
        q, k, v = self.heads(x)
        q, k = position.rotate(q, k, pos)
        k, v, k_pos = update_cache(cache, k, v, pos)
        q = q / math.sqrt(q.size(-1))  # on top of attend's 1/sqrt(d): 1/d in all
        return self.merge(attend(q, k, v, pos, k_pos, position))


def miscounted(factor):
    class Miscounted(nn.Module):
        """MLP whose FLOP count is off by a factor."""

        def __init__(self, opts, dims):
            super().__init__()
            self.c_fc = nn.Linear(dims.n_embd, 4 * dims.n_embd)
            self.c_proj = nn.Linear(4 * dims.n_embd, dims.n_embd)

        def forward(self, x):
            return self.c_proj(torch.relu(self.c_fc(x)))

        def flops_per_token(self, seq_len):
            return int(factor * 2 * (self.c_fc.weight.numel() + self.c_proj.weight.numel()))

    return Miscounted


class ZeroDim(nn.Module):
    """Norm with a 0-dim learned scale (DeepSpeed's broadcast of parameters cannot take one)."""

    def __init__(self, opts, dims, dim):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.0))

    def forward(self, x):
        return self.scale * torch.nn.functional.layer_norm(x, x.shape[-1:])


class VectorAux(Upcast):
    """MLP whose auxiliary loss is a vector, not a scalar, and holds no gradient for it (and, as
    the contract allows, does not declare ``aux_losses`` in its class)."""

    def forward(self, x):
        self.aux_losses = {"spread": x.detach().std(dim=-1).flatten()}
        return self.c_fc(x)


class Hardwired(nn.Module):
    """Block that builds plain multi-head attention whatever the layer chose."""

    def __init__(self, opts, dims):
        super().__init__()
        self.ln_1 = dims.part("norm", dims.n_embd, role="attention")
        self.attn = dims.build("attention", "mha", dims)  # should be dims.part("attention")
        self.ln_2 = dims.part("norm", dims.n_embd, role="mlp")
        self.mlp = dims.part("mlp")

    def forward(self, x, position, pos, cache=None):
        x = x + self.attn(self.ln_1(x), position, pos, cache)
        return x + self.mlp(self.ln_2(x))


BROKEN = [
    ("attention", LateLeak, ["causal"]),
    ("attention", ShortMemory, ["kv_cache"]),
    ("attention", OverScaled, ["scale"]),
    ("mlp", miscounted(2.0), ["flops"]),
    ("mlp", miscounted(0.5), ["flops"]),
    ("mlp", miscounted(0.8), ["flops"]),
    ("norm", ZeroDim, ["engine"]),
    ("mlp", VectorAux, ["aux_losses"]),
    ("block", Hardwired, ["per_layer"]),
    ("attention", Leaky, ["causal"]),
    ("attention", Forgetful, ["kv_cache"]),
    ("attention", Unrotated, ["position_hooks"]),
    ("norm", UnusedScale, ["gradients"]),
    ("norm", SequenceNorm, ["causal", "kv_cache"]),
    ("mlp", Upcast, ["shape_and_dtype"]),
    ("mlp", Noisy, ["state_dict", "deterministic"]),
    ("mlp", ShrinkingFlops, ["counts"]),
    ("position", WrongBias, ["shape_and_dtype"]),
]


@pytest.mark.parametrize("family, factory, failing", BROKEN, ids=[b[1].__name__ for b in BROKEN])
def test_kit_reports_each_broken_contract_by_check_name(family, factory, failing):
    registry = PluginManager(entry_points=False).registry
    registry.register(family, "broken", factory)
    with pytest.raises(ConformanceError) as err:
        check_component(family, "broken", registry=registry)
    message = str(err.value)
    assert message.startswith(f"{family} 'broken'")
    for check in failing:
        assert f"\n  {check}: " in message, message


def test_kit_explains_bad_options_and_unknown_names():
    with pytest.raises(ConformanceError, match=r"invalid options: .*n_kv_head.*expected int"):
        check_component("attention", "gqa", {"n_kv_head": "two"}, registry=BUILTINS)
    with pytest.raises(KeyError, match="did you mean 'rope'"):
        check_component("position", "rop", registry=BUILTINS)
    with pytest.raises(ConformanceError, match="unknown checks"):
        check_component("norm", "rmsnorm", registry=BUILTINS, checks=["causality"])


def test_kit_reports_a_component_that_cannot_build_in_one_line():
    with pytest.raises(ConformanceError, match=r"does not build in a tiny model: ConfigError: model\.attention\.n_kv_head \(3\)"):
        check_component("attention", "gqa", {"n_kv_head": 3}, registry=BUILTINS)


def test_pytest_plugin_gives_each_test_its_own_registry(playattention_registry):
    from toolkit.plugin_manager import get_registry

    assert playattention_registry is not get_registry()
    assert {"mha", "gqa", "mqa", "sliding_window"} <= set(playattention_registry.names("attention"))
