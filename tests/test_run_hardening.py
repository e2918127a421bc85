"""Runs that always finish or resume, and files not trusted by their size (issue 15).

A run killed in its final moments resumes to write its export; a full disk is one line and leaves
a resumable run; a resume applies the schedule it is given; every kind of run-folder file, damaged,
ends in one line and a resumable or cleanly refused run; and no checkpoint file whose sha256
differs from its manifest's is ever unpickled.
"""
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from test_resume import rows
from toolkit import checkpoint
from toolkit.cli import main
from toolkit.engine import lr_at
from toolkit.recipe import load_recipe
from toolkit.trainer import Trainer, train

#: changes to tests/recipes/bases/tiny.toml: 6 steps, checkpoints at 3 and 6
SHORT = {"name": "short", "model.block_size": 16, "train.grad_accum": 1, "train.max_steps": 6, "train.lr": 3e-3,
         "train.eval_interval": 3, "train.eval_batches": 1, "train.checkpoint_interval": 3,
         "train.keep_checkpoints": 2, "train.log_interval": 1, "generate.prompts": ["ROMEO:"],
         "generate.max_new_tokens": 4}
STATES = "mp_rank_00_model_states.pt"


@pytest.fixture(scope="module")
def short_recipe(tmp_path_factory, tiny_recipe):
    return tiny_recipe(tmp_path_factory.mktemp("hardening"), SHORT, name="short")


@pytest.fixture(scope="module")
def finished(short_recipe, tmp_path_factory):
    """A finished 6-step run with checkpoints at steps 3 and 6 (copy it before damaging it)."""
    run = tmp_path_factory.mktemp("finished") / "run"
    assert train(load_recipe(short_recipe), run_dir=run, progress=False)["status"] == "finished"
    return run


def copy_run(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


def errors(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [ln for ln in err.replace("\r", "\n").splitlines() if ln.startswith("error:")]


def child_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT",
                                                            "MASTER_ADDR")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(torch.get_num_threads()))
    return env


# -- killed in the final window ------------------------------------------------------------------------
KILLED_BEFORE_EXPORT = """
import os, signal, sys
from toolkit import cli
from toolkit.trainer import Trainer

def killed(self):  # kill -9 after the final checkpoint, before model.safetensors and summary.json
    os.kill(os.getpid(), signal.SIGKILL)

Trainer.export = killed
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_run_killed_after_its_last_checkpoint_resumes_to_write_its_export_and_summary(short_recipe, tmp_path,
                                                                                       capsys):
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", KILLED_BEFORE_EXPORT, "train", str(short_recipe), "--run-dir",
                           str(run)], env=child_env(), capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert checkpoint.latest(run / "checkpoints").name == "step-0000006"
    assert not (run / "model.safetensors").exists() and not (run / "summary.json").exists()
    samples = run / "samples.txt"  # the final sample comes after the export: not drawn before the kill
    samples_before = samples.read_text() if samples.exists() else None

    assert main(["generate", str(run)]) == 2
    assert errors(capsys) == [f"error: {run}: not a finished run folder (missing model.safetensors; it has a "
                              f"checkpoint: use it as {run}@latest, or finish the run with playattention train "
                              f"--resume {run})"]
    assert main(["train", "--resume", str(run)]) == 0
    capsys.readouterr()
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["status"], summary["steps"]) == ("finished", 6) and (run / "model.safetensors").is_file()
    assert (samples.read_text() if samples.exists() else None) == samples_before  # never twice
    assert [r["step"] for r in rows(run, "train")] == [1, 2, 3, 4, 5, 6]
    assert "writing the export and summary it was stopped before" in (run / "resume.log").read_text()
    assert main(["generate", str(run), "--max-new-tokens", "3"]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 2  # now it is finished: nothing left to do
    assert "is at step 6 already, max_steps is 6" in errors(capsys)[0]


# -- a full disk ------------------------------------------------------------------------------------------
def test_torch_saves_runtime_error_on_a_full_disk_is_one_line_and_leaves_no_partial(short_recipe, tmp_path,
                                                                                   capsys, monkeypatch):
    real, calls = torch.save, []

    def full_after_first(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) == 1:
            return real(obj, f, *args, **kwargs)
        with open(f, "wb") as out:
            out.write(b"\0" * 64)
        raise RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    monkeypatch.setattr(torch, "save", full_after_first)
    run = tmp_path / "run"
    assert main(["train", str(short_recipe), "--run-dir", str(run)]) == 1
    (line,) = errors(capsys)
    assert line == ("error: training failed at step 6: saving checkpoint step-0000006 failed (RuntimeError: "
                    "[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file data/0: file "
                    f"write failed); the newest complete checkpoint is step-0000003 (run folder {run})")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-0000003"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["checkpoint"].endswith("step-0000003")
    monkeypatch.undo()
    assert main(["train", "--resume", str(run)]) == 0


class FillsTheDisk(Trainer):
    """Fills the file system of its run folder right after its first checkpoint, to ``leave`` bytes free."""

    leave = 200 * 1024  # room for the metrics, plots and summary; not for another checkpoint (~330 KiB)

    def save_checkpoint(self):
        path = super().save_checkpoint()
        if not (self.run_dir / "filler").exists():
            free = shutil.disk_usage(self.run_dir).free
            with open(self.run_dir / "filler", "wb") as f:
                f.write(b"\0" * max(0, free - self.leave))
        return path


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs (as root; skipped otherwise)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.slow
def test_a_disk_that_really_fills_mid_run_is_one_line_a_readable_summary_and_a_resumable_run(short_recipe,
                                                                                           small_disk, capsys):
    run = small_disk / "run"
    summary = FillsTheDisk(load_recipe(short_recipe), run_dir=run, progress=False).run()
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    assert summary["status"] == "failed" and "no space left on the device" in summary["error"]
    assert summary["error"].count("\n") == 0 and "step-0000003" in summary["error"]
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".partial-")]
    assert checkpoint.latest(run / "checkpoints").name == "step-0000003"
    on_disk = json.loads((run / "summary.json").read_text())  # whole, or the previous one: never torn
    assert on_disk["status"] == "failed"
    (run / "filler").unlink()
    resumed = train(load_recipe(run), run_dir=run, resume=True, progress=False)
    assert resumed["status"] == "finished" and resumed["steps"] == 6


# -- a resume applies the schedule it is given -------------------------------------------------------------
class RecordsLr(Trainer):
    """Records the learning rate and weight decay each optimizer step actually uses."""

    def train_step(self):
        opt = getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)
        self.used = [*getattr(self, "used", []), (self.step, opt.param_groups[0]["lr"],
                                                  opt.param_groups[0]["weight_decay"])]
        return super().train_step()


@pytest.mark.parametrize("stage", [0, 1])
def test_a_resume_with_new_schedule_values_trains_with_them(finished, tmp_path, stage):
    run = tmp_path / "run"
    sets = [f"deepspeed.zero_stage={stage}"]
    assert train(load_recipe(finished, ["train.max_steps=3", *sets]), run_dir=run,
                 progress=False)["status"] == "finished"
    new = [*sets, "train.max_steps=7", "train.lr=1e-2", "train.min_lr=1e-3", "train.warmup_steps=4",
           "train.weight_decay=0.25"]
    trainer = RecordsLr(load_recipe(run, new), run_dir=run, resume=True, progress=False)
    assert trainer.run()["status"] == "finished"
    new_train = load_recipe(run, new).train
    assert [(s, lr) for s, lr, _ in trainer.used] == [(s, lr_at(s, new_train)) for s in range(3, 7)]
    assert {wd for _, _, wd in trainer.used} == {0.25}  # the decayed group's
    assert [r["lr"] for r in rows(run, "train") if r["step"] > 3] == [lr_at(s, new_train) for s in range(3, 7)]
    log = (run / "resume.log").read_text()
    assert "changed train.lr: 0.003 -> 0.01" in log and "changed train.weight_decay: 0.1 -> 0.25" in log


# -- damaged run-folder files ----------------------------------------------------------------------------
def resume(run, capsys, more=2) -> tuple[int, list[str]]:
    code = main(["train", "--resume", str(run), "--extend", str(more)])
    return code, errors(capsys)


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.slow
def test_a_flipped_bit_in_a_checkpoint_is_refused_in_one_line(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    flip_a_byte(run / "checkpoints" / "step-0000006" / STATES)
    code, lines = resume(run, capsys)
    assert code == 2 and lines == [
        f"error: {run / 'checkpoints' / 'step-0000006'}: refused: {STATES} does not match the sha256 recorded when "
        f"it was saved (changed or damaged since); nothing of it was loaded"]


@pytest.mark.slow
def test_another_steps_file_copied_over_is_refused_or_skipped(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    ckpts = run / "checkpoints"
    shutil.copy(ckpts / "step-0000003" / STATES, ckpts / "step-0000006" / STATES)
    same_size = (ckpts / "step-0000003" / STATES).stat().st_size == json.loads(
        (ckpts / "step-0000006" / "toolkit_state.json").read_text())["files"][STATES]["size"]
    code, lines = resume(run, capsys)
    if same_size:  # the size check cannot tell: the hash does
        assert code == 2 and len(lines) == 1 and f"refused: {STATES} does not match the sha256" in lines[0]
    else:  # incomplete by its size: skipped, and the resume says so
        assert code == 0 and "skipped step-0000006" in (run / "resume.log").read_text()


EVIL = '''
import builtins
import pickle


class Evil:
    def __reduce__(self):
        return (builtins.open, ({marker!r}, "w"))
'''


def write_evil_pickle(path: Path, marker: Path) -> None:
    """A pickle that creates ``marker`` when loaded, padded to ``path``'s size (the manifest's)."""
    namespace: dict = {}
    exec(textwrap.dedent(EVIL.format(marker=str(marker))), namespace)
    payload = pickle.dumps(namespace["Evil"](), protocol=2)
    size = path.stat().st_size
    assert len(payload) < size
    path.write_bytes(payload + b"\0" * (size - len(payload)))


@pytest.mark.slow
def test_a_malicious_pickle_padded_to_the_recorded_size_is_never_loaded(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    states, marker = run / "checkpoints" / "step-0000006" / STATES, tmp_path / "pwned"
    write_evil_pickle(states, marker)
    assert checkpoint.problem(states.parent) is None  # sizes alone say it is complete
    code, lines = resume(run, capsys)
    assert code == 2 and len(lines) == 1 and f"refused: {STATES} does not match the sha256" in lines[0]
    assert not marker.exists()
    with pytest.raises(RuntimeError, match="magic number"):  # the payload is real: loading it creates the marker
        torch.load(states, weights_only=False)
    assert marker.exists()


def test_a_malicious_pickle_never_reaches_the_universal_conversion(tmp_path, monkeypatch):
    """A ZeRO 1 checkpoint of 2 ranks resumed on 1 converts with ds_to_universal, which unpickles: checked first."""
    from test_checkpoint import tiny_recipe as tiny_ckpt_recipe
    from toolkit.engine import build_engine
    from toolkit.model import Transformer

    recipe = tiny_ckpt_recipe(stage=1)
    engine = build_engine(Transformer(recipe.model), recipe).engine
    checkpoint.save(engine, tmp_path, 1, {"tokens": 16})
    folder = tmp_path / "step-0000001"
    state = json.loads((folder / "toolkit_state.json").read_text())
    (folder / "toolkit_state.json").write_text(json.dumps({**state, "world_size": 2}))  # as if saved by 2 ranks
    target = next(p for p in sorted(folder.iterdir()) if p.suffix == ".pt")
    marker = tmp_path / "pwned"
    write_evil_pickle(target, marker)
    converted = []
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: converted.append(a))
    with pytest.raises(checkpoint.CheckpointError, match=f"refused: {target.name} does not match the sha256"):
        checkpoint.load(engine, tmp_path)
    assert converted == [] and not marker.exists()


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["not-utf8", "wrong-types", "a-folder", "not-json"])
def test_a_damaged_toolkit_state_skips_that_checkpoint_and_says_so(finished, tmp_path, capsys, damage):
    run = copy_run(finished, tmp_path)
    state = run / "checkpoints" / "step-0000006" / "toolkit_state.json"
    if damage == "not-utf8":
        state.write_bytes(b"\xff\xfe" + state.read_bytes()[2:])
    elif damage == "wrong-types":
        state.write_text(json.dumps({**json.loads(state.read_text()), "step": "six"}))
    elif damage == "a-folder":
        state.unlink()
        state.mkdir()
    else:
        state.write_text("{\"step\": 6,")
    code, lines = resume(run, capsys)
    assert code == 0 and lines == []
    log = (run / "resume.log").read_text()
    assert "resumed at step 3 from" in log and "skipped step-0000006: " in log
    assert [r["step"] for r in rows(run, "train")] == list(range(1, 9))


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["garbage", "a-folder"])
def test_a_damaged_latest_file_does_not_stop_a_resume(finished, tmp_path, capsys, damage):
    run = copy_run(finished, tmp_path)
    latest = run / "checkpoints" / "latest"
    latest.unlink()
    if damage == "garbage":
        latest.write_bytes(b"\xff\x00step-9999999/../..")
    else:
        latest.mkdir()
    code, lines = resume(run, capsys)
    assert code == 0 and lines == []
    assert latest.read_text() == "step-0000008"


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["not-utf8", "not-an-object", "step-not-int"])
def test_a_damaged_metrics_file_keeps_its_valid_prefix_and_says_so(finished, tmp_path, capsys, damage):
    run = copy_run(finished, tmp_path)
    metrics = run / "metrics.jsonl"
    lines = metrics.read_bytes().split(b"\n")
    bad = {"not-utf8": b"\xff\xfe\xfd", "not-an-object": b"[1, 2]", "step-not-int": b'{"type": "train", "step": "x"}'}
    at = 3  # eval 0, train 1, train 2, then the damage
    metrics.write_bytes(b"\n".join([*lines[:at], bad[damage], *lines[at:]]))
    code, errs = resume(run, capsys)
    assert code == 0 and errs == []
    assert f"metrics.jsonl is damaged at line {at + 1}: kept the {at} valid line(s) before it" in \
        (run / "resume.log").read_text()
    assert [r["step"] for r in rows(run, "train")][:2] == [1, 2] and rows(run, "train")[-1]["step"] == 8


@pytest.mark.slow
def test_a_folder_in_place_of_the_metrics_file_is_one_line(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").mkdir()
    code, lines = resume(run, capsys)
    assert code == 2 and lines == [f"error: {run / 'metrics.jsonl'}: is a folder, not a regular file; a run folder's "
                                   f"metrics.jsonl must be a regular file: move it away to go on"]


@pytest.mark.parametrize("damage", ["weights-truncated", "weights-not-safetensors", "tokenizer-truncated",
                                    "recipe-garbage"])
def test_a_damaged_finished_run_is_one_line_on_generate(finished, tmp_path, capsys, damage):
    run = copy_run(finished, tmp_path)
    weights, tokenizer = run / "model.safetensors", run / "tokenizer.json"
    if damage == "weights-truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "weights-not-safetensors":
        weights.write_bytes(b"PK\x03\x04 a zip, not safetensors" * 10)
    elif damage == "tokenizer-truncated":
        tokenizer.write_bytes(tokenizer.read_bytes()[:20])
    else:
        (run / "recipe.toml").write_bytes(b"\xff[model\n")
    assert main(["generate", str(run), "--max-new-tokens", "2"]) == 2
    (line,) = errors(capsys)
    damaged = {"weights-truncated": weights, "weights-not-safetensors": weights, "tokenizer-truncated": tokenizer,
               "recipe-garbage": run / "recipe.toml"}[damage]
    assert line.startswith(f"error: {damaged}")


def test_model_toml_says_it_is_not_what_loads_the_run(finished):
    text = (finished / "model.toml").read_text()
    assert text.startswith("# The model of this run, for reading. Nothing loads this file: recipe.toml is")
    import tomllib

    assert tomllib.loads(text)["model"]["n_layer"] == 2


def test_a_garbled_file_of_a_checkpoint_without_hashes_is_one_line(tmp_path):
    """A checkpoint saved before the manifest had hashes (format 1) is checked by size only: DeepSpeed's
    own failure to read a garbled file is then one line too."""
    from test_checkpoint import tiny_recipe as tiny_ckpt_recipe
    from toolkit.engine import build_engine
    from toolkit.model import Transformer

    recipe = tiny_ckpt_recipe()
    engine = build_engine(Transformer(recipe.model), recipe).engine
    checkpoint.save(engine, tmp_path, 1, {"tokens": 16})
    folder = tmp_path / "step-0000001"
    state = json.loads((folder / "toolkit_state.json").read_text())
    sizes = {name: entry["size"] for name, entry in state["files"].items()}
    (folder / "toolkit_state.json").write_text(json.dumps({**state, "format": 1, "files": sizes}))
    (folder / STATES).write_bytes(b"\x80\x02garbage" + b"\0" * (sizes[STATES] - 9))
    with pytest.raises(checkpoint.CheckpointError, match=r"step-0000001: DeepSpeed could not load it \("):
        checkpoint.load(engine, tmp_path)
