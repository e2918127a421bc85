"""`playattention runs`: a table of run folders, read as data (no plugin code, no waiting on odd files)."""
import json
import os

from toolkit.cli import main


def run_folder(root, name, max_steps=10, summary=None, checkpoint_step=None, extra=""):
    run = root / name
    run.mkdir(parents=True)
    (run / "recipe.toml").write_text(f'name = "{name}-recipe"\n{extra}\n[train]\nmax_steps = {max_steps}\n')
    if summary is not None:
        (run / "summary.json").write_text(json.dumps(summary))
    if checkpoint_step is not None:
        ckpt = run / "checkpoints" / f"step-{checkpoint_step:07d}"
        ckpt.mkdir(parents=True)
        (ckpt / "toolkit_state.json").write_text(json.dumps(
            {"step": checkpoint_step, "world_size": 1, "zero_stage": 0, "files": {}, "best_val_loss": 2.25}))
    return run


def table(capsys) -> dict[str, list[str]]:
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["run", "recipe", "steps", "best", "val", "state", "age"]
    return {ln.split()[0]: ln.split() for ln in lines[1:]}


def test_runs_lists_finished_resumable_and_broken_folders_with_steps_and_best_loss(tmp_path, capsys):
    run_folder(tmp_path, "done", summary={"status": "finished", "steps": 10, "best_val_loss": 1.5})
    run_folder(tmp_path, "stopped", max_steps=2000, checkpoint_step=300,
               summary={"status": "interrupted", "steps": 310})
    run_folder(tmp_path, "crashed", summary={"status": "failed", "steps": 3})
    (tmp_path / "notes").mkdir()  # no recipe.toml: not a run folder
    (tmp_path / "readme.txt").write_text("hi")
    assert main(["runs", str(tmp_path)]) == 0
    rows = table(capsys)
    assert set(rows) == {"done", "stopped", "crashed"}
    assert rows["done"][1:5] == ["done-recipe", "10/10", "1.5000", "finished"]
    assert rows["stopped"][1:5] == ["stopped-recipe", "300/2000", "2.2500", "resumable"]
    assert rows["crashed"][1:5] == ["crashed-recipe", "?/10", "-", "broken"]
    assert "no complete checkpoint" in " ".join(rows["crashed"])


def test_runs_never_opens_a_fifo_and_never_runs_a_runs_plugins(tmp_path, capsys, monkeypatch):
    marker = tmp_path / "ran"
    (tmp_path / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    run_folder(tmp_path / "runs", "plugged", extra=f'plugins = ["{tmp_path / "evil.py"}"]',
               summary={"status": "finished", "steps": 10})
    os.mkfifo(run_folder(tmp_path / "runs", "fifo-summary") / "summary.json")
    odd = run_folder(tmp_path / "runs", "fifo-state", checkpoint_step=5)
    state = odd / "checkpoints" / "step-0000005" / "toolkit_state.json"
    state.unlink()
    os.mkfifo(state)
    (run_folder(tmp_path / "runs", "garbled") / "recipe.toml").write_bytes(b"\xff\xfe[[[")
    monkeypatch.chdir(tmp_path)  # the default folder: train.out_dir's default, runs/
    assert main(["runs"]) == 0
    rows = table(capsys)
    assert rows["plugged"][4] == "finished" and not marker.exists()
    assert rows["fifo-summary"][4] == "broken" and "summary.json: is a FIFO, not a regular file" in " ".join(rows["fifo-summary"])
    assert rows["fifo-state"][4] == "broken" and rows["garbled"][4] == "broken"


def test_runs_of_a_missing_folder_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["runs", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'nope'}: no such folder of runs\n"
