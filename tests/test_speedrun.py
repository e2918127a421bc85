"""The NanoGPT speedrun's remaining pieces as built-ins: ReLU² (mlp relu2), zero-initialised projections
(model.zero_init_proj), value embeddings (value_residual's value_embeds), a sliding window that grows during
training (window_start, through the set_progress contract hook), and Muon leaving embedding tables to AdamW."""
import pytest
import torch
import torch.nn.functional as F

from test_layers import ROOT
from test_resume import StopAt, curve
from toolkit.cli import main
from toolkit.converter import structure
from toolkit.contracts import set_progress
from toolkit.model import ModelConfig, Transformer
from toolkit.plugin_manager import default_registry
from toolkit.recipe import load_recipe
from toolkit.trainer import Trainer, train

IDX = torch.randint(0, 50, (2, 20), generator=torch.Generator().manual_seed(1))


def small(**changes) -> Transformer:
    torch.manual_seed(0)
    cfg = structure(default_registry(), {"vocab_size": 50, "block_size": 24, "n_layer": 6, "n_head": 2, "n_embd": 16,
                                         "position": "rope", **changes}, ModelConfig)
    return Transformer(cfg).eval()


def test_relu2_is_the_square_of_relu_between_the_two_projections():
    mlp = small(mlp="relu2").transformer.h[0].mlp
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(mlp(x), mlp.c_proj(F.relu(mlp.c_fc(x)) ** 2))


def test_zero_init_proj_starts_every_block_as_the_identity():
    model = small(zero_init_proj=True, mlp="relu2")
    projections = [p for n, p in model.named_parameters() if n.endswith("c_proj.weight")]
    assert len(projections) == 12 and all(torch.count_nonzero(p) == 0 for p in projections)
    t = model.transformer
    with torch.no_grad():
        torch.testing.assert_close(model(IDX)[0], model.lm_head(t.ln_f(t.wte(IDX))))
    default = small()  # GPT-2's init stays the default
    assert all(torch.count_nonzero(p) > 0 for n, p in default.named_parameters() if n.endswith("c_proj.weight"))


def test_value_embeddings_belong_to_the_first_layers_and_the_last_layers_reuse_them():
    model = small(attention={"kind": "value_residual", "value_embeds": 2})
    attn = [b.attn for b in model.transformer.h]
    assert [a.embed_key for a in attn] == ["ve0", "ve1", None, None, "ve0", "ve1"]
    assert [a.value_embed is not None for a in attn] == [True, True, False, False, False, False]
    _, loss = model.train()(IDX, IDX)
    loss.backward()
    assert attn[4].ve_lambdas.grad[1].abs() > 0 and attn[0].value_embed.weight.grad.abs().sum() > 0
    plain = small(attention="value_residual")  # with b = 0 and a = 1 the tables drop out
    plain.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        for a in attn:
            if a.ve_lambdas is not None:
                a.ve_lambdas.copy_(torch.tensor([1.0, 0.0]))
        torch.testing.assert_close(model.eval()(IDX)[0], plain(IDX)[0])
    prompt = IDX[:, :3]
    assert torch.equal(model.generate(prompt, 12, temperature=0), model.generate(prompt, 12, temperature=0, use_cache=False))


def test_more_value_embeddings_than_half_the_layers_is_refused():
    with pytest.raises(Exception, match=r"value_embeds \(4\) must be at most half of n_layer \(6\)"):
        small(attention={"kind": "value_residual", "value_embeds": 4})


@pytest.mark.parametrize("kind", ["sliding_window", "value_residual"])
def test_the_window_grows_in_training_in_multiples_of_window_start_and_eval_uses_the_final_one(kind):
    model = small(attention={"kind": kind, "window": 16, "window_start": 4, "window_growth": 0.5})
    attn = model.transformer.h[0].attn
    seen = []
    for step in (0, 10, 25, 40, 50, 99):
        set_progress(model, step, 100)
        seen.append(attn.growing)
    assert seen == [4, 4, 8, 12, 16, 16]
    fixed = {w: small(attention={"kind": kind, "window": w}) for w in (8, 16)}
    set_progress(model, 25, 100)  # window 8 while training
    with torch.no_grad():
        torch.testing.assert_close(model.train()(IDX)[0], fixed[8].train()(IDX)[0])
        torch.testing.assert_close(model.eval()(IDX)[0], fixed[16](IDX)[0])  # evaluation and generate: the final
    assert small(attention={"kind": kind, "window": 16, "window_start": 4}).transformer.h[0].attn.growing is None


@pytest.mark.slow
def test_the_trainer_grows_the_window_by_the_step_and_a_resumed_run_continues_it(tiny_recipe, tmp_path):
    path = tiny_recipe(tmp_path, {"name": "grow", "model.block_size": 16, "model.attention":
                                  {"kind": "sliding_window", "window": 16, "window_start": 4}, "train.max_steps": 6,
                                  "train.eval_interval": 3, "train.eval_batches": 1, "train.checkpoint_interval": 3,
                                  "generate.max_new_tokens": 4}, name="grow")
    trainer = Trainer(load_recipe(path), run_dir=tmp_path / "ref", progress=False)
    assert trainer.run()["status"] == "finished"
    assert trainer.engine.module.transformer.h[0].attn.growing == 12  # step 5 of 6: 4 + 5/6 * 12 -> 12
    run = tmp_path / "run"
    assert StopAt(load_recipe(path), run_dir=run, progress=False, at=3).run()["status"] == "interrupted"
    assert train(load_recipe(run), run_dir=run, resume=True, progress=False)["status"] == "finished"
    assert curve(run) == curve(tmp_path / "ref")


def test_muon_leaves_embedding_tables_inside_blocks_to_adamw():
    from test_optimizers import recipe
    from toolkit.plugins.impl.optimizers import Muon
    from toolkit.plugins.optimizers import MuonOptions

    model = small(attention={"kind": "value_residual", "value_embeds": 1})
    opt = Muon(MuonOptions(), model, recipe())
    muon = {id(p) for g in opt.muon.param_groups for p in g["params"]}
    assert id(model.transformer.h[0].attn.value_embed.weight) not in muon
    assert id(model.transformer.h[0].attn.c_attn.weight) in muon


def test_inspect_counts_the_speedrun_recipe_and_measures_its_value_residual_kv_cache(capsys):
    assert main(["inspect", str(ROOT / "recipes" / "speedrun.toml")]) == 0
    out = capsys.readouterr().out
    V, C, L, hidden = 50304, 768, 12, 4 * 768
    # embedding, untied head, 3 value embedding tables; per layer qkv, proj, mlp, 2 norms, 2 qk-norms,
    # value-residual lambda (not layer 0), 2 value-embedding lambdas (6 layers); x0 lambdas, 6 skip weights
    per_layer = 4 * C * C + 2 * C * hidden + 2 * C + 2 * 128
    want = 2 * V * C + 3 * V * C + L * per_layer + C + (L - 1) + 6 * 2 + L * 2 + L // 2
    assert f"total                      {want:,}" in out
    assert "value_residual      12              3,072        1,024" in out  # bytes/token/layer, all 1024 kept


def test_the_speedrun_recipes_assemble_every_piece_and_the_cpu_one_matches_gpt_cpus_size_data_and_budget():
    from test_layers import ROOT

    for name in ("speedrun", "speedrun-cpu"):
        r = load_recipe(ROOT / "recipes" / f"{name}.toml")
        m, a, b = r.model, r.model.attention.options, r.model.block.options
        assert (m.position.kind, m.norm.kind, m.mlp.kind, m.block.kind, m.attention.kind) == (
            "rope", "rmsnorm", "relu2", "shortcut_block", "value_residual")
        assert a.qk_norm == "rmsnorm" and a.value_embeds > 0 and a.window_start < a.window == m.block_size
        assert (b.x0, b.unet, m.tie_embeddings, m.zero_init_proj, m.logit_softcap) == (True, True, False, True, 30.0)
        assert r.train.optimizer.kind == "muon"
    full = load_recipe(ROOT / "recipes" / "speedrun.toml").model
    assert (full.n_layer, full.n_embd, full.n_head, full.vocab_size) == (12, 768, 6, 50304)
    cpu, gpt = load_recipe(ROOT / "recipes" / "speedrun-cpu.toml"), load_recipe(ROOT / "recipes" / "gpt-cpu.toml")
    assert (cpu.data, cpu.train.max_steps, cpu.train.micro_batch, cpu.train.eval_interval) == (
        gpt.data, gpt.train.max_steps, gpt.train.micro_batch, gpt.train.eval_interval)
    assert [getattr(cpu.model, k) for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")] == [
        getattr(gpt.model, k) for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")]


def test_the_speedrun_ablation_goes_from_gpt_cpu_to_speedrun_cpu_one_piece_at_a_time():
    from test_layers import ROOT
    from toolkit import ablation

    _, resolved = ablation.load_ablation(ROOT / "recipes" / "ablations" / "speedrun.toml")
    first, last = resolved[0].recipe, resolved[-1].recipe
    gpt, speedrun = load_recipe(ROOT / "recipes" / "gpt-cpu.toml"), load_recipe(ROOT / "recipes" / "speedrun-cpu.toml")
    assert first.model == gpt.model and (last.model, last.train.optimizer, last.train.weight_decay) == (
        speedrun.model, speedrun.train.optimizer, speedrun.train.weight_decay)
    assert all(r.recipe.train.max_steps == 500 for r in resolved)


def test_the_speedrun_pieces_compile_as_one_graph_while_the_window_grows():
    model = small(attention={"kind": "value_residual", "qk_norm": "rmsnorm", "value_embeds": 2, "window": 16,
                             "window_start": 4}, block="shortcut_block", mlp="relu2",
                  tie_embeddings=False, logit_softcap=30.0).train()  # projections not at zero: attention counts
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    losses = []
    for step in (0, 60):  # windows 4 and 12: a graph each
        set_progress(model, step, 100)
        losses.append(compiled(IDX, IDX)[1])
        torch.testing.assert_close(losses[-1], model(IDX, IDX)[1])
    assert not torch.allclose(*losses)
