"""Optimizers are registered parts: AdamW as before, and Muon (orthogonalised momentum for the block
matrices, AdamW for the rest), with what each supports checked before anything runs."""
import copy
import json
from pathlib import Path

import pytest
import torch

from toolkit.cli import main
from toolkit.engine import make_optimizer, make_scheduler
from toolkit.errors import ConfigError
from toolkit.model import ModelConfig, Transformer
from toolkit.contracts import decay_groups
from toolkit.plugins.impl.optimizers import MuonMatrices, orthogonalize
from toolkit.recipe import DeepSpeedConfig, Recipe, TrainConfig, load_recipe
from toolkit.trainer import train

TINY = Path(__file__).resolve().parent / "recipes" / "bases" / "tiny.toml"


def recipe(optimizer="muon", **ds) -> Recipe:
    return Recipe(model=ModelConfig(vocab_size=61, block_size=16, n_layer=2, n_head=2, n_embd=32),
                  train=TrainConfig(optimizer=optimizer, lr=3e-3, warmup_steps=0, max_steps=5),
                  deepspeed=DeepSpeedConfig(**ds))


def loss_step(model, opt, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 61, (2, 16), generator=g)
    _, loss = model(x, torch.roll(x, -1, 1))
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_muon_is_muon_on_block_matrices_and_adamw_on_everything_else():
    torch.manual_seed(0)
    model = Transformer(recipe().model)
    twin = copy.deepcopy(model)
    opt = make_optimizer(model, recipe())
    blocks = [p for n, p in twin.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2]
    rest = [p for p in twin.parameters() if all(p is not b for b in blocks)]
    by_hand = [MuonMatrices(blocks, lr=0.02, weight_decay=0.0, momentum=0.95, nesterov=True),
               torch.optim.AdamW(decay_groups(rest, 0.1), lr=3e-3, betas=(0.9, 0.95), fused=True)]
    for seed in range(3):
        loss_step(model, opt, seed)
        g = torch.Generator().manual_seed(seed)
        x = torch.randint(0, 61, (2, 16), generator=g)
        _, loss = twin(x, torch.roll(x, -1, 1))
        for o in by_hand:
            o.zero_grad()
        loss.backward()
        for o in by_hand:
            o.step()
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7, msg=lambda m: f"{name}: {m}")
    # the wte / lm_head and the norms' gains went to AdamW, the attention and MLP matrices to Muon
    muon_ids = {id(p) for g in opt.muon.param_groups for p in g["params"]}
    assert id(model.transformer.h[0].attn.c_attn.weight) in muon_ids and id(model.lm_head.weight) not in muon_ids


def test_the_schedule_scales_muon_and_adamw_groups_alike():
    r = recipe()
    opt = make_optimizer(Transformer(r.model), r)
    sched = make_scheduler(opt, TrainConfig(lr=3e-3, min_lr=0.0, warmup_steps=2, max_steps=5))
    sched.step()
    muon_lr, adam_lr = opt.muon.param_groups[0]["lr"], opt.adamw.param_groups[0]["lr"]
    assert muon_lr / 0.02 == pytest.approx(adam_lr / 3e-3) == pytest.approx(2 / 3)


def test_muon_state_dict_round_trip_continues_exactly():
    torch.manual_seed(0)
    a = Transformer(recipe().model)
    opt_a = make_optimizer(a, recipe())
    for seed in range(2):
        loss_step(a, opt_a, seed)
    b = copy.deepcopy(a)
    opt_b = make_optimizer(b, recipe())
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    for seed in range(2, 4):
        loss_step(a, opt_a, seed)
        loss_step(b, opt_b, seed)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


@pytest.mark.parametrize("ds, said", [
    ({"zero_stage": 1}, "ZeRO stage 1 hands the optimizer flat shards of them; use deepspeed.zero_stage = 0"),
    ({"zero_stage": 0, "precision": "fp16"}, "muon cannot run under fp16"),
])
def test_muon_is_refused_where_deepspeed_would_flatten_its_matrices(tmp_path, capsys, ds, said):
    path = tmp_path / "r.toml"
    path.write_text(f'extends = "{TINY}"\n[train]\noptimizer = "muon"\n[deepspeed]\n'
                    + "".join(f"{k} = {json.dumps(v)}\n" for k, v in ds.items()))
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    assert len(err.value.lines) == 1 and said in err.value.lines[0] and "$.train.optimizer: " in err.value.lines[0]
    assert main(["recipe", "show", str(path)]) == 2 and capsys.readouterr().err.count("\n") == 1


def test_muon_trains_through_the_deepspeed_engine(tmp_path, tiny_recipe):
    path = tiny_recipe(tmp_path, {"train.optimizer": {"kind": "muon", "lr": 0.02}, "train.max_steps": 8,
                                  "train.eval_interval": 8})
    summary = train(load_recipe(path), run_dir=tmp_path / "run", progress=False)
    assert summary["status"] == "finished"
    evals = [line for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    first, last = (json.loads(evals[i])["val_loss"] for i in (0, -1))
    assert last < first - 0.1  # it learns (4.18 -> 3.99 in 8 steps)


def test_muon_orthogonalises_in_fp32_on_a_cpu_what_torch_does_in_bf16():
    # torch.optim.Muon's Newton-Schulz runs in bfloat16, which this CPU emulates ~13x slower than fp32
    g = torch.randn(96, 32, generator=torch.Generator().manual_seed(0))
    ours = orthogonalize(g, (3.4445, -4.7750, 2.0315), 5, 1e-7)
    assert ours.dtype == torch.float32 and ours.shape == g.shape
    torch.testing.assert_close(ours, torch.optim._muon._zeropower_via_newtonschulz(g, (3.4445, -4.7750, 2.0315), 5, 1e-7)
                               .float(), rtol=0, atol=2e-2)
    s = torch.linalg.svdvals(ours)
    assert 0.5 < s.min() and s.max() < 1.5  # near-orthogonal, as the quintic iteration leaves it
    # and a whole step is torch.optim.Muon's, to bf16's precision
    p, q = (torch.nn.Parameter(torch.randn(96, 32, generator=torch.Generator().manual_seed(1))) for _ in range(2))
    for opt, param in ((torch.optim.Muon([p], lr=0.02, weight_decay=0.1), p), (MuonMatrices([q], lr=0.02, weight_decay=0.1), q)):
        param.grad = g.clone()
        opt.step()
    torch.testing.assert_close(q, p, rtol=0, atol=5e-4)
