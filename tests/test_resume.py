"""Resuming a run: bitwise equal to never stopping (ZeRO 0-3, accumulation, dropout), refusals, bad input.

A run is stopped the way a scheduler stops it (SIGTERM to the process, here from inside a step)
and resumed by a fresh Trainer; in fp32 on CPU every logged loss, learning rate and gradient
norm, and the final weights, must equal an uninterrupted run's bit for bit.
"""
import json
import os
import shutil
import signal

import pytest
import torch

from toolkit import checkpoint, runfolder
from toolkit.cli import main
from toolkit.recipe import load_recipe, registry_of
from toolkit.trainer import Trainer, train

#: changes to tests/recipes/bases/tiny.toml: accumulation, dropout, frequent checkpoints
CKPT = {"name": "ckpt", "model.block_size": 16, "model.dropout": 0.1, "train.grad_accum": 2, "train.max_steps": 6,
        "train.lr": 3e-3, "train.eval_interval": 3, "train.eval_batches": 1, "train.checkpoint_interval": 2,
        "train.keep_checkpoints": 2, "train.log_interval": 1, "generate.prompts": ["ROMEO:"],
        "generate.max_new_tokens": 4}


def rows(run_dir, kind):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


def curve(run_dir):
    """What must not change when a run stops and resumes: every train and eval number."""
    train_rows = [(r["step"], r["tokens"], r["loss"], r["lr"], r["grad_norm"]) for r in rows(run_dir, "train")]
    eval_rows = [(r["step"], r["train_loss"], r["val_loss"]) for r in rows(run_dir, "eval")]
    return train_rows, eval_rows


def assert_same_weights(a, b):
    from safetensors import safe_open

    with safe_open(a / "model.safetensors", "pt") as fa, safe_open(b / "model.safetensors", "pt") as fb:
        assert fa.metadata() == fb.metadata()
        assert sorted(fa.keys()) == sorted(fb.keys())
        for name in fa.keys():
            ta, tb = fa.get_tensor(name), fb.get_tensor(name)
            assert ta.dtype == tb.dtype and torch.equal(ta, tb), name


class StopAt(Trainer):
    """Sends its own process SIGTERM during step ``at``, as a scheduler would."""

    def __init__(self, *args, at: int, sig: int = signal.SIGTERM, **kwargs):
        super().__init__(*args, **kwargs)
        self.at, self.sig = at, sig

    def train_step(self):
        loss = super().train_step()
        if self.step + 1 == self.at:
            os.kill(os.getpid(), self.sig)
        return loss


@pytest.fixture(scope="module")
def recipe_path(tmp_path_factory, tiny_recipe):
    return tiny_recipe(tmp_path_factory.mktemp("resume"), CKPT, name="ckpt")


@pytest.fixture(scope="module")
def stopped(recipe_path, tmp_path_factory):
    """A stage-0 run stopped by SIGTERM at step 3 (checkpoints at 2 and 3)."""
    run = tmp_path_factory.mktemp("stopped") / "run"
    summary = StopAt(load_recipe(recipe_path), run_dir=run, progress=False, at=3).run()
    assert summary["status"] == "interrupted"
    return run


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_stopped_and_resumed_run_is_bitwise_equal_to_an_uninterrupted_one(recipe_path, tmp_path, stage):
    sets = [f"deepspeed.zero_stage={stage}"]
    train(load_recipe(recipe_path, sets), run_dir=tmp_path / "ref", progress=False)

    run = tmp_path / "run"
    stopped = StopAt(load_recipe(recipe_path, sets), run_dir=run, progress=False, at=3).run()
    assert (stopped["status"], stopped["steps"], stopped["signal"]) == ("interrupted", 3, signal.SIGTERM)
    assert [p.name for p in checkpoint.complete_checkpoints(run / "checkpoints")] == ["step-0000002", "step-0000003"]
    assert (run / "checkpoints" / "latest").read_text() == "step-0000003"

    resumed = train(load_recipe(run, sets), run_dir=run, resume=True, progress=False)  # a fresh Trainer
    assert resumed["status"] == "finished" and resumed["steps"] == 6 and resumed["tokens"] == 6 * 8 * 16
    ref_train, ref_eval = curve(tmp_path / "ref")
    got_train, got_eval = curve(run)
    assert [r[0] for r in got_train] == [1, 2, 3, 4, 5, 6]
    assert got_train == ref_train  # losses, learning rates and gradient norms, exactly
    assert got_eval == ref_eval
    assert_same_weights(tmp_path / "ref", run)
    assert (run / "samples.txt").read_text() == (tmp_path / "ref" / "samples.txt").read_text()
    assert [r["step"] for r in rows(run, "resume")] == [3]


def test_checkpoint_holds_the_toolkit_state(stopped):
    state = checkpoint.read_state(stopped / "checkpoints" / "step-0000003")
    assert state["step"] == 3 and state["tokens"] == 3 * 8 * 16 and state["world_size"] == 1
    assert state["loaders"][0]["cursor"] > 0 and len(state["rng"]) == 1
    assert set(state["rng"][0]) == {"python", "numpy", "torch", "cuda"}
    assert state["best_val_loss"] == pytest.approx(rows(stopped, "eval")[-1]["val_loss"])
    assert state["recipe"]["model"]["n_layer"] == 2
    assert state["components"]["attention:mha"].startswith("playattention ")
    assert len(state["fingerprint"]) == 64
    assert (stopped / "checkpoints" / "step-0000003" / "tokenizer.json").is_file()


def test_resume_refuses_a_changed_model_showing_each_difference(stopped, capsys):
    before = (stopped / "metrics.jsonl").read_text()
    code = main(["train", "--resume", str(stopped), "--set", "model.n_layer=3", "--set", "model.dropout=0.0"])
    err = capsys.readouterr().err.splitlines()
    assert code == 2
    assert err[0].startswith(f"error: cannot resume {stopped} from step-0000003")
    assert err[1:] == ["error: model.n_layer: 2 -> 3", "error: model.dropout: 0.1 -> 0.0"]
    assert (stopped / "metrics.jsonl").read_text() == before  # refused before anything was touched


def test_resume_refuses_other_plugin_versions_and_engine_layout(recipe_path):
    recipe = load_recipe(recipe_path)
    saved = checkpoint.identity(recipe, registry_of(recipe))
    now = checkpoint.identity(load_recipe(recipe_path, ["deepspeed.zero_stage=2", "train.max_steps=9"]),
                              registry_of(recipe))
    now["components"]["attention:mha"] = "playattention 99.0"
    refused, allowed = checkpoint.identity_changes(saved, now)
    old = saved["components"]["attention:mha"]
    assert refused == ["deepspeed.zero_stage: 0 -> 2", f'plugin attention:mha: "{old}" -> "playattention 99.0"']
    assert allowed == ["train.max_steps: 6 -> 9"]


def test_training_only_changes_are_allowed_and_logged(stopped, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(stopped, run)
    summary = train(load_recipe(run, ["train.max_steps=5", "train.eval_interval=5"]), run_dir=run, resume=True,
                    progress=False)
    assert summary["status"] == "finished" and summary["steps"] == 5
    log = (run / "resume.log").read_text()
    assert "resumed at step 3 from" in log and "step-0000003 on 1 rank(s)" in log
    assert "  changed train.max_steps: 6 -> 5" in log and "  changed train.eval_interval: 3 -> 5" in log
    (resume,) = rows(run, "resume")
    assert resume["changes"] == ["train.max_steps: 6 -> 5", "train.eval_interval: 3 -> 5"]
    assert [r["step"] for r in rows(run, "eval")] == [0, 3, 5]
    assert 'max_steps = 5' in (run / "recipe.toml").read_text()  # the recipe it continued with


def test_resume_drops_what_was_logged_after_the_checkpoint(stopped, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(stopped, run)
    shutil.rmtree(run / "checkpoints" / "step-0000003")  # as if killed after step 3, before its checkpoint
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"type": "train", "step": 4, "loss": 1.0}\n{"type": "tr')  # and a torn last line
    with open(run / "samples.txt", "a") as f:
        f.write("=== step 4 | sample 1/1 | temperature 0.8 ===\nlost\n\n")
    train(load_recipe(run), run_dir=run, resume=True, progress=False)
    steps = [r["step"] for r in rows(run, "train")]
    assert steps == [1, 2, 3, 4, 5, 6]  # lines 3 and 4 of the lost session are gone, each step once
    assert [r["step"] for r in rows(run, "eval")] == [0, 3, 6]
    assert "lost" not in (run / "samples.txt").read_text()


def test_resume_auto_picks_the_newest_run_of_the_recipe(recipe_path, stopped, tmp_path):
    out = tmp_path / "runs"
    for name in ("ckpt-20240101-000000", "ckpt-20240301-000000", "ckpt-20240301-000000-2", "other-20250101-000000"):
        shutil.copytree(stopped, out / name)
    shutil.rmtree(out / "ckpt-20240301-000000-2" / "checkpoints")  # newest, but nothing to resume
    text = (out / "other-20250101-000000" / "recipe.toml").read_text().replace('name = "ckpt"', 'name = "other"')
    (out / "other-20250101-000000" / "recipe.toml").write_text(text)
    assert runfolder.find_run(out, "ckpt") == out / "ckpt-20240301-000000"
    with pytest.raises(checkpoint.CheckpointError, match="no run of recipe 'nope' under"):
        runfolder.find_run(out, "nope")


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing", "no such run folder"),
    (lambda d: (d / "plain").mkdir() or d / "plain", "not a run folder (no recipe.toml)"),
    (lambda d: d / "run", "no complete checkpoint in"),
])
def test_bad_resume_folders_are_one_line_and_exit_2(stopped, tmp_path, capsys, make, message):
    run = tmp_path / "run"
    shutil.copytree(stopped, run, ignore=shutil.ignore_patterns("toolkit_state.json"))  # every save unfinished
    code = main(["train", "--resume", str(make(tmp_path))])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err


def test_resume_auto_without_a_recipe_and_a_conflicting_run_dir_are_refused(stopped, capsys):
    assert main(["train", "--resume", "auto"]) == 2
    assert "--resume auto needs the RECIPE" in capsys.readouterr().err
    assert main(["train", "--resume", str(stopped), "--run-dir", str(stopped.parent / "elsewhere")]) == 2
    assert "a resumed run continues in its own folder" in capsys.readouterr().err


def test_resume_auto_continues_the_newest_run_from_the_command_line(recipe_path, stopped, tmp_path, capsys):
    out = tmp_path / "runs"
    shutil.copytree(stopped, out / "ckpt-20240101-000000")
    shutil.copytree(stopped, out / "ckpt-20240301-000000")
    code = main(["train", str(recipe_path), "--resume", "auto", "--set", f"train.out_dir={out}"])
    assert code == 0, capsys.readouterr().err
    assert "finished 6 steps" in capsys.readouterr().out
    assert json.loads((out / "ckpt-20240301-000000" / "summary.json").read_text())["status"] == "finished"
    assert json.loads((out / "ckpt-20240101-000000" / "summary.json").read_text())["status"] == "interrupted"


def test_resume_on_several_local_ranks_passes_the_run_folder_to_every_rank(stopped, monkeypatch):
    import subprocess

    launched = []

    class FakePopen:
        def __init__(self, cmd, **kwargs):
            launched.append((cmd, kwargs))

        def wait(self):
            return 0

    monkeypatch.setattr(subprocess, "Popen", FakePopen)
    assert main(["train", "--resume", str(stopped), "--nproc", "2"]) == 0
    ((cmd, kwargs),) = launched
    assert cmd[cmd.index("toolkit"):] == ["toolkit", "train", "--run-dir", str(stopped), "--resume", str(stopped)]
    assert "--nproc_per_node=2" in cmd and kwargs["start_new_session"]  # torchrun gets each signal once, from us
