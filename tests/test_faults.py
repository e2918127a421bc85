"""Faults during training: signals, kill -9, a diverging loss, a run folder that cannot be written, a full disk.

Signals and kill -9 hit a real `playattention train` subprocess; the rest run in this process.
"""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from test_resume import assert_same_weights, curve, rows
from toolkit import checkpoint
from toolkit.cli import main
from toolkit.recipe import load_recipe
from toolkit.signals import StopSignals
from toolkit.trainer import Trainer, train

#: the long-running recipe these tests stop, kill and break (changes to tests/recipes/bases/tiny.toml)
LONG = {"name": "faults", "model.block_size": 16, "model.dropout": 0.1, "train.grad_accum": 1,
        "train.max_steps": 100000, "train.lr": 3e-3,
        "train.schedule": "constant",  # the learning rate does not depend on max_steps: a resume may set it
        "train.eval_interval": 100000, "train.eval_batches": 1, "train.checkpoint_interval": 3,
        "train.keep_checkpoints": 2, "train.log_interval": 1, "generate.prompts": ["ROMEO:"],
        "generate.max_new_tokens": 4}

BLOWUP = '''"""Test plugin: a layer norm whose output turns to inf after `after` training steps (a diverging run)."""
import attrs
import torch
import torch.nn.functional as F
from torch import nn

from toolkit.hookspecs import hookimpl


@attrs.frozen
class BlowupOptions:
    after: int = 5


class Blowup(nn.Module):
    Options = BlowupOptions

    def __init__(self, opts, dims, dim):
        super().__init__()
        self.after, self.calls = opts.after, 0
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if self.training:
            self.calls += 1
        y = F.layer_norm(x, self.weight.shape, self.weight)
        return y * float("inf") if self.calls > self.after else y


@hookimpl
def register_components(register):
    register("norm", "blowup", Blowup)
'''


@pytest.fixture(scope="module")
def long_recipe(tmp_path_factory, tiny_recipe):
    return tiny_recipe(tmp_path_factory.mktemp("faults"), LONG, name="faults")


_started: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def no_training_outlives_its_test():
    """A failed assertion must not leave a training (or its torchrun ranks) running after the test."""
    import psutil

    yield
    while _started:
        proc = _started.pop()
        if proc.poll() is not None:
            continue
        try:
            family = psutil.Process(proc.pid).children(recursive=True)
        except psutil.Error:
            family = []
        for p in [*family, proc]:
            try:
                p.kill()
            except (psutil.Error, ProcessLookupError):
                pass
        proc.wait()


def start(recipe_path, run_dir, *args):
    """`playattention train` in a subprocess (own output file), with this process's thread count for equal sums."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT",
                                                            "MASTER_ADDR")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(torch.get_num_threads()))
    log = run_dir.parent / f"{run_dir.name}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "toolkit", "train", str(recipe_path), "--run-dir", str(run_dir),
                                 *args], env=env, stdout=out, stderr=subprocess.STDOUT)
    _started.append(proc)
    return proc, log


def wait_until(condition, proc, log, timeout=180):
    end = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"training ended early ({proc.returncode}):\n{log.read_text()[-3000:]}"
        assert time.monotonic() < end, f"timed out:\n{log.read_text()[-3000:]}"
        time.sleep(0.05)


def last_step(run_dir):
    try:
        return max((r["step"] for r in rows(run_dir, "train")), default=0)
    except (FileNotFoundError, json.JSONDecodeError):  # not there yet, or a line half written
        return 0


def error_lines(capsys):
    """The error lines on stderr (a data preparation progress bar may come first)."""
    return [ln for ln in capsys.readouterr().err.replace("\r", "\n").splitlines() if ln.startswith("error:")]


@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_finishes_the_step_saves_a_checkpoint_and_says_how_to_resume(long_recipe, tmp_path, sig, status):
    run = tmp_path / "run"
    proc, log = start(long_recipe, run)
    wait_until(lambda: last_step(run) >= 2, proc, log)
    proc.send_signal(sig)
    assert proc.wait(timeout=120) == status, log.read_text()[-3000:]
    stopped_at = last_step(run)
    name = signal.Signals(sig).name
    out = log.read_text()
    assert f"{name}: finishing this step, then saving a checkpoint and stopping" in out
    assert (f"interrupted: {name} at step {stopped_at}: saved {run / 'checkpoints' / checkpoint.tag_for(stopped_at)}; "
            f"resume with: playattention train --resume {run}\n") in out
    assert checkpoint.latest(run / "checkpoints").name == checkpoint.tag_for(stopped_at)
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["status"], summary["signal"], summary["steps"]) == ("interrupted", sig, stopped_at)
    assert not (run / "model.safetensors").exists()  # not finished: nothing exported


def test_kill_9_loses_at_most_one_checkpoint_interval_and_resumes_exactly(long_recipe, tmp_path):
    run = tmp_path / "run"
    proc, log = start(long_recipe, run)
    wait_until(lambda: (found := checkpoint.latest(run / "checkpoints")) is not None
               and last_step(run) >= checkpoint.step_of(found) + 2, proc, log)
    proc.kill()
    proc.wait()
    saved = checkpoint.step_of(checkpoint.latest(run / "checkpoints"))
    # at most one checkpoint interval lost (0 when a checkpoint completed between the wait and the kill)
    assert 0 <= last_step(run) - saved <= 3

    until = [f"train.max_steps={saved + 3}"]
    resumed = train(load_recipe(run, until), run_dir=run, resume=True, progress=False)
    reference = train(load_recipe(long_recipe, until), run_dir=tmp_path / "ref", progress=False)
    assert resumed["status"] == reference["status"] == "finished"
    got_train, got_eval = curve(run)
    assert [r[0] for r in got_train] == list(range(1, saved + 4))  # the killed session's later lines are gone
    assert (got_train, got_eval) == curve(tmp_path / "ref")
    assert_same_weights(run, tmp_path / "ref")


def test_a_signal_landing_during_the_stop_flag_all_reduce_stops_the_next_step(monkeypatch):
    """The handler runs as the collective returns; the all-reduced 0 must not erase what it set."""
    import torch.distributed as dist

    signals = StopSignals(rank=0, world_size=2, device=torch.device("cpu"))

    def all_reduce_interrupted(tensor, op=None):
        signals.received = signal.SIGTERM  # what the handler does, after this rank sent its 0

    monkeypatch.setattr(dist, "all_reduce", all_reduce_interrupted)
    assert not signals.stop_requested()  # this step: every rank saw 0, so every rank goes on
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, op=None: None)  # next step: this rank sends 15
    assert signals.stop_requested() and signals.received == signal.SIGTERM


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_sigterm_to_one_rank_stops_both_at_one_step_and_the_run_resumes_on_one_rank(tmp_path, tiny_recipe, stage):
    import psutil

    # 8 sequences a step: micro batch 4 on each of 2 ranks, or 2 accumulated micro batches on one
    recipe = tiny_recipe(tmp_path, {**LONG, "model.dropout": 0.0, "train.grad_accum": None,
                                    "train.tokens_per_step": 8 * 16, "train.checkpoint_interval": 100000}, name="faults")
    run = tmp_path / "run"
    proc, log = start(recipe, run, "--nproc", "2", "--set", f"deepspeed.zero_stage={stage}")
    wait_until(lambda: last_step(run) >= 2, proc, log)

    def rank_of(p):
        try:
            return p.environ().get("RANK") if "toolkit" in " ".join(p.cmdline()) else None
        except psutil.Error:  # a helper process that just ended
            return None

    ranks = {rank_of(p): p for p in psutil.Process(proc.pid).children(recursive=True)}
    assert {"0", "1"} <= ranks.keys()
    rank1 = ranks["1"]
    rank1.send_signal(signal.SIGTERM)  # only rank 1: the all-reduced stop flag stops rank 0 too
    assert proc.wait(timeout=180) != 0
    out = log.read_text()
    assert "rank 1: SIGTERM: finishing this step" in out and "rank 0: SIGTERM" not in out
    stopped_at = last_step(run)
    found = checkpoint.latest(run / "checkpoints")  # complete: both ranks wrote their partitions
    assert found.name == checkpoint.tag_for(stopped_at)
    assert (checkpoint.read_state(found)["world_size"], checkpoint.read_state(found)["zero_stage"]) == (2, stage)

    until = [f"train.max_steps={stopped_at + 3}", f"deepspeed.zero_stage={stage}"]
    resumed = train(load_recipe(run, until), run_dir=run, resume=True, progress=False)  # 1 rank: universal
    reference = train(load_recipe(recipe, until), run_dir=tmp_path / "ref", progress=False)
    assert resumed["status"] == reference["status"] == "finished" and resumed["world_size"] == 1
    assert "(it was saved by 2: new optimizer partitions, data position kept)" in (run / "resume.log").read_text()
    got, ref = rows(run, "train"), rows(tmp_path / "ref", "train")
    assert [r["step"] for r in got] == [r["step"] for r in ref] == list(range(1, stopped_at + 4))
    assert [r["lr"] for r in got] == [r["lr"] for r in ref]
    # two ranks sum the same 8 sequences in another order: equal up to rounding, before and after the resume
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in ref], rel=1e-5)
    assert [r["grad_norm"] for r in got] == pytest.approx([r["grad_norm"] for r in ref], rel=1e-4)
    from safetensors.torch import load_file

    a, b = load_file(run / "model.safetensors"), load_file(tmp_path / "ref" / "model.safetensors")
    for name in a:
        # atol: a key bias has ~zero gradient, so Adam turns rounding noise into ~1e-6 steps there
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_a_nan_loss_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, tiny_recipe, capsys):
    (tmp_path / "blowup.py").write_text(BLOWUP)
    recipe = tiny_recipe(tmp_path, {**LONG, "train.max_steps": 10, "train.checkpoint_interval": 2,
                                    "plugins": [str(tmp_path / "blowup.py")],
                                    "model.norm": {"kind": "blowup", "after": 5}}, name="faults")
    run = tmp_path / "run"
    assert main(["train", str(recipe), "--run-dir", str(run), "--trust-plugins"]) == 1  # the test's own plugin
    err = capsys.readouterr().err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["steps"] == 5
    assert summary["error"].startswith("loss is nan at step 6; stopped without saving, the last good checkpoint is ")
    assert summary["error"].endswith("step-0000004") and summary["checkpoint"].endswith("step-0000004")
    assert f"error: training failed at step 5: loss is nan at step 6" in err and "Traceback" not in err
    assert [p.name for p in checkpoint.list_checkpoints(run / "checkpoints")] == ["step-0000002", "step-0000004"]
    assert [r["step"] for r in rows(run, "train")] == [1, 2, 3, 4, 5]
    assert not (run / "model.safetensors").exists()


def test_a_run_folder_that_cannot_be_created_is_one_line_before_training(long_recipe, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert main(["train", str(long_recipe), "--run-dir", str(tmp_path / "file" / "run")]) == 2
    (line,) = error_lines(capsys)
    assert line.startswith(f"error: {tmp_path / 'file' / 'run'}: cannot write to the run folder (")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_run_folder_is_one_line_before_training(long_recipe, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    run.chmod(0o555)
    try:
        assert main(["train", str(long_recipe), "--run-dir", str(run)]) == 2
    finally:
        run.chmod(0o755)
    assert "cannot write to the run folder (Permission denied)" in capsys.readouterr().err


def test_too_little_disk_for_the_checkpoints_is_refused_before_training(long_recipe, tmp_path, capsys, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    run = tmp_path / "run"
    assert main(["train", str(long_recipe), "--run-dir", str(run)]) == 2
    (line,) = error_lines(capsys)
    assert line.startswith(f"error: {run}: 1,000 B free, but this run needs about ")
    assert [p.name for p in run.iterdir()] == [".writer.lock"]  # nothing written but the writer's lock


class DiskFillsAtSecondCheckpoint(Trainer):
    def save_checkpoint(self):
        if self.saved_step is None:
            return super().save_checkpoint()

        def disk_full(obj, f, *args, **kwargs):
            with open(f, "wb") as out:
                out.write(b"\0" * 64)
            raise OSError(errno.ENOSPC, "No space left on device", str(f))

        real, torch.save = torch.save, disk_full
        try:
            return super().save_checkpoint()
        finally:
            torch.save = real


def test_a_disk_that_fills_during_training_keeps_the_previous_checkpoint(long_recipe, tmp_path):
    run = tmp_path / "run"
    summary = DiskFillsAtSecondCheckpoint(load_recipe(long_recipe, ["train.max_steps=10"]), run_dir=run,
                                          progress=False).run()
    assert summary["status"] == "failed" and summary["steps"] == 6
    assert summary["error"] == ("saving checkpoint step-0000006 failed (no space left on the device: "
                                f"{run / 'checkpoints' / '.partial-step-0000006' / 'mp_rank_00_model_states.pt'}); "
                                "the newest complete checkpoint is step-0000003")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-0000003"]
    assert (run / "checkpoints" / "latest").read_text() == "step-0000003"
    resumed = train(load_recipe(run, ["train.max_steps=7"]), run_dir=run, resume=True, progress=False)
    assert resumed["status"] == "finished" and [r["step"] for r in rows(run, "train")] == list(range(1, 8))


def _family(proc) -> list:
    import psutil

    try:
        return psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        return []


@pytest.mark.slow
def test_kill_9_of_the_parent_under_nproc_2_leaves_no_rank_running(long_recipe, tmp_path):
    import psutil

    run = tmp_path / "run"
    proc, log = start(long_recipe, run, "--nproc", "2")
    wait_until(lambda: last_step(run) >= 2, proc, log)
    family = _family(proc)
    ranks = [p for p in family if "toolkit train" in " ".join(p.cmdline()) and "launch" not in " ".join(p.cmdline())]
    assert len(ranks) == 2 and any("toolkit.launch" in " ".join(p.cmdline()) for p in family)
    proc.kill()  # kill -9 of playattention itself: nothing of it runs to pass anything on
    proc.wait()
    gone, alive = psutil.wait_procs(family, timeout=60)
    assert alive == [], f"still running after the parent's kill -9: {[p.cmdline() for p in alive]}"
    out = log.read_text()
    assert "Traceback" not in out and "SignalException" not in out
    # the ranks got SIGTERM from torchrun (which got it when its parent died): they saved first
    assert "interrupted: SIGTERM at step " in out, out[-3000:]


@pytest.mark.slow
def test_sigterm_under_nproc_2_is_the_toolkits_own_lines_without_torchruns_traceback(long_recipe, tmp_path):
    run = tmp_path / "run"
    proc, log = start(long_recipe, run, "--nproc", "2")
    wait_until(lambda: last_step(run) >= 2, proc, log)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=180) == 143
    out = log.read_text()
    assert "Traceback" not in out and "SignalException" not in out and "death signal" not in out, out[-3000:]
    assert "rank 0: SIGTERM: finishing this step" in out and "interrupted: SIGTERM at step " in out


@pytest.mark.slow
def test_kill_9_of_one_rank_is_one_line_naming_it_and_how_to_resume(tmp_path, tiny_recipe):
    import psutil

    recipe = tiny_recipe(tmp_path, {**LONG, "train.checkpoint_interval": 100000}, name="faults")
    run = tmp_path / "run"
    proc, log = start(recipe, run, "--nproc", "2")
    wait_until(lambda: last_step(run) >= 2, proc, log)
    ranks = {p.environ().get("RANK"): p for p in psutil.Process(proc.pid).children(recursive=True)
             if "toolkit" in " ".join(p.cmdline()) and p.environ().get("RANK")}
    ranks["1"].send_signal(signal.SIGKILL)
    assert proc.wait(timeout=180) != 0
    out = log.read_text()
    assert "Traceback" not in out, out[-3000:]
    said = [ln for ln in out.splitlines() if ln.startswith("error: rank 1 ")]
    assert said == [f"error: rank 1 (pid {ranks['1'].pid}) was killed by SIGKILL; the other ranks were stopped. "
                    f"Resume it from its newest checkpoint: playattention train --resume {run} --nproc N"], out[-3000:]
