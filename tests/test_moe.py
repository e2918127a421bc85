"""The mixture-of-experts MLP and the contract it rests on: auxiliary losses added before backward
(so accumulation and DeepSpeed apply), component metrics, active parameters."""
import copy
import json
import statistics

import pytest
import torch

from toolkit.converter import structure
from toolkit.engine import build_engine, engine_step
from toolkit.model import ModelConfig, Transformer
from toolkit.plots import plot_summary
from toolkit.plugin_manager import PluginManager, default_registry
from toolkit.recipe import DeepSpeedConfig, Recipe, TrainConfig, load_recipe
from toolkit.trainer import train

MOE = {"kind": "moe", "experts": 4, "top_k": 2, "load_balance": 0.5, "router_z": 0.1,
       "expert": {"kind": "gelu", "multiplier": 2.0}}


def config(**changes) -> ModelConfig:
    return structure(default_registry(), {"vocab_size": 50, "block_size": 12, "n_layer": 2, "n_head": 2,
                                          "n_embd": 16, "mlp": MOE, **changes}, ModelConfig)


def test_each_token_is_the_weighted_sum_of_its_top_k_experts():
    torch.manual_seed(0)
    moe = Transformer(config()).transformer.h[0].mlp
    x = torch.randn(2, 5, 16)
    probs = moe.router(x).float().softmax(-1)  # (B, T, E)
    top, chosen = probs.topk(2, dim=-1)
    weights = top / top.sum(-1, keepdim=True)
    want = torch.zeros_like(x)
    for b in range(2):
        for t in range(5):
            for j in range(2):
                want[b, t] += weights[b, t, j] * moe.experts[int(chosen[b, t, j])](x[b, t])
    torch.testing.assert_close(moe(x), want, rtol=1e-5, atol=1e-6)


def test_a_uniform_router_gives_a_load_balance_loss_of_exactly_alpha():
    moe = Transformer(config()).transformer.h[0].mlp
    torch.nn.init.zeros_(moe.router.weight)  # every expert equally likely: P_e = 1/E, and sum_e f_e = 1
    moe(torch.randn(2, 5, 16))
    assert moe.aux_losses["load_balance"].item() == pytest.approx(0.5)
    assert moe.aux_losses["router_z"].item() == pytest.approx(0.1 * torch.log(torch.tensor(4.0)).item() ** 2)


def test_the_gradient_is_that_of_loss_plus_the_aux_losses_under_gradient_accumulation():
    recipe = Recipe(model=config(), train=TrainConfig(micro_batch=2, grad_accum=2, lr=1e-3, warmup_steps=0,
                                                      max_steps=2), deepspeed=DeepSpeedConfig())
    torch.manual_seed(0)
    model = Transformer(recipe.model)
    by_hand = copy.deepcopy(model)
    engine = build_engine(model, recipe).engine
    engine.step = lambda *a, **k: None  # keep the accumulated gradients instead of stepping
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 50, (2, 13), generator=g) for _ in range(2)]
    feed = iter(batches)
    aux = {}
    engine_step(engine, lambda: (lambda b: (b[:, :-1], b[:, 1:]))(next(feed)), 2, aux)
    for b in batches:
        _, loss, terms = by_hand(b[:, :-1], b[:, 1:], return_aux=True)
        ((loss + terms["load_balance"] + terms["router_z"]) / 2).backward()
    for (name, p), q in zip(model.named_parameters(), by_hand.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)
    router = dict(model.named_parameters())["transformer.h.0.mlp.router.weight"]
    assert router.grad.abs().sum() > 0 and set(aux) == {"load_balance", "router_z"}


def test_inspect_counts_the_active_parameters_of_a_token():
    model = Transformer(config())
    row = next(r for r in model.component_report() if r["kind"] == "moe")
    expert = sum(p.numel() for p in model.transformer.h[0].mlp.experts[0].parameters())
    assert row["params"] == 2 * (16 * 4 + 4 * expert)  # two layers: router + 4 experts each
    assert row["active_params"] == 2 * (16 * 4 + 2 * expert)


def test_training_logs_each_aux_loss_the_total_and_the_experts_metrics(tmp_path, tiny_recipe):
    path = tiny_recipe(tmp_path, {"model.mlp": MOE, "train.max_steps": 4, "train.log_interval": 2,
                                  "train.eval_interval": 4})
    summary = train(load_recipe(path), run_dir=tmp_path / "run", progress=False)
    assert summary["status"] == "finished"
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["type"] == "train"]
    assert all({"aux/load_balance", "aux/router_z", "aux/total"} <= r.keys() for r in steps)
    assert all(r["aux/total"] == pytest.approx(r["aux/load_balance"] + r["aux/router_z"]) for r in steps)
    assert all(r["loss"] > 3.0 for r in steps)  # the cross-entropy alone, not the objective
    logged = [r for r in steps if "mlp/expert_load_max" in r]
    assert [r["step"] for r in logged] == [2, 4] and all(1.0 <= r["mlp/expert_load_max"] <= 4.0 for r in logged)
    # the summary (and so an ablation's report) carries the last steps' aux losses and the last metrics
    assert summary["aux/load_balance"] == pytest.approx(statistics.fmean(r["aux/load_balance"] for r in steps))
    assert summary["mlp/expert_load_max"] == logged[-1]["mlp/expert_load_max"]
    summary_png = plot_summary(tmp_path / "run" / "metrics.jsonl", tmp_path / "summary.png")
    assert summary_png.stat().st_size > 0


class UndeclaredAux(torch.nn.Module):
    """An MLP adding an auxiliary loss without declaring ``aux_losses`` in its class."""

    def __init__(self, opts, dims):
        super().__init__()
        self.c_fc = torch.nn.Linear(dims.n_embd, dims.n_embd)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        y = self.c_fc(x)
        # only every other forward: a stale value must not be counted again
        self.aux_losses = {"l2": 0.5 * y.pow(2).mean()} if self.calls % 2 else {}
        return y


def test_an_aux_loss_set_without_a_class_declaration_is_added_and_never_reused():
    registry = PluginManager(entry_points=False).registry
    registry.register("mlp", "undeclared", UndeclaredAux)
    cfg = structure(registry, {"vocab_size": 50, "block_size": 12, "n_layer": 2, "n_head": 2, "n_embd": 16,
                               "mlp": {"kind": "undeclared"}}, ModelConfig)
    model = Transformer(cfg, registry)
    idx = torch.randint(0, 50, (2, 6))
    _, _, aux = model(idx, idx, return_aux=True)
    assert set(aux) == {"l2"} and aux["l2"].item() > 0 and aux["l2"].requires_grad
    aux["l2"].backward()
    assert model.transformer.h[0].mlp.c_fc.weight.grad.abs().sum() > 0
    _, _, aux = model(idx, idx, return_aux=True)  # this forward sets none: nothing from the last one
    assert aux == {}
