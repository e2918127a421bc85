"""Looking inside attention: observed maps equal the softmax computed by hand, the `attention` command
draws and measures them on a run and on a Hugging Face folder, head importance, the attention_stats evaluator."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from toolkit import contracts
from toolkit.cli import main
from toolkit.contracts import attend, observing_attention
from toolkit.headstats import head_stats, layer_stats
from toolkit.lookinside import head_importance
from toolkit.model import ModelConfig, Transformer, model_dims
from toolkit.plugin_manager import default_registry

B, NH, T, HS = 2, 4, 7, 8


def qkv(n_kv=NH, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, NH, T, HS, generator=g), torch.randn(B, n_kv, T, HS, generator=g),
            torch.randn(B, n_kv, T, HS, generator=g))


def by_hand(q, k, *, window=None, bias=None, softcap=None):
    """softmax(q k^T / sqrt(d) [capped] + causal/window mask + bias), written out."""
    k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)
    s = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    seen = (j <= i) if window is None else (j <= i) & (j > i - window)
    s = s.masked_fill(~seen, float("-inf"))
    return torch.softmax(s + (0 if bias is None else bias), dim=-1)


ALIBI = default_registry().build_in("position", "alibi", model_dims(ModelConfig(n_head=NH, n_embd=NH * HS)))
CASES = {
    "mha": (dict(), dict(), NH),
    "gqa": (dict(), dict(), 2),
    "sliding_window": (dict(window=3), dict(window=3), NH),
    "alibi": (dict(position=ALIBI), dict(bias=ALIBI.score_bias(torch.arange(T), torch.arange(T), NH)), NH),
    "softcap": (dict(softcap=0.5), dict(softcap=0.5), NH),
}


@pytest.mark.parametrize("case", CASES)
def test_observed_probabilities_equal_the_softmax_computed_by_hand(case):
    kw, hand, n_kv = CASES[case]
    q, k, v = qkv(n_kv)
    pos = torch.arange(T)
    position = kw.pop("position", None)
    fused = attend(q, k, v, pos, pos, position, **kw)
    with observing_attention() as obs:
        y = attend(q, k, v, pos, pos, position, **kw)
    (p,) = obs.maps[None]
    expected = by_hand(q, k, **hand)
    torch.testing.assert_close(p, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(p.sum(-1), torch.ones(B, NH, T))
    torch.testing.assert_close(y, fused, atol=1e-5, rtol=1e-4)  # observing changes nothing it returns
    if case == "sliding_window":
        i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
        assert (p[..., (j <= i - 3) | (j > i)] == 0).all()  # nothing outside the window


def test_attend_runs_its_fused_kernel_unless_observing(monkeypatch):
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(contracts.F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    q, k, v = qkv()
    attend(q, k, v, torch.arange(T), torch.arange(T))
    assert calls == [1]
    with observing_attention():
        attend(q, k, v, torch.arange(T), torch.arange(T))
    assert calls == [1] and contracts._observer is None


ATTENTIONS = ["mha", {"kind": "gqa", "n_kv_head": 2}, {"kind": "sliding_window", "window": 3}, "mla", "gated",
              {"kind": "mha", "softcap": 1.0}]


@pytest.mark.parametrize("attention", ATTENTIONS, ids=lambda a: a if isinstance(a, str) else str(a))
@pytest.mark.parametrize("position", ["learned", "alibi", "rope"])
def test_the_model_gives_every_layer_a_map_whose_rows_sum_to_one(attention, position):
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=50, block_size=16, n_layer=2, n_head=4, n_embd=32, attention=attention,
                                position=position)).eval()
    x = torch.randint(0, 50, (2, 9))
    ref, _ = m(x)
    with m.observe_attention() as maps:
        out, _ = m(x)
    layers = maps.layers()
    assert sorted(layers) == [0, 1] and all(t.shape == (2, 4, 9, 9) for t in layers.values())
    torch.testing.assert_close(layers[0].sum(-1), torch.ones(2, 4, 9))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    assert not m.transformer.h[0]._forward_pre_hooks  # nothing left behind


def test_differential_attention_shows_the_difference_of_its_two_maps():
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=50, block_size=16, n_layer=2, n_head=4, n_embd=32, attention="diff")).eval()
    with m.observe_attention() as maps:
        m(torch.randint(0, 50, (1, 6)))
    s1, s2 = maps.calls(1)
    lam = m.transformer.h[1].attn.lam().detach()
    torch.testing.assert_close(maps.layer(1), s1 - lam * s2)
    assert maps.layer(1).shape == (1, 2, 6, 6)  # n_head / 2 differential heads
    torch.testing.assert_close(maps.layer(1).sum(-1), (1 - lam).expand(1, 2, 6))


def test_an_attention_that_does_not_use_attend_is_reported_without_maps():
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=50, block_size=16, n_layer=2, n_head=4, n_embd=32)).eval()
    real = m.transformer.h[1].attn
    m.transformer.h[1].attn.forward = lambda x, position, pos, cache=None: real.c_proj(x)
    with m.observe_attention() as maps:
        m(torch.randint(0, 50, (1, 6)))
    assert list(maps.layers()) == [0]
    assert maps.missing(1) == "no maps: does not use attend() nor record_attention()"


def test_head_stats_on_a_hand_built_map():
    # head 0 puts everything on the first token; head 1 on the token itself; head 2 is uniform
    t = 4
    sink = torch.zeros(t, t)
    sink[:, 0] = 1
    uniform = torch.tril(torch.ones(t, t)) / torch.arange(1, t + 1)[:, None]
    maps = torch.stack([sink, torch.eye(t), uniform])[None]  # (1, 3, 4, 4)
    s = head_stats(maps)
    torch.testing.assert_close(s["sink_mass"], torch.tensor([1.0, 0.0, (1 / 2 + 1 / 3 + 1 / 4) / 3]))
    torch.testing.assert_close(s["entropy"], torch.tensor([0.0, 0.0, (math.log(2) + math.log(3) + math.log(4)) / 3]))
    torch.testing.assert_close(s["distance"], torch.tensor([(1 + 2 + 3) / 3, 0.0, (0.5 + 1 + 1.5) / 3]))
    assert s["top_key"].tolist()[0] == 0
    assert layer_stats(maps)["sink_mass"] == pytest.approx(float(s["sink_mass"].mean()))


def test_a_head_whose_output_projection_is_zero_has_importance_zero():
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=50, block_size=16, n_layer=2, n_head=4, n_embd=32)).eval()
    hs = 8
    with torch.no_grad():
        m.transformer.h[1].attn.c_proj.weight[:, 2 * hs:3 * hs] = 0  # layer 1, head 2 writes nothing
    x = torch.randint(0, 50, (3, 12))
    y = torch.randint(0, 50, (3, 12))
    base, delta = head_importance(m, x, y, {0: 4, 1: 4})
    with torch.no_grad():
        assert base == pytest.approx(float(m(x, y)[1]), abs=1e-5)
    assert delta[1, 2] == 0.0
    assert np.count_nonzero(delta) == 7


# -- the command ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(tiny_recipe, tmp_path_factory):
    """A tiny gated-attention run that logs attention_stats."""
    from toolkit.recipe import load_recipe
    from toolkit.trainer import train

    folder = tmp_path_factory.mktemp("lookinside")
    recipe = tiny_recipe(folder, {"train.max_steps": 2, "train.eval_interval": 2, "model.attention": "gated",
                                  "eval": [{"kind": "attention_stats", "windows": 2, "length": 16}]})
    summary = train(load_recipe(recipe), run_dir=folder / "run", progress=False)
    assert summary["status"] == "finished", summary
    return folder / "run", summary


@pytest.mark.slow
def test_the_command_draws_and_measures_a_trained_run(run, tmp_path, capsys):
    run_dir, summary = run
    out = tmp_path / "out"
    assert main(["attention", str(run_dir), "--prompt", "To be or not", "--out", str(out), "--head-importance",
                 "--windows", "2", "--length", "16"]) == 0
    printed = capsys.readouterr().out
    assert "entropy" in printed and "head importance" in printed
    assert len([line for line in printed.splitlines() if line.strip().startswith(("0 ", "1 "))]) >= 4  # 2 x 2 heads
    for name in ("attention.png", "attention.html", "head_importance.png"):
        assert (out / name).stat().st_size > 1000
    page = (out / "attention.html").read_text()
    assert "<script>" in page and "http" not in page.split("<script>")[1]  # no external assets
    # the evaluator ran in training: per-layer and mean statistics in the summary
    for stat in ("sink_mass", "entropy", "distance"):
        assert 0 <= summary[f"attention_stats/{stat}"] < 100
        assert f"attention_stats/L1/{stat}" in summary


def test_the_command_refuses_a_missing_folder_and_a_prompt_without_tokenizer_in_one_line(tmp_path, capsys):
    assert main(["attention", str(tmp_path / "nope"), "--prompt", "hi"]) == 2
    assert "no such run folder" in capsys.readouterr().err


@pytest.mark.slow
def test_the_command_works_on_a_hugging_face_llama_folder(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    (tmp_path / "val.txt").write_text("irrelevant: ids are given")
    out = tmp_path / "out"
    assert main(["attention", str(tmp_path / "llama"), "--ids", "1,5,9,13,2,7", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("\n") >= 8 and (out / "attention.png").is_file()
    data = json.loads((out / "attention.html").read_text().split("const D=")[1].split(";const T=")[0])
    assert len(data["layers"]) == 2 and len(data["layers"][0]["maps"]) == 4  # 4 query heads over 2 kv heads
    assert np.allclose(np.array(data["layers"][1]["maps"]).sum(-1), 1, atol=1e-3)


def test_the_attention_stats_evaluator_on_uniform_attention():
    """Queries zeroed: every head attends uniformly to the tokens so far, so query i puts 1/(i+1) on the first."""
    from types import SimpleNamespace

    from toolkit.plugins.impl.evaluators import AttentionStats
    from toolkit.plugins.evaluators import AttentionStatsOptions

    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=50, block_size=16, n_layer=2, n_head=4, n_embd=32)).eval()
    with torch.no_grad():
        for block in m.transformer.h:
            block.attn.c_attn.weight[:32] = 0
            block.attn.c_attn.bias[:32] = 0
    ctx = SimpleNamespace(block_size=16, device=torch.device("cpu"), split=lambda name, prepared: [np.arange(40) % 50])
    scores = AttentionStats(AttentionStatsOptions(windows=3, length=5), ctx)(m)
    i = np.arange(1, 5)
    assert scores["L0/sink_mass"] == pytest.approx(np.mean(1 / (i + 1)), abs=1e-6)
    assert scores["L1/entropy"] == pytest.approx(np.mean(np.log(i + 1)), abs=1e-6)
    assert scores["distance"] == pytest.approx(np.mean(i / 2), abs=1e-6)
    assert set(scores) == {"sink_mass", "entropy", "distance"} | {f"L{n}/{s}" for n in (0, 1)
                                                                  for s in ("sink_mass", "entropy", "distance")}


def test_an_attention_without_attend_offers_its_maps_through_record_attention():
    """The example plugin (talking heads) computes its own softmax and calls record_attention."""
    from pathlib import Path

    from toolkit.plugin_manager import load_registry

    module = Path(__file__).resolve().parents[1] / "examples/playattention-talking-heads/src/playattention_talking_heads/__init__.py"
    registry = load_registry([str(module)])
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=50, block_size=16, n_layer=2, n_head=4, n_embd=32,
                                attention={"kind": "talking_heads", "mix": "logits"}), registry).eval()
    with m.observe_attention() as maps:
        m(torch.randint(0, 50, (1, 6)))
    assert sorted(maps.layers()) == [0, 1]
    torch.testing.assert_close(maps.layer(1).sum(-1), torch.ones(1, 4, 6))


def test_head_importance_leaves_out_heads_it_cannot_zero():
    """Talking heads offers maps with record_attention but does not go through attend: no delta, not a false 0."""
    from pathlib import Path

    from toolkit.plugin_manager import load_registry

    module = Path(__file__).resolve().parents[1] / "examples/playattention-talking-heads/src/playattention_talking_heads/__init__.py"
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=50, block_size=16, n_layer=2, n_head=4, n_embd=32, attention="mha",
                                layers={"th": {"at": "1", "attention": "talking_heads"}}),
                    load_registry([str(module)])).eval()
    x, y = torch.randint(0, 50, (2, 8)), torch.randint(0, 50, (2, 8))
    _, delta = head_importance(m, x, y, {0: 4, 1: 4})
    assert np.isfinite(delta[0]).all() and np.isnan(delta[1]).all()
