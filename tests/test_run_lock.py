"""One run folder, one writer (issue 19.4): an OS lock that a second writer is refused by, naming the holder.

The lock is an flock on ``<run>/.writer.lock``: the kernel drops it when its process dies, so a
kill -9 never leaves a folder locked. Readers (generate, eval) take no lock.
"""
import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from toolkit import runfolder
from toolkit.cli import main
from toolkit.errors import CheckpointError
from toolkit.recipe import load_recipe
from toolkit.trainer import train

#: another process's lock, as lock_folder takes it (an flock, then its pid), without importing torch
HOLD = f"""
import fcntl, os, sys, time
os.makedirs(sys.argv[1], exist_ok=True)
f = open(os.path.join(sys.argv[1], {runfolder.LOCK_FILE!r}), "a+")
fcntl.flock(f, fcntl.LOCK_EX)
f.truncate(0)
f.write(f"{{os.getpid()}}\\n")
f.flush()
print("locked", flush=True)
time.sleep(600)
"""


@contextlib.contextmanager
def held(folder: Path):
    """Another process holding ``folder``'s lock (as a training there would); yields it."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "locked\n"
        yield proc
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def contents(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def busy(folder: Path, pid: int, what: str = "run folder") -> str:
    return (f"error: {folder}: another playattention process (pid {pid}) is writing this {what}; wait for it to "
            f"finish or stop it\n")


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, tiny_recipe):
    return tiny_recipe(tmp_path_factory.mktemp("lock"), {"train.max_steps": 2, "train.warmup_steps": 0, "train.eval_interval": 2,
                                                          "train.eval_batches": 1, "train.checkpoint_interval": 1,
                                                          "generate.max_new_tokens": 2}, name="lock")


@pytest.fixture(scope="module")
def finished(recipe, tmp_path_factory):
    run = tmp_path_factory.mktemp("finished") / "run"
    assert train(load_recipe(recipe), run_dir=run, progress=False)["status"] == "finished"
    return run


def test_a_training_into_a_locked_run_folder_is_refused_touching_nothing(recipe, tmp_path, capsys):
    run = tmp_path / "run"
    with held(run) as holder:
        before = contents(run)
        assert main(["train", str(recipe), "--run-dir", str(run)]) == 2
        assert capsys.readouterr().err == busy(run, holder.pid)
        assert contents(run) == before


def test_a_resume_of_a_run_another_process_writes_is_refused_touching_nothing(recipe, finished, tmp_path, capsys):
    with held(finished) as holder:
        before = contents(finished)
        assert main(["train", "--resume", str(finished), "--extend", "1"]) == 2
        # what --extend would do is said first; then the refusal, and nothing is touched
        assert capsys.readouterr().err.splitlines(keepends=True)[-1] == busy(finished, holder.pid)
        assert contents(finished) == before  # metrics.jsonl, resume.log, checkpoints: untouched


def test_a_second_launcher_is_refused_before_it_starts_any_rank(finished, monkeypatch, capsys):
    started = []
    with held(finished) as holder:
        monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: started.append(a))
        assert main(["train", "--resume", str(finished), "--nproc", "2", "--extend", "1"]) == 2
        monkeypatch.undo()
    assert started == [] and capsys.readouterr().err.splitlines(keepends=True)[-1] == busy(finished, holder.pid)


def test_the_ranks_of_a_launch_recognise_their_launchers_lock(tmp_path, monkeypatch):
    with held(tmp_path) as holder:
        monkeypatch.setenv(runfolder.LOCK_HOLDER_ENV, str(holder.pid))
        assert runfolder.locked_by_launcher(tmp_path)
        monkeypatch.setenv(runfolder.LOCK_HOLDER_ENV, str(os.getpid()))  # held, but not by our launcher
        assert not runfolder.locked_by_launcher(tmp_path)
    monkeypatch.setenv(runfolder.LOCK_HOLDER_ENV, str(holder.pid))
    assert not runfolder.locked_by_launcher(tmp_path)  # the launcher died: its lock went with it


def test_two_runs_of_a_recipe_started_in_the_same_second_get_a_folder_each(recipe, tmp_path, monkeypatch):
    r = load_recipe(recipe, [f"train.out_dir={json.dumps(str(tmp_path))}"])
    monkeypatch.setattr(runfolder.time, "strftime", lambda fmt: "20260101-000000")
    real = runfolder.default_run_dir
    seen = real(r)
    first = runfolder.new_run_dir(r)
    looks = iter([seen])  # the second run looked before the first made it
    monkeypatch.setattr(runfolder, "default_run_dir", lambda recipe: next(looks, None) or real(recipe))
    second = runfolder.new_run_dir(r)
    assert first == seen and second == seen.with_name(seen.name + "-2") and first.is_dir() and second.is_dir()


def test_a_lock_whose_holder_was_killed_does_not_block(tmp_path):
    with held(tmp_path) as holder:
        with pytest.raises(CheckpointError, match=f"pid {holder.pid}"):
            runfolder.lock_folder(tmp_path)
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        lock = runfolder.lock_folder(tmp_path)  # the kernel released it with the process
    assert (tmp_path / runfolder.LOCK_FILE).read_text() == f"{os.getpid()}\n"
    lock.release()


def test_a_symlink_in_place_of_the_lock_file_is_refused_not_followed(tmp_path):
    target = tmp_path / "precious"
    target.write_text("keep")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / runfolder.LOCK_FILE).symlink_to(target)
    with pytest.raises(CheckpointError, match=f"{runfolder.LOCK_FILE}: a symbolic link; remove it"):
        runfolder.lock_folder(tmp_path / "run")
    assert target.read_text() == "keep"


def test_ablate_into_a_folder_another_ablate_writes_is_refused(tmp_path, tiny_recipe, capsys):
    tiny_recipe(tmp_path, {"train.max_steps": 2, "train.warmup_steps": 0}, name="base")
    path = tmp_path / "abl.toml"
    path.write_text(textwrap.dedent('''\
        recipe = "base.toml"
        name = "locked"
        steps = 2
        [[variant]]
        name = "a"
        '''))
    out = tmp_path / "out"
    with held(out) as holder:
        assert main(["ablate", str(path), "--out", str(out), "--quiet"]) == 2
        assert capsys.readouterr().err == busy(out, holder.pid, "ablation folder")
    assert [p.name for p in out.iterdir()] == [runfolder.LOCK_FILE]


def test_convert_into_a_folder_another_process_writes_is_refused(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    hf = tmp_path / "hf"
    config = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, n_positions=16, vocab_size=64, bos_token_id=0,
                                     eos_token_id=0)
    transformers.GPT2LMHeadModel(config).save_pretrained(hf)
    capsys.readouterr()
    out = tmp_path / "run"
    with held(out) as holder:
        assert main(["convert", str(hf), str(out)]) == 2
        assert capsys.readouterr().err == busy(out, holder.pid)
    assert [p.name for p in out.iterdir()] == [runfolder.LOCK_FILE]
    assert main(["convert", str(hf), str(out)]) == 0  # the holder gone, its lock went with it


@pytest.mark.slow
def test_two_trainings_started_together_into_one_folder_one_refused_each_step_logged_once(recipe, tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, "-m", "toolkit", "train", str(recipe), "--run-dir", str(run), "--set",
           "train.max_steps=4", "--set", "train.eval_interval=4"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(), p.stdout.read(), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], results
    refused = next(err for code, _, err in results if code == 2)
    winner = next(p for p, (code, _, _) in zip(procs, results) if code == 0)
    assert refused.endswith(busy(run, winner.pid)) and "Traceback" not in refused
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["type"] == "train"]
    assert steps == [1, 2, 3, 4]
