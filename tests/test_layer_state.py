"""The per-forward state between layers (toolkit.contracts, "State between layers"): value residual
(ResFormer) written as a user would, in a plugin file outside the repo, passes the conformance kit,
trains and decodes through a KV cache; a plugin that misuses the state is caught by the kit."""
import textwrap

import pytest
import torch

from toolkit.errors import ConfigError
from toolkit.model import ModelConfig, Transformer
from toolkit.plugin_manager import load_registry
from toolkit.testing.conformance import ConformanceError, check_component

VALUE_RESIDUAL = textwrap.dedent('''
    """Value residual learning (ResFormer, Zhou et al. 2024): a playattention plugin."""
    import attrs
    import torch
    from torch import nn

    from toolkit.contracts import Dims, attend, update_cache
    from toolkit.hookspecs import hookimpl


    @attrs.frozen
    class ValueResidualOptions:
        init_lambda: float = 0.5  # the share of a layer's own values; the rest is the first layer's


    class ValueResidualAttention(nn.Module):
        """Causal attention whose values are mixed with the first layer's (ResFormer, Zhou et al. 2024)."""

        Options = ValueResidualOptions

        def __init__(self, opts, dims: Dims):
            super().__init__()
            C = dims.n_embd
            self.n_head, self.head_dim = dims.n_head, dims.head_dim
            self.c_attn = nn.Linear(C, 3 * C, bias=dims.bias)
            self.c_proj = nn.Linear(C, C, bias=dims.bias)
            # the first layer's values are its own: it has nothing to mix
            self.lam = nn.Parameter(torch.full((1,), opts.init_lambda)) if dims.layer else None

        def forward(self, x, position, pos, cache=None, state=None):
            B, T, C = x.shape
            q, k, v = self.c_attn(x).split(C, dim=2)
            q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
            v1 = state.setdefault("v1", v)  # the first layer that runs this writes its values, this step's tokens only
            v = self.mix(v, v1, state)
            q, k = position.rotate(q, k, pos)
            k, v, k_pos = update_cache(cache, k, v, pos)  # mixed values are what later steps attend to
            y = attend(q, k, v, pos, k_pos, position)
            return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))

        def mix(self, v, v1, state):
            return v if self.lam is None else self.lam * v + (1 - self.lam) * v1

        def flops_per_token(self, seq_len):
            return 2 * (self.c_attn.weight.numel() + self.c_proj.weight.numel()) + 4 * seq_len * self.n_head * self.head_dim


    class DenseValueResidualAttention(ValueResidualAttention):
        """Value residual over the mean of every earlier layer's values, summed in place (a misuse of the state)."""

        def mix(self, v, v1, state):
            if "vsum" not in state:
                state["vsum"], state["n"] = v.clone(), 1
                return v
            mixed = v if self.lam is None else self.lam * v + (1 - self.lam) * (state["vsum"] / state["n"])
            state["vsum"] += v  # wrong: in place, so a recomputed layer sees the later layers' sums
            state["n"] += 1
            return mixed


    @hookimpl
    def register_components(register):
        register("attention", "resformer", ValueResidualAttention)
        register("attention", "dense_resformer", DenseValueResidualAttention)
''')

NO_STATE_BLOCK = textwrap.dedent('''
    """A pre-norm block written before the state existed: it does not hand it on."""
    from torch import nn

    from toolkit.hookspecs import hookimpl
    from toolkit.registry import NoOptions


    class OldBlock(nn.Module):
        """Pre-norm block that passes no state to its parts."""

        Options = NoOptions

        def __init__(self, opts, dims):
            super().__init__()
            self.ln_1, self.attn = dims.part("norm", dims.n_embd, role="attention"), dims.part("attention")
            self.ln_2, self.mlp = dims.part("norm", dims.n_embd, role="mlp"), dims.part("mlp")

        def forward(self, x, position, pos, cache=None):
            x = x + self.attn(self.ln_1(x), position, pos, cache)
            return x + self.mlp(self.ln_2(x))


    @hookimpl
    def register_components(register):
        register("block", "old", OldBlock)
''')

TINY = dict(vocab_size=61, block_size=24, n_layer=3, n_head=2, n_embd=16, position="rope", attention="resformer")


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """The plugin file in a folder of its own (the current project, so it runs without asking)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "value_residual.py").write_text(VALUE_RESIDUAL)
    (tmp_path / "old_block.py").write_text(NO_STATE_BLOCK)
    return tmp_path / "value_residual.py"


@pytest.mark.slow
def test_value_residual_plugin_passes_the_conformance_kit(plugin):
    ran = check_component("attention", "resformer", plugins=[str(plugin)])
    assert "state" in ran and "kv_cache" in ran


def test_value_residual_trains_and_cached_greedy_decoding_equals_uncached(plugin):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**TINY), load_registry([str(plugin)]))
    assert model.transformer.h[0].attn.lam is None and model.transformer.h[2].attn.lam is not None
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    idx = torch.randint(0, 61, (4, 24), generator=torch.Generator().manual_seed(1))
    losses = []
    for step in range(8):
        model.activation_checkpointing = step % 2 == 1  # recomputed layers see the state of their first forward
        _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert model.transformer.h[1].attn.lam.grad.abs().sum() > 0  # the first layer's values reach later layers
    prompt = idx[:2, :5]
    cached = model.generate(prompt, 12, temperature=0, use_cache=True)
    assert torch.equal(cached, model.generate(prompt, 12, temperature=0, use_cache=False))


@pytest.mark.slow
def test_kit_catches_a_plugin_that_changes_the_state_in_place(plugin):
    with pytest.raises(ConformanceError) as err:
        check_component("attention", "dense_resformer", plugins=[str(plugin)])
    lines = str(err.value).splitlines()
    assert lines[0].endswith("failed 1 of 18 conformance checks:"), str(err.value)  # every other check passes it
    assert lines[1].startswith("  state: layer 1 changed state['vsum'] in place")


def test_a_block_that_does_not_hand_on_the_state_is_refused_when_built(plugin):
    registry = load_registry([str(plugin), str(plugin.parent / "old_block.py")])
    with pytest.raises(ConfigError, match="attention 'resformer' at layer 0 asks for the per-forward state, "
                                          "but block 'old' does not hand it on"):
        Transformer(ModelConfig(**TINY, block="old"), registry)
    Transformer(ModelConfig(**{**TINY, "attention": "mha"}, block="old"), registry)  # no part asks: fine
