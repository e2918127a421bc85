"""The conformance kit for the parts outside the model (optimizers, schedules, evaluators): every built-in
passes, and each check catches a plugin broken the way it looks for."""
import json
import math

import numpy as np
import pytest
import torch

from toolkit.plugin_manager import PluginManager
from toolkit.contracts import decay_groups
from toolkit.testing.conformance import ConformanceError, check_component

BUILTINS = PluginManager(entry_points=False).registry


def with_part(family, name, factory):
    """The built-ins plus one (broken) part."""
    registry = PluginManager(entry_points=False).registry
    registry.register(family, name, factory)
    return registry


def failure(family, name, factory, checks) -> str:
    with pytest.raises(ConformanceError) as info:
        check_component(family, name, registry=with_part(family, name, factory), checks=checks)
    return str(info.value)


# -- optimizers ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, options", [("adamw", None), ("muon", None), ("muon", {"weight_decay": 0.1})])
def test_builtin_optimizers_pass_the_kit_without_the_engine(name, options):
    check_component("optimizer", name, options, registry=BUILTINS, checks=["described", "hints", "state_dict"])


def test_a_lion_plugin_file_passes_the_optimizer_kit():
    check_component("optimizer", "lion", plugins=["tests/recipes/plugins/lion.py"],
                    checks=["described", "hints", "state_dict"])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_builtin_optimizers_step_through_zero_1_and_2(name):
    check_component("optimizer", name, registry=BUILTINS, checks=["engine"])


def careless_adamw(opts, model, recipe):
    """AdamW over every parameter, one group: decays gains and biases, ignores hints (a broken plugin)."""
    return torch.optim.AdamW(model.parameters(), lr=recipe.train.lr, weight_decay=recipe.train.weight_decay)


class OutsideStateSGD(torch.optim.Optimizer):
    """SGD with momentum kept in an attribute, outside the optimizer's state (a broken plugin)."""

    def __init__(self, opts, model, recipe):
        super().__init__(decay_groups(list(model.parameters()), recipe.train.weight_decay, recipe.train.lr),
                         {"lr": recipe.train.lr})
        self.velocity = {}

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                v = self.velocity.setdefault(p, torch.zeros_like(p)).mul_(0.9).add_(p.grad)
                p.mul_(1 - group["lr"] * group["weight_decay"]).add_(v, alpha=-group["lr"])


class ByIdSGD(torch.optim.Optimizer):
    """SGD with a per-parameter step size looked up by the identity of the model's parameters (a broken
    plugin: under ZeRO 1 and 2 the optimizer is handed flat partitions instead)."""

    def __init__(self, opts, model, recipe):
        params = list(model.parameters())
        super().__init__(decay_groups(params, recipe.train.weight_decay, recipe.train.lr), {"lr": recipe.train.lr})
        self.size = {id(p): 1.0 / max(1, p.dim()) for p in params}

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                p.mul_(1 - group["lr"] * group["weight_decay"]).add_(p.grad, alpha=-group["lr"] * self.size[id(p)])


def test_an_optimizer_ignoring_the_hints_fails_the_hints_check():
    msg = failure("optimizer", "careless", careless_adamw, ["hints"])
    assert "hints: " in msg and "has hint(weight_decay=False), but a step with zero gradients still decayed it" in msg


def test_an_optimizer_ignoring_an_lr_scale_fails_the_hints_check():
    def no_scale(opts, model, recipe):
        """AdamW with nanoGPT's decay groups but no lr_scale (a broken plugin)."""
        params = [p for p in model.parameters()]
        for p in params:
            p.optim_hints = {k: v for k, v in getattr(p, "optim_hints", {}).items() if k != "lr_scale"}
        return torch.optim.AdamW(decay_groups(params, recipe.train.weight_decay), lr=recipe.train.lr)

    msg = failure("optimizer", "no_scale", no_scale, ["hints"])
    assert "has hint(lr_scale=0.25), but its first update is 1 x the unhinted one (expected 0.25)" in msg


def test_muon_honours_a_weight_decay_hint_on_its_matrices():
    check_component("optimizer", "muon", {"weight_decay": 0.1}, registry=BUILTINS, checks=["hints"])


def test_an_optimizer_with_state_outside_its_state_dict_fails_the_state_dict_check():
    msg = failure("optimizer", "outside", OutsideStateSGD, ["hints", "state_dict"])
    assert "failed 1 of 2" in msg and "state_dict: " in msg and "after a step resumed from the optimizer's state_dict" in msg


@pytest.mark.slow
def test_an_optimizer_that_needs_the_models_own_parameters_fails_the_engine_check():
    msg = failure("optimizer", "by_id", ByIdSGD, ["hints", "state_dict", "engine"])
    assert "failed 1 of 3" in msg and "engine: KeyError" in msg


# -- schedules -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["cosine", "linear", "constant", "wsd"])
def test_builtin_schedules_pass_the_kit(name):
    check_component("schedule", name, registry=BUILTINS)


class Overshoot:
    """A cosine from lr over max_steps that goes on below zero (a broken plugin)."""

    def __init__(self, opts, train):
        self.lr, self.steps = train.lr, train.max_steps

    def __call__(self, step):
        return self.lr * math.cos(math.pi * step / self.steps)


class Counting:
    """Decays by counting its calls, not by the step it is asked for (a broken plugin)."""

    def __init__(self, opts, train):
        self.lr, self.calls = train.lr, 0

    def __call__(self, step):
        self.calls += 1
        return self.lr * 0.99 ** self.calls


def test_a_schedule_going_negative_fails_the_values_check():
    msg = failure("schedule", "overshoot", Overshoot, ["values", "resume"])
    assert "failed 1 of 2" in msg and "values: step 51: the learning rate is -" in msg


def test_a_schedule_that_counts_its_calls_fails_the_resume_check():
    msg = failure("schedule", "counting", Counting, ["values", "resume"])
    assert "failed 1 of 2" in msg and "resume: step 10: " in msg and "from a schedule built afresh (a resumed run)" in msg


# -- evaluators ------------------------------------------------------------------------------------
def test_builtin_evaluators_give_the_same_numbers_on_one_rank_and_two(tmp_path):
    check_component("evaluator", "perplexity", registry=BUILTINS)
    check_component("evaluator", "attention_stats", registry=BUILTINS)
    path = tmp_path / "mc.jsonl"  # five questions: the ranks get three and two
    rows = [{"ctx": "ROMEO:", "endings": ["What say you?", "zzq xq"], "label": i % 2} for i in range(5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    check_component("evaluator", "hellaswag", {"path": str(path)}, registry=BUILTINS)


class MeanOfMeans:
    """Val loss over 5 windows, each rank's mean averaged over ranks: wrong when shares differ (a broken plugin)."""

    def __init__(self, opts, ctx):
        tokens = np.concatenate(ctx.split("val"))
        T = ctx.block_size
        windows = [torch.from_numpy(tokens[i * T:(i + 1) * T + 1].astype(np.int64)) for i in range(5)]
        self.ctx, self.windows = ctx, ctx.shard(windows)  # 3 and 2 on two ranks

    def __call__(self, model):
        losses = [model(w[None, :-1], w[None, 1:])[1].item() for w in self.windows]
        return {"loss": self.ctx.mean(sum(losses) / len(losses)).item()}


class OwnAllReduce(MeanOfMeans):
    """Sums with torch.distributed itself instead of through ctx (a broken plugin)."""

    def __call__(self, model):
        import torch.distributed as dist

        total = torch.tensor([sum(model(w[None, :-1], w[None, 1:])[1].item() for w in self.windows)])
        if self.ctx.world_size > 1:
            dist.all_reduce(total)
        return {"loss": total.item()}


def test_an_evaluator_averaging_unequal_shares_fails_the_ranks_check():
    msg = failure("evaluator", "mean_of_means", MeanOfMeans, ["ranks"])
    assert "ranks: loss: " in msg and "on one rank" in msg and "on two" in msg


def test_an_evaluator_reducing_by_itself_is_told_to_use_the_context():
    msg = failure("evaluator", "own_all_reduce", OwnAllReduce, ["ranks"])
    assert "it calls torch.distributed itself; combine ranks with ctx.sum, ctx.mean and ctx.max" in msg


def test_check_component_knows_the_parts_outside_the_model():
    with pytest.raises(ConformanceError, match=r"unknown schedule checks \['kv_cache'\]"):
        check_component("schedule", "cosine", registry=BUILTINS, checks=["kv_cache"])
    with pytest.raises(ConformanceError, match=r"families: attention, norm, position, mlp, block, optimizer, "
                                               r"schedule, evaluator"):
        check_component("dataset", "tinyshakespeare", registry=BUILTINS)
