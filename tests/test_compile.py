"""torch.compile sees every built-in component as one graph: no graph breaks in training or decoding.

Graph breaks are Dynamo's, so Dynamo with backend="eager" (no code generation) finds them in a
fraction of a second per model; ``fullgraph=True`` turns the first break into an error naming it.
"""
import warnings

import pytest
import torch

from toolkit import contracts
from toolkit.contracts import BACKENDS, Position
from toolkit.model import ModelConfig, Transformer
from toolkit.plugin_manager import PluginManager

BUILTINS = PluginManager(entry_points=False).registry
ATTENTIONS = {"mha": {}, "gqa": {"n_kv_head": 2}, "mqa": {}, "sliding_window": {"window": 5}}
V, T = 50, 16


def tiny(attention="mha", position="learned", norm="layernorm", mlp="gelu", layout="pre", **options):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=V, block_size=T, n_layer=2, n_head=4, n_embd=32, layout=layout,
                      attention={"kind": attention, **ATTENTIONS[attention], **options},
                      position=position, norm=norm, mlp=mlp)
    return Transformer(cfg, BUILTINS)


def tokens(n=T, seed=0):
    return torch.randint(0, V, (2, n), generator=torch.Generator().manual_seed(seed))


def assert_one_graph_in_training(model):
    """Training forward with targets (and its backward, which AOTAutograd would trace from this graph)."""
    torch._dynamo.reset()
    model.train()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    idx, targets = tokens(), tokens(seed=1)
    logits, loss = compiled(idx, targets)
    loss.backward()
    torch.testing.assert_close(loss, model(idx, targets)[1])


def assert_one_graph_in_decoding(model, steps=1, dynamic=False):
    """A prefill, then generation's calls (one token through the KV cache, last logits only), each one graph.

    Static shapes by default: tracing with symbolic shapes (what a decoding loop's growing cache
    turns on after a few lengths) takes seconds, so only ``dynamic=True`` cases pay for it.
    """
    torch._dynamo.reset()
    model.eval()
    compiled = torch.compile(model, backend="eager", fullgraph=True, dynamic=dynamic)
    idx = tokens()
    cache = [{} for _ in model.transformer.h]
    with torch.no_grad():
        out = [compiled(idx[:, :10], cache=cache, start_pos=0)[0][:, -1:]]
        for s in range(10, 10 + steps):
            out.append(compiled(idx[:, s:s + 1], cache=cache, start_pos=s, last_only=True)[0])
        want = model(idx[:, :10 + steps])[0][:, 9:]  # (2, 1 + steps, V)
    torch.testing.assert_close(torch.cat(out, dim=1), want, atol=1e-5, rtol=1e-4)


# every attention and every position at least once in the quick run; the whole grid with the slow tests
QUICK = {("mha", "learned"), ("gqa", "rope"), ("mqa", "alibi"), ("sliding_window", "sinusoidal"), ("sliding_window", "none")}
GRID = [pytest.param(a, p, marks=() if (a, p) in QUICK else pytest.mark.slow)
        for a in ATTENTIONS for p in BUILTINS.names("position")]


@pytest.mark.parametrize("attention, position", GRID)
def test_every_attention_and_position_compiles_without_graph_breaks(attention, position):
    model = tiny(attention, position)
    assert_one_graph_in_training(model)
    assert_one_graph_in_decoding(model)


@pytest.mark.parametrize("attention, position", [("sliding_window", "alibi"),
                                                 pytest.param("gqa", "rope", marks=pytest.mark.slow)])
def test_decoding_with_a_growing_cache_compiles_without_graph_breaks_under_dynamic_shapes(attention, position):
    # the rolling window's cache stops growing at `window` keys: its length check must stay a guard
    assert_one_graph_in_decoding(tiny(attention, position), steps=3, dynamic=True)


@pytest.mark.parametrize("norm, mlp, layout", [("rmsnorm", "geglu", "post"), ("layernorm", "swiglu", "pre"),
                                               pytest.param("layernorm", "relu", "post", marks=pytest.mark.slow),
                                               pytest.param("rmsnorm", "gelu", "pre", marks=pytest.mark.slow)])
def test_every_norm_and_mlp_compiles_without_graph_breaks(norm, mlp, layout):
    model = tiny("gqa", "rope", norm=norm, mlp=mlp, layout=layout, qk_norm=norm)
    assert_one_graph_in_training(model)
    assert_one_graph_in_decoding(model)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("attention, position", [("sliding_window", "alibi"),
                                                 pytest.param("gqa", "rope", marks=pytest.mark.slow)])
def test_every_attention_backend_compiles_without_graph_breaks(backend, attention, position, monkeypatch):
    # flex on CPU runs without gradients only, so training takes the SDPA path there; decoding takes flex
    monkeypatch.setattr(contracts, "FLEX_COMPILE", False)  # the eager reference: no inductor compile of flex
    model = tiny(attention, position, backend=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex's note that an uncompiled call is slow
        assert_one_graph_in_training(model)
        assert_one_graph_in_decoding(model)


def test_activation_checkpointing_compiles_without_graph_breaks():
    model = tiny("mha", "alibi")
    model.activation_checkpointing = True
    assert_one_graph_in_training(model)
    model = research(**RESEARCH["state-irope"])  # blocks that write the state under recomputation
    model.activation_checkpointing = True
    assert_one_graph_in_training(model)


class HostPosition(Position):
    """A position that breaks the graph."""

    def rotate(self, q, k, pos):
        torch._dynamo.graph_break()  # stands for any untraceable call: a C extension, a host read
        return q, k


def test_a_graph_break_in_a_component_fails_the_check():
    model = tiny("mha", "none")
    model.transformer.wpe = HostPosition()
    with pytest.raises(torch._dynamo.exc.Unsupported):
        assert_one_graph_in_training(model)


def research(**changes):
    torch.manual_seed(0)
    fields = dict(vocab_size=V, block_size=T, n_layer=2, n_head=4, n_embd=32, position="rope")
    return Transformer(ModelConfig(**{**fields, **changes}), BUILTINS)


RESEARCH = {
    "diff-alibi": dict(attention="diff", position="alibi"),
    "mla-rope": dict(attention={"kind": "mla", "q_rank": 16}),
    "softcap-rope": dict(attention={"kind": "gqa", "n_kv_head": 2, "softcap": 20.0}),
    "partial-rope": dict(position={"kind": "rope", "fraction": 0.5}),
    "parallel-dyt": dict(block="parallel", norm="dyt"),
    "sandwich-moe": dict(block="sandwich", mlp={"kind": "moe", "experts": 4, "top_k": 2}),
    "local-global": dict(attention={"kind": "sliding_window", "window": 5}, layers={"g": {"at": "1::2", "attention": "mha"}}),
    # the per-forward state (value residual, x0, U-net skips) and a layer's own position (iRoPE)
    "state-irope": dict(attention="value_residual", block="shortcut_block", n_layer=4,
                        layers={"g": {"at": "1::2", "position": "none"}}),
}


@pytest.mark.parametrize("changes", list(RESEARCH.values()), ids=list(RESEARCH))
def test_the_research_components_compile_without_graph_breaks(changes):
    model = research(**changes)
    assert_one_graph_in_training(model)
    assert_one_graph_in_decoding(model)
