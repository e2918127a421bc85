"""The Trainer end to end on CPU through DeepSpeed: the run folder, metrics, plots, export, failures."""
import json
import math

import pytest
import torch

from toolkit.cli import main
from toolkit.commands.train import prompt_hint, render_train_summary
from toolkit.errors import ConfigError, DataError
from toolkit.generate import load_run
from toolkit.recipe import load_recipe
from toolkit.tokenizer import GPT2Tokenizer
from toolkit.trainer import Trainer, train

RUN_FILES = ["recipe.toml", "ds_config.json", "versions.json", "metrics.jsonl", "losses.png", "summary.png",
             "samples.txt", "model.safetensors", "model.toml", "export.json", "tokenizer.json", "summary.json",
             ".writer.lock"]  # the writer's lock (toolkit.runfolder.lock_folder)
TRAIN_KEYS = {"type", "step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "elapsed"}
EVAL_KEYS = {"type", "step", "tokens", "train_loss", "val_loss", "elapsed"}
SUMMARY_KEYS = {"run_dir", "status", "steps", "tokens", "final_train_loss", "final_val_loss", "best_val_loss",
                "tokens_per_s", "peak_mem_bytes", "wall_s", "params", "flops_per_token"}


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory, tiny_recipe):
    return tiny_recipe(tmp_path_factory.mktemp("trainer"), {
        "train.micro_batch": 8, "train.max_steps": 12, "train.lr": 3e-3, "train.eval_interval": 6,
        "train.sample_interval": 6, "train.log_interval": 4, "generate.prompts": ["ROMEO:", "\n"],
        "generate.max_new_tokens": 24})


@pytest.fixture(scope="module")
def trained(tiny_file):
    trainer = Trainer(load_recipe(tiny_file), progress=False)
    summary = trainer.run()
    return trainer, summary


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_run_folder_has_every_file(trained):
    trainer, summary = trained
    run = trainer.run_dir
    assert summary["status"] == "finished", summary
    assert run.parent.name == "runs" and run.name.startswith("tiny-")
    assert sorted(p.name for p in run.iterdir() if p.is_file()) == sorted(RUN_FILES)
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir())
    assert ckpts == ["step-0000012"]
    for png in ("losses.png", "summary.png"):
        assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ds = json.loads((run / "ds_config.json").read_text())
    assert ds["train_batch_size"] == 8 and ds["zero_optimization"]["stage"] == 0
    versions = json.loads((run / "versions.json").read_text())
    assert {"python", "torch", "deepspeed", "playattention"} <= versions.keys()
    assert any("attention:mha" in p["components"] for p in versions["plugins"])


def test_metrics_lines_have_exactly_the_documented_keys(trained):
    trainer, _ = trained
    rows = metrics(trainer.run_dir)
    train_rows = [r for r in rows if r["type"] == "train"]
    eval_rows = [r for r in rows if r["type"] == "eval"]
    assert [r["step"] for r in train_rows] == list(range(1, 13))
    assert all(set(r) == TRAIN_KEYS for r in train_rows)
    assert [r["step"] for r in eval_rows] == [0, 6, 12] and all(set(r) == EVAL_KEYS for r in eval_rows)
    assert train_rows[-1]["tokens"] == 12 * 8 * 32
    assert all(r["mfu"] is None and r["tokens_per_s"] > 0 and r["grad_norm"] > 0 for r in train_rows)


def test_loss_decreases(trained):
    trainer, summary = trained
    evals = [r for r in metrics(trainer.run_dir) if r["type"] == "eval"]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.3
    assert evals[0]["val_loss"] == pytest.approx(math.log(65), abs=0.15)  # untrained: about uniform
    assert summary["final_val_loss"] == evals[-1]["val_loss"] and summary["best_val_loss"] <= evals[-1]["val_loss"]


def test_summary_is_returned_and_written(trained):
    trainer, summary = trained
    assert SUMMARY_KEYS <= summary.keys()
    assert json.loads((trainer.run_dir / "summary.json").read_text()) == summary
    assert summary["steps"] == 12 and summary["tokens"] == 12 * 256
    assert summary["params"] > 0 and summary["flops_per_token"] > 0 and summary["peak_mem_bytes"] > 2**20


def test_samples_are_headed_by_their_step(trained):
    trainer, _ = trained
    text = (trainer.run_dir / "samples.txt").read_text()
    assert text.count("=== step 6 |") == 2 and text.count("=== step 12 |") == 2
    assert "\nROMEO:" in text


def test_exported_weights_give_the_engines_logits(trained):
    trainer, _ = trained
    model, tokenizer, recipe = load_run(trainer.run_dir)
    assert recipe.name == "tiny" and tokenizer.vocab_size == 65
    assert model.lm_head.weight is model.transformer.wte.weight  # tied, stored once
    idx = torch.tensor([tokenizer.encode("ROMEO: what light")])
    engine_module = trainer.engine.module.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], engine_module(idx)[0], rtol=0, atol=0)


def test_vocab_smaller_than_the_tokenizer_is_refused(tiny_file):
    with pytest.raises(ConfigError, match="model.vocab_size: 50 is smaller than the char tokenizer's vocabulary of 65"):
        train(load_recipe(tiny_file, ["model.vocab_size=50"]), progress=False)


def test_block_size_too_long_for_the_data_is_refused(tiny_file):
    with pytest.raises(DataError, match="too few for one batch"):
        train(load_recipe(tiny_file, ["model.block_size=60000", "train.micro_batch=2"]), progress=False)


def test_a_failure_during_training_is_recorded_as_failed(tiny_file, tmp_path, monkeypatch):
    calls = []

    def boom(self):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom at the third step")
        return original(self)

    original = Trainer.train_step
    monkeypatch.setattr(Trainer, "train_step", boom)
    summary = train(load_recipe(tiny_file, ["train.max_steps=5"]), run_dir=tmp_path / "run", progress=False)
    assert summary["status"] == "failed" and summary["steps"] == 2
    assert summary["error"] == "RuntimeError: boom at the third step"
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "failed"


def test_grad_accumulation_follows_the_same_curve_as_one_big_batch(tiny_file, tmp_path):
    common = ["train.max_steps=4", "train.eval_interval=100", "generate.max_new_tokens=1", "train.eval_batches=1"]
    accumulated = train(load_recipe(tiny_file, [*common, "train.micro_batch=4", "train.grad_accum=2"]),
                        run_dir=tmp_path / "accum", progress=False)
    single = train(load_recipe(tiny_file, [*common, "train.micro_batch=8", "train.grad_accum=1"]),
                   run_dir=tmp_path / "single", progress=False)

    def losses(name):
        return [r["loss"] for r in metrics(tmp_path / name) if r["type"] == "train"]

    assert accumulated["tokens"] == single["tokens"] == 4 * 8 * 32
    assert losses("accum") == pytest.approx(losses("single"), rel=1e-5)


def test_train_command_says_where_the_plot_samples_and_weights_are(tiny_file, tmp_path, capsys):
    run = tmp_path / "cli-run"
    assert main(["train", str(tiny_file), "--set", "train.max_steps=2", "--set", "train.warmup_steps=1",
                 "--set", "generate.max_new_tokens=2", "--run-dir", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"finished 2 steps ({2 * 8 * 32:,} tokens)" in out
    for name in ("losses.png", "samples.txt", "model.safetensors"):
        assert f"{run / name}" in out and (run / name).is_file()
    # a char-level model can only continue its own characters: the hint's prompt is its validation text's first line
    assert f"  generate: playattention generate {run} --prompt GREMIO:\n" in out


def test_the_end_of_run_hint_gives_a_subword_model_no_char_level_prompt(tiny_recipe, tmp_path):
    recipe = load_recipe(tiny_recipe(tmp_path, {"data.tokenizer": "gpt2", "model.vocab_size": 50304}))
    GPT2Tokenizer().save(tmp_path / "run")
    summary = {"run_dir": str(tmp_path / "run"), "status": "finished", "steps": 1, "tokens": 1, "wall_s": 1.0,
               "final_val_loss": 1.0, "best_val_loss": 1.0}
    text = render_train_summary(summary, prompt_hint(recipe, tmp_path / "run"))
    assert f"  generate: playattention generate {tmp_path / 'run'}\n" in text + "\n"


def test_output_that_is_not_a_terminal_gets_a_plain_line_every_log_interval_not_bar_frames(tiny_file, tmp_path,
                                                                                           capsys):
    assert main(["train", str(tiny_file), "--set", "train.max_steps=8", "--set", "generate.max_new_tokens=2",
                 "--run-dir", str(tmp_path / "logged")]) == 0
    err = capsys.readouterr().err  # captured: not a terminal, as with nohup, a scheduler or an ablation's log
    lines = [ln for ln in err.splitlines() if ln.startswith("step ") and "/8: loss " in ln]
    assert [ln.split(":")[0] for ln in lines] == ["step 1/8", "step 4/8", "step 8/8"]  # log_interval = 4
    assert all(", lr " in ln and " tokens/s, ETA " in ln for ln in lines)
    assert "step/s" not in err  # no progress bar frames


def test_train_command_refuses_indivisible_batch_arithmetic_in_one_line(tiny_file, capsys):
    assert main(["train", str(tiny_file), "--set", "train.tokens_per_step=1000"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "train.tokens_per_step" in err and "256" in err


STARTUP_PHASES = ["set-up", "data", "model build", "engine init", "first eval", "first step", "total"]


def test_summary_keeps_the_start_up_phases_up_to_the_first_step(trained):
    _, summary = trained
    startup = summary["startup"]
    assert list(startup) == STARTUP_PHASES
    assert all(v >= 0 for v in startup.values())
    assert startup["total"] == pytest.approx(sum(v for k, v in startup.items() if k != "total"))


def test_train_verbose_prints_the_start_up_and_one_rank_zero_1_says_its_cost_once(tiny_file, tmp_path, capsys):
    run = tmp_path / "zero1"
    assert main(["train", str(tiny_file), "--set", "train.max_steps=2", "--set", "deepspeed.zero_stage=1",
                 "--set", "generate.max_new_tokens=2", "--run-dir", str(run), "--verbose"]) == 0
    err = capsys.readouterr().err
    notes = [ln for ln in err.splitlines() if "on one rank" in ln]
    assert len(notes) == 1 and "zero_stage = 1" in notes[0] and "--set deepspeed.zero_stage=0" in notes[0]
    shown = [ln for ln in err.splitlines() if ln.startswith("start-up: ")]
    assert len(shown) == 1 and "imports" in shown[0] and "engine init" in shown[0] and "first step" in shown[0]
    startup = json.loads((run / "summary.json").read_text())["startup"]
    assert list(startup) == ["imports", "command", *STARTUP_PHASES]
