"""DeepSpeed set-up: batch arithmetic, the config, weight-decay groups, the lr schedule, ZeRO 0-3 on CPU."""
import math

import pytest
import torch

from toolkit.engine import (batch_plan, build_engine, deep_merge, deepspeed_config, full_fp32_state_dict, lr_at,
                            make_optimizer, make_scheduler, one_rank_zero_note)
from toolkit.errors import ConfigError
from toolkit.contracts import param_groups
from toolkit.model import ModelConfig, Transformer
from toolkit.recipe import DeepSpeedConfig, Recipe, TrainConfig


def recipe(block_size=1024, ds=None, **train) -> Recipe:
    return Recipe(model=ModelConfig(vocab_size=65, block_size=block_size, n_layer=2, n_head=2, n_embd=32),
                  train=TrainConfig(**train), deepspeed=ds or DeepSpeedConfig())


# -- batch arithmetic and the config ------------------------------------------------------------
def test_tokens_per_step_gives_grad_accum_and_train_batch_size():
    r = recipe(micro_batch=12, tokens_per_step=12 * 1024 * 2 * 5)
    cfg = deepspeed_config(r, 2)
    assert cfg["gradient_accumulation_steps"] == 5
    assert cfg["train_micro_batch_size_per_gpu"] == 12
    assert cfg["train_batch_size"] == 12 * 5 * 2
    assert batch_plan(r, 2).tokens_per_step == 12 * 1024 * 2 * 5


def test_grad_accum_given_directly_scales_with_world_size():
    cfg = deepspeed_config(recipe(micro_batch=4, grad_accum=3), 4)
    assert (cfg["train_batch_size"], cfg["gradient_accumulation_steps"]) == (48, 3)


def test_indivisible_tokens_per_step_shows_the_arithmetic():
    with pytest.raises(ConfigError) as err:
        deepspeed_config(recipe(micro_batch=12, tokens_per_step=524288), 2)
    assert err.value.lines == [
        "train.tokens_per_step 524288 is not divisible by micro_batch 12 x block_size 1024 x world_size 2 = 24576"]


def test_grad_accum_contradicting_tokens_per_step_is_refused():
    with pytest.raises(ConfigError, match="train.grad_accum 3 disagrees"):
        batch_plan(recipe(micro_batch=4, grad_accum=3, tokens_per_step=4 * 1024 * 2), 1)


def test_precision_clipping_and_offload_come_from_the_recipe():
    r = recipe(grad_clip=0.5, ds=DeepSpeedConfig(zero_stage=2, precision="bf16", offload="cpu"))
    cfg = deepspeed_config(r)
    assert cfg["bf16"] == {"enabled": True} and cfg["fp16"] == {"enabled": False}
    assert cfg["gradient_clipping"] == 0.5
    assert cfg["zero_optimization"] == {"stage": 2, "offload_optimizer": {"device": "cpu"}}


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is refused only without CUDA")
def test_fp16_on_cpu_is_refused_with_the_key_to_change():
    with pytest.raises(ConfigError, match="deepspeed.precision: fp16 needs a CUDA GPU"):
        deepspeed_config(recipe(ds=DeepSpeedConfig(precision="fp16")))


def test_offload_below_stage_2_is_refused():
    with pytest.raises(ConfigError, match="offload needs zero_stage 2 or 3, got zero_stage 1"):
        deepspeed_config(recipe(ds=DeepSpeedConfig(zero_stage=1, offload="cpu")))


def test_raw_deepspeed_table_is_merged_last_and_deeply():
    extra = {"zero_optimization": {"reduce_bucket_size": 1000}, "gradient_clipping": 2.0, "memory_breakdown": True}
    cfg = deepspeed_config(recipe(ds=DeepSpeedConfig(zero_stage=1, config=extra)))
    assert cfg["zero_optimization"] == {"stage": 1, "reduce_bucket_size": 1000}
    assert cfg["gradient_clipping"] == 2.0 and cfg["memory_breakdown"] is True


def test_deep_merge_leaves_its_inputs_alone():
    base, extra = {"a": {"b": 1}}, {"a": {"c": 2}}
    assert deep_merge(base, extra) == {"a": {"b": 1, "c": 2}}
    assert base == {"a": {"b": 1}} and extra == {"a": {"c": 2}}


# -- optimizer and schedule (more in test_optimizers.py and test_schedules.py) --------------------
def test_weight_decay_only_on_matrices_and_tied_weights_once():
    model = Transformer(recipe().model)
    decay, no_decay = param_groups(model, 0.1)
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    ids = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert id(model.lm_head.weight) in ids  # the tied head is the embedding, counted once


def nanogpt_get_lr(it, learning_rate, warmup_iters, lr_decay_iters, min_lr):
    """nanoGPT train.py's get_lr, verbatim."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    assert 0 <= decay_ratio <= 1
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    return min_lr + coeff * (learning_rate - min_lr)


def test_cosine_schedule_is_nanogpts_get_lr():
    train = TrainConfig(lr=6e-4, min_lr=6e-5, warmup_steps=20, max_steps=200, decay_steps=150)
    for step in range(0, 200):
        assert lr_at(step, train) == pytest.approx(nanogpt_get_lr(step, 6e-4, 20, 150, 6e-5), rel=1e-12)
    assert lr_at(0, train) == pytest.approx(6e-4 / 21)
    assert lr_at(20, train) == pytest.approx(6e-4)
    assert lr_at(150, train) == pytest.approx(6e-5) and lr_at(199, train) == 6e-5


def test_linear_and_constant_schedules():
    lin = TrainConfig(lr=1.0, min_lr=0.0, warmup_steps=0, max_steps=10, schedule="linear")
    assert [lr_at(s, lin) for s in (0, 5, 10, 11)] == pytest.approx([1.0, 0.5, 0.0, 0.0])
    const = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=3, max_steps=10, schedule="constant")
    assert [lr_at(s, const) for s in (0, 2, 3, 9)] == pytest.approx([0.25, 0.75, 1.0, 1.0])


def test_scheduler_gives_lr_at_for_each_optimizer_step():
    r = recipe(lr=1e-3, min_lr=1e-4, warmup_steps=3, max_steps=10)
    opt = make_optimizer(Transformer(r.model), r)
    sched = make_scheduler(opt, r.train)
    seen = []
    for _ in range(10):
        seen.append(opt.param_groups[0]["lr"])
        assert opt.param_groups[1]["lr"] == seen[-1]
        opt.step()
        sched.step()
    assert seen == pytest.approx([lr_at(s, r.train) for s in range(10)], rel=1e-12)


# -- the engine on CPU ----------------------------------------------------------------------------
def run_engine(stage: int, precision: str, steps: int = 4, micro_batch: int = 4, grad_accum: int = 2):
    r = recipe(block_size=16, ds=DeepSpeedConfig(zero_stage=stage, precision=precision), micro_batch=micro_batch,
               grad_accum=grad_accum, lr=3e-3, warmup_steps=1, max_steps=steps)
    torch.manual_seed(0)
    built = build_engine(Transformer(r.model), r)
    engine = built.engine
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 65, (steps * grad_accum * micro_batch, 17), generator=g)
    losses = []
    for step in range(steps):
        total = 0.0
        for k in range(grad_accum):
            rows = data[(step * grad_accum + k) * micro_batch:][:micro_batch]
            _, loss = engine(rows[:, :-1].contiguous(), rows[:, 1:].contiguous())
            engine.backward(loss)
            engine.step()
            total += loss.item()
        losses.append(total / grad_accum)
    return losses, engine


@pytest.fixture(scope="module")
def fp32_stage0():
    losses, engine = run_engine(0, "fp32")
    return losses, full_fp32_state_dict(engine)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stages_train_alike_on_cpu(stage, precision, fp32_stage0):
    ref_losses, ref_state = fp32_stage0
    losses, engine = run_engine(stage, precision)
    assert losses[-1] < losses[0]
    state = full_fp32_state_dict(engine)
    assert state.keys() == ref_state.keys() and "lm_head.weight" not in state  # tied: stored once
    assert all(t.dtype == torch.float32 for t in state.values())
    if precision == "fp32":  # the same arithmetic, partitioned differently
        assert losses == pytest.approx(ref_losses, rel=1e-5)
        for name, t in state.items():
            torch.testing.assert_close(t, ref_state[name], rtol=1e-4, atol=2e-5)
    else:
        assert losses == pytest.approx(ref_losses, rel=2e-2)
    if stage == 0 and precision == "fp32":
        assert engine.get_global_grad_norm() is not None  # our fused clipping keeps the norm for the log


def test_bf16_at_zero_0_is_autocast_over_fp32_weights_so_the_export_is_true_fp32():
    cfg = deepspeed_config(recipe(ds=DeepSpeedConfig(zero_stage=0, precision="bf16")), 1)
    assert cfg["bf16"] == {"enabled": False} and cfg["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    _, engine = run_engine(0, "bf16")
    assert all(p.dtype == torch.float32 for p in engine.module.parameters())
    state = full_fp32_state_dict(engine)
    # trained fp32 weights are not all bf16 values upcast (they would be with bf16 weights)
    assert any(not torch.equal(t, t.bfloat16().float()) for t in state.values())


def test_grad_accumulation_matches_one_big_micro_batch():
    accumulated, _ = run_engine(0, "fp32", micro_batch=4, grad_accum=2)
    single, _ = run_engine(0, "fp32", micro_batch=8, grad_accum=1)
    assert accumulated == pytest.approx(single, rel=1e-5)


def test_one_rank_zero_note_only_for_stage_1_or_2_on_one_rank():
    for stage in (1, 2):
        note = one_rank_zero_note(stage, 1)
        assert f"zero_stage = {stage}" in note and "deepspeed.zero_stage=0" in note and "\n" not in note
    assert [one_rank_zero_note(s, w) for s, w in [(0, 1), (3, 1), (1, 2), (2, 4)]] == [None] * 4
