"""Every file the toolkit reads is opened safely, and nothing after the last step can lose a trained run (issue 26).

One tiny finished run is trained per module and copied per case. A FIFO, a folder, a dangling
symlink or a symlink to /dev/zero in place of a file is one line naming it, never a hang or a
traceback; the export is checked against its recorded sha256; a resume keeps the run's own recipe,
and ``--extend`` continues the learning rate where the schedule ended.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_resume import rows
# the module-scoped fixtures of the hardening tests: one finished run per module, copied before damage
from test_run_hardening import child_env, copy_run, errors, finished, short_recipe  # noqa: F401
from toolkit import checkpoint, safeio
from toolkit.cli import main
from toolkit.commands.train import extension
from toolkit.errors import UsageError
from toolkit.engine import lr_at
from toolkit.recipe import load_recipe


@pytest.fixture(scope="module")
def hf_folder(finished, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "hf"
    assert main(["convert", str(finished), str(out), "--to", "hf"]) == 0
    return out


def replace(path: Path, damage: str) -> None:
    """Put ``damage`` in place of the file at ``path``."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
    if damage == "fifo":
        os.mkfifo(path)
    elif damage == "folder":
        path.mkdir()
    elif damage == "dangling":
        path.symlink_to(path.parent / "no-such-file")
    elif damage == "devzero":
        path.symlink_to("/dev/zero")
    else:
        raise AssertionError(damage)


# -- the one way to open a file -------------------------------------------------------------------------------
@pytest.mark.parametrize("damage,said", [("fifo", "is a FIFO, not a regular file"),
                                         ("folder", "is a folder, not a regular file"),
                                         ("dangling", "a symlink to"),
                                         ("devzero", "is a character device, not a regular file")])
def test_a_file_that_is_not_regular_is_one_line_naming_it_at_once(tmp_path, damage, said):
    path = tmp_path / "config.json"
    replace(path, damage)
    with pytest.raises(safeio.UnsafeFile) as exc:
        safeio.read_json(path)  # a FIFO would block here for ever without O_NONBLOCK
    assert str(exc.value).startswith(f"{path}: ") and said in str(exc.value) and "\n" not in str(exc.value)


def test_a_symlink_out_of_its_folder_is_refused(tmp_path):
    (tmp_path / "outside.json").write_text("{}")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "summary.json").symlink_to(tmp_path / "outside.json")
    with pytest.raises(safeio.UnsafeFile, match="outside"):
        safeio.read_json(tmp_path / "run" / "summary.json", inside=tmp_path / "run")
    assert safeio.read_json(tmp_path / "run" / "summary.json") == {}  # an HF cache's symlinks are fine


@pytest.mark.parametrize("text,said", [(b"\xff\xfe{}", "not UTF-8"),
                                       (b"[" * 100_000 + b"]" * 100_000, "nested too deep"),
                                       (b'{"n": ' + b"9" * 5000 + b"}", "not valid JSON"),
                                       (b'{"n": 1,', "not valid JSON")])
def test_bad_json_content_is_one_line(tmp_path, text, said):
    path = tmp_path / "x.json"
    path.write_bytes(text)
    with pytest.raises(safeio.BadContent, match=said):
        safeio.read_json(path)


def test_a_metadata_file_over_its_bound_is_refused_before_parsing(tmp_path):
    path = tmp_path / "x.json"
    path.write_bytes(b" " * 101)
    with pytest.raises(safeio.BadContent, match="larger than 100 bytes"):
        safeio.read_json(path, limit=100)


# -- the end of a run -------------------------------------------------------------------------------------------
def test_a_failing_final_sample_leaves_a_finished_run_with_its_checkpoint_and_weights(short_recipe, tmp_path,
                                                                                      capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise OverflowError("temperature underflows to 0")

    monkeypatch.setattr("toolkit.trainer.sample", broken)
    run = tmp_path / "run"
    assert main(["train", str(short_recipe), "--run-dir", str(run), "--set", "train.max_steps=2",
                 "--set", "train.checkpoint_interval=0"]) == 1
    (line,) = errors(capsys)
    assert line.startswith("error: the final sample failed after step 2 (OverflowError: temperature underflows to 0); "
                           "the run is finished and usable")
    assert checkpoint.latest(run / "checkpoints").name == "step-0000002"
    assert (run / "model.safetensors").is_file() and (run / "export.json").is_file()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and len(summary["end_errors"]) == 1
    monkeypatch.undo()
    assert main(["generate", str(run), "--max-new-tokens", "2"]) == 0


# -- the export's hash -------------------------------------------------------------------------------------------
def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_flipped_bit_in_the_export_is_refused_by_every_command_that_reads_it(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    flip_a_byte(run / "model.safetensors")
    said = (f"error: {run / 'model.safetensors'} changed since it was written (its sha256 differs from export.json); "
            f"re-export it (remove it and run playattention train --resume {run}) or pass --no-verify")
    for argv in (["generate", str(run)], ["eval", str(run)], ["convert", str(run), str(tmp_path / "hf"), "--to", "hf"],
                 ["inspect", str(run)], ["train", "--init-from", str(run), "--run-dir", str(tmp_path / "new")]):
        assert main(argv) == 2, argv
        assert errors(capsys) == [said], argv
    assert not (tmp_path / "hf").exists() and not (tmp_path / "new").exists()
    assert main(["generate", str(run), "--max-new-tokens", "2", "--no-verify"]) == 0


def test_init_from_a_truncated_export_past_no_verify_is_one_line(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    weights = run / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert main(["train", "--init-from", str(run), "--run-dir", str(tmp_path / "new"), "--no-verify"]) == 2
    (line,) = errors(capsys)
    assert line.startswith(f"error: --init-from {weights}: cannot be loaded (")


def test_a_run_exported_before_exports_were_hashed_is_used_with_a_warning(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    (run / "export.json").unlink()
    assert main(["generate", str(run), "--max-new-tokens", "2"]) == 0
    assert f"warning: {run}: no export.json (exported before exports were hashed)" in capsys.readouterr().err


# -- resume keeps the run's own recipe -----------------------------------------------------------------------------
def test_a_recipe_toml_swapped_for_another_runs_is_refused_naming_the_keys(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    text = (run / "recipe.toml").read_text()
    (run / "recipe.toml").write_text(text.replace("micro_batch = 4", "micro_batch = 12"))
    assert main(["train", "--resume", str(run), "--extend", "2"]) == 2
    (line,) = errors(capsys)
    assert line == (f"error: {run / 'recipe.toml'} differs from the recipe step-0000006 recorded "
                    f"(train.micro_batch: 4 -> 12); restore it, or give the changes you mean as --set")


def test_a_recipe_file_that_differs_from_the_runs_is_refused_unless_given_as_set(finished, short_recipe, tmp_path,
                                                                               capsys):
    run = copy_run(finished, tmp_path)
    other = tmp_path / "other.toml"
    other.write_text(short_recipe.read_text() + '\n[train.trackers]\ncsv = true\n')
    assert main(["train", str(other), "--resume", str(run), "--extend", "1"]) == 2
    (line,) = errors(capsys)
    assert line.startswith(f"error: {other} differs from the recipe of {run} (train.trackers.csv: false -> true); "
                           "a resume keeps the run's own recipe")


@pytest.mark.parametrize("setting,said", [("train.max_steps=8", "a resumed run keeps its horizon"),
                                          ("train.lr=0.01", "pass --reshape to resume with it anyway"),
                                          ("train.micro_batch=8", "pass --reshape to resume with it anyway")])
def test_a_set_that_reshapes_the_curve_of_a_resumed_run_is_refused(finished, tmp_path, capsys, setting, said):
    run = copy_run(finished, tmp_path)
    assert main(["train", "--resume", str(run), "--set", setting]) == 2
    (line,) = errors(capsys)
    assert said in line and line.startswith(f"error: --set {setting.split('=')[0]}: ")


@pytest.mark.slow
def test_extend_continues_at_the_final_learning_rate_without_a_jump(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    assert main(["train", "--resume", str(run), "--extend", "3"]) == 0
    err = capsys.readouterr().err
    old = load_recipe(finished).train
    final = lr_at(6, load_recipe(finished, ["train.decay_steps=6", "train.max_steps=9"]).train)
    assert f"extending {run} by 3 steps, to 9: the learning rate stays at {final:.3g}" in err
    lrs = {r["step"]: r["lr"] for r in rows(run, "train")}
    assert [lrs[s] for s in (7, 8, 9)] == [final] * 3 and final == old.min_lr
    assert abs(lrs[7] - lrs[6]) <= abs(lrs[6] - lrs[5])  # no jump: the cosine's own last step is larger
    assert lrs[6] == pytest.approx(lr_at(5, old))  # the steps before are untouched
    assert main(["train", "--resume", str(run), "--extend", "1"]) == 0  # an extended run extends again


def test_decay_after_a_schedule_that_already_decayed_is_refused(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    assert main(["train", "--resume", str(run), "--extend", "4", "--decay", "0.5"]) == 2
    (line,) = errors(capsys)
    assert "already decayed from its peak" in line


@pytest.mark.slow
def test_extend_with_decay_holds_the_peak_rate_then_cools_down(short_recipe, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(short_recipe), "--run-dir", str(run), "--set", "train.schedule=constant",
                 "--set", "train.max_steps=3", "--set", "train.warmup_steps=1"]) == 0
    assert main(["train", "--resume", str(run), "--extend", "4", "--decay", "0.5"]) == 0
    peak = load_recipe(run).train.lr
    assert (f"the learning rate stays at {peak:.3g} for 2 steps, then decays to 0.0001 over the last 2 (wsd, 1-sqrt)"
            in capsys.readouterr().err)
    lrs = [r["lr"] for r in rows(run, "train")]
    assert lrs[1:5] == [peak] * 4 and peak > lrs[5] > lrs[6] == pytest.approx(1e-4)  # the last step at min_lr


def test_extend_on_several_local_ranks_reaches_every_rank(finished, tmp_path, monkeypatch):
    launched = []

    class FakePopen:
        def __init__(self, cmd, **kwargs):
            launched.append(cmd)

        def wait(self):
            return 0

    monkeypatch.setattr(subprocess, "Popen", FakePopen)
    run = copy_run(finished, tmp_path)
    assert main(["train", "--resume", str(run), "--extend", "2", "--nproc", "2"]) == 0
    ((cmd),) = launched
    assert cmd[cmd.index("toolkit"):] == ["toolkit", "train", "--run-dir", str(run), "--resume", str(run),
                                          "--extend", "2"]


# -- damage found on resume ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_damaged_summary_and_samples_are_announced_on_resume(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    (run / "summary.json").write_bytes(b"{\"status\": \xff")
    samples = (run / "samples.txt").read_bytes()
    (run / "samples.txt").write_bytes(samples + b"=== step 6 | sample 9/9 | x ===\n\xff\xfe broken\n")
    assert main(["train", "--resume", str(run), "--extend", "1"]) == 0
    err = capsys.readouterr().err
    assert "summary.json is damaged (not UTF-8 text" in err and "lost the previous session's summary" in err
    assert "samples.txt is damaged at byte" in err and "kept the" in err
    assert (run / "samples.txt").read_bytes().startswith(samples)
    assert json.loads((run / "summary.json").read_text())["steps"] == 7


# -- classes of damage in a run folder ---------------------------------------------------------------------------------
RUN_FILES = ["ds_config.json", "metrics.jsonl", "samples.txt", "summary.json", "versions.json", "losses.png",
             "model.toml", "recipe.toml"]


@pytest.mark.parametrize("damage", ["folder", "dangling", "devzero"])
@pytest.mark.parametrize("name", RUN_FILES)
def test_a_run_file_that_is_not_regular_is_one_line_on_resume(finished, tmp_path, capsys, name, damage):
    run = copy_run(finished, tmp_path)
    replace(run / name, damage)
    assert main(["train", "--resume", str(run), "--extend", "1"]) == 2
    (line,) = errors(capsys)
    assert f"{run / name}" in line


#: resumes each copy given on the command line in this one process (a hang fails the whole test by its timeout)
FIFO_RESUMES = """
import json, sys
from toolkit import cli
codes = [cli.main(["train", "--resume", run, "--extend", "1"]) for run in sys.argv[1:]]
print(json.dumps(codes))
"""
FIFO_FILES = ["checkpoints/step-0000006/toolkit_state.json", "ds_config.json", "metrics.jsonl", "samples.txt",
              "summary.json", "versions.json"]


@pytest.mark.slow
def test_a_fifo_in_a_run_folder_never_blocks_a_resume(finished, tmp_path):
    runs = []
    for n, name in enumerate(FIFO_FILES):
        runs.append(copy_run(finished, tmp_path / str(n)))
        replace(runs[-1] / name, "fifo")
    proc = subprocess.run([sys.executable, "-c", FIFO_RESUMES, *map(str, runs)], env=child_env(), capture_output=True,
                          text=True, timeout=300)
    assert "Traceback" not in proc.stderr and proc.returncode == 0, proc.stderr[-2000:]
    codes = json.loads(proc.stdout.strip().splitlines()[-1])
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    # the checkpoint whose state is a FIFO is skipped and the one before resumes; the others are refused by name
    assert codes == [0] + [2] * (len(FIFO_FILES) - 1)
    assert "skipped step-0000006: unreadable toolkit_state.json" in (runs[0] / "resume.log").read_text()
    assert lines == [f"error: {run / name}: is a FIFO, not a regular file; a run folder's {name} must be a regular "
                     f"file: move it away to go on" for run, name in zip(runs[1:], FIFO_FILES[1:])]


# -- a Hugging Face folder, eval files, prepared data ------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["not-utf8", "deep", "fifo-tokenizer-config"])
def test_a_damaged_hf_config_is_one_line_on_convert(hf_folder, tmp_path, capsys, damage):
    folder = tmp_path / "hf"
    shutil.copytree(hf_folder, folder)
    if damage == "not-utf8":
        (folder / "config.json").write_bytes(b"\xff\xfe{}")
    elif damage == "deep":
        (folder / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    else:
        replace(folder / "tokenizer_config.json", "fifo")
    assert main(["convert", str(folder), str(tmp_path / "run")]) == 2
    (line,) = errors(capsys)
    damaged = "tokenizer_config.json" if damage.startswith("fifo") else "config.json"
    assert line.startswith(f"error: {folder / damaged}: ")


@pytest.mark.parametrize("text,said", [(b'{"ctx": "a", "endings": ["b", "c"], "label": 0}\n\xff\xfe\n', "not UTF-8"),
                                       (b"[" * 50_000 + b"]" * 50_000 + b"\n", "nested too deep"),
                                       (b'{"ctx": "a", "endings": ["b", "c"], "label": ' + b"9" * 5000 + b"}\n",
                                        "not valid JSON"),
                                       (b'{"ctx": "a", "endings": ["b", "c"], "label": "' + b"9" * 5000 + b'"}\n',
                                        "expected \"label\"")])
def test_a_damaged_eval_file_is_one_line(finished, tmp_path, capsys, text, said):
    path = tmp_path / "hellaswag.jsonl"
    path.write_bytes(text)
    assert main(["eval", str(finished), "--task", f"hellaswag:path={json.dumps(str(path))}"]) == 2
    (line,) = errors(capsys)
    assert line.startswith(f"error: {path}:") and said in line


def test_a_fifo_as_the_perplexity_file_is_one_line(finished, tmp_path, capsys):
    path = tmp_path / "heldout.txt"
    replace(path, "fifo")
    assert main(["eval", str(finished), "--task", f"perplexity:path={json.dumps(str(path))}"]) == 2
    assert errors(capsys) == [f"error: {path}: is a FIFO, not a regular file"]


def test_prepare_of_an_empty_input_is_refused(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    out = tmp_path / "prepared"
    assert main(["prepare", "--input", str(tmp_path / "empty.txt"), "--tokenizer", "char", "--out", str(out),
                 "--quiet"]) == 2
    (line,) = errors(capsys)
    assert line == f"error: {tmp_path / 'empty.txt'}: no text in it (1 documents, 0 tokens); nothing to prepare"


# -- paths the OS refuses -------------------------------------------------------------------------------------------
LONG = "x" * 300


@pytest.mark.parametrize("key", ["extends", "plugins", "data.paths", "data.prepared_dir", "train.out_dir"])
def test_an_over_long_name_in_a_recipe_path_is_one_line(short_recipe, tmp_path, capsys, key):
    value = {"extends": json.dumps(LONG), "plugins": json.dumps([LONG + ".py"]), "data.paths": json.dumps([LONG]),
             "data.prepared_dir": json.dumps(str(tmp_path / LONG)), "train.out_dir": json.dumps(str(tmp_path / LONG))}
    path = tmp_path / "r.toml"
    if key == "extends":
        path.write_text(f"extends = {value[key]}\n")
        argv = ["train", str(path)]
    else:
        argv = ["train", str(short_recipe), "--set", f"{key}={value[key]}"]
    code = main(argv)
    lines = errors(capsys)
    assert code == 2 and len(lines) == 1 and "\n" not in lines[0]


def test_an_over_long_recipe_path_is_one_line(tmp_path, capsys):
    assert main(["train", str(tmp_path / (LONG + ".toml"))]) == 2
    assert len(errors(capsys)) == 1


@pytest.mark.parametrize("key", ["data.prepared_dir", "train.out_dir"])
def test_a_nul_byte_in_a_folder_path_is_one_line(short_recipe, tmp_path, capsys, key):
    assert main(["train", str(short_recipe), "--set", f"{key}={json.dumps(str(tmp_path / 'a') + chr(0) + 'b')}"]) == 2
    (line,) = errors(capsys)
    assert "NUL" in line or "null" in line


# -- the corruption matrix ------------------------------------------------------------------------------------------
DAMAGES = ["truncated", "garbage", "folder", "dangling", "devzero"]


def damage(path: Path, how: str) -> None:
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "garbage":
        path.write_bytes(b"\xff\xfe\x00garbage[{" * 64)
    else:
        replace(path, how)


def outcome(argv: list[str], capsys) -> int:
    """The exit status of ``argv``; a traceback fails, and a refusal must be one error line."""
    code = main(argv)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err, (argv, captured.err[-2000:])
    lines = [ln for ln in captured.err.splitlines() if ln.startswith("error:")]
    assert code in (0, 2) and (code == 0 or len(lines) == 1), (argv, code, captured.err[-2000:])
    return code


#: the files of a finished run that generate, eval, convert and --init-from read
EXPORT_FILES = ["model.safetensors", "model.toml", "tokenizer.json", "recipe.toml", "export.json"]


@pytest.mark.slow
@pytest.mark.parametrize("how", DAMAGES)
def test_every_export_file_damaged_is_refused_in_one_line_by_every_reader(finished, tmp_path, capsys, how):
    for name in EXPORT_FILES:
        run = copy_run(finished, tmp_path / name)
        damage(run / name, how)
        for argv in (["generate", str(run), "--max-new-tokens", "2"],
                     ["eval", str(run), "--task", "perplexity:split=val", "--batch-size", "2"],
                     ["convert", str(run), str(tmp_path / name / "hf"), "--to", "hf"],
                     ["train", "--init-from", str(run), "--run-dir", str(tmp_path / name / "new"),
                      "--set", "train.max_steps=1"]):
            assert outcome(argv, capsys) == 2, (name, how, argv)  # every one of them is hashed or needed


@pytest.mark.slow
@pytest.mark.parametrize("how", DAMAGES)
def test_every_hf_file_damaged_is_one_line_or_a_clean_convert(hf_folder, tmp_path, capsys, how):
    for file in sorted(p for p in hf_folder.iterdir() if p.is_file()):
        folder = tmp_path / file.name / "hf"
        shutil.copytree(hf_folder, folder)
        damage(folder / file.name, how)
        outcome(["convert", str(folder), str(tmp_path / file.name / "run")], capsys)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["folder", "dangling", "devzero"])
def test_every_run_file_not_regular_is_one_line_or_a_clean_resume(finished, tmp_path, capsys, how):
    """Every file of the run folder, checkpoints included: refused by name, or its checkpoint skipped."""
    # a checkpoint's pickles are its sha256's (test_run_hardening); step 3's files are as step 6's; a damaged
    # checkpoint file means training from the one before, so once (devzero) is enough to keep this under a minute
    names = sorted(p.relative_to(finished).as_posix() for p in finished.rglob("*") if p.is_file()
                   and not p.name.startswith("mp_rank") and "step-0000003" not in p.as_posix()
                   and (how == "devzero" or p.parent == finished))
    for name in names:
        run = copy_run(finished, tmp_path / name.replace("/", "_"))
        damage(run / name, how)
        if outcome(["train", "--resume", str(run), "--extend", "1"], capsys) == 0:
            assert name.startswith("checkpoints/"), name  # a damaged checkpoint is skipped; run files are refused


# -- the one atomic write and the one JSON-lines reader ------------------------------------------------
def test_an_atomic_write_flushes_the_file_and_its_folder_and_a_failed_one_leaves_the_old_file(tmp_path, monkeypatch):
    flushed = []
    real = safeio.fsync
    monkeypatch.setattr(safeio, "fsync", lambda p: (flushed.append(Path(p).name), real(p)))
    path = tmp_path / "state.json"
    safeio.write_atomically(path, "old")
    assert path.read_text() == "old" and flushed == ["state.json.tmp", tmp_path.name]

    def half_then_full(tmp):
        tmp.write_bytes(b"ne")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        safeio.write_atomically(path, half_then_full)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_the_jsonl_reader_skips_a_torn_last_line_and_lines_that_are_not_objects(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1}\n[1, 2]\n\xff\xfe\n' + b"[" * 100_000 + b'\n{"step": 2}\n{"step": 3, "lo')
    assert safeio.read_jsonl(path) == [{"step": 1}, {"step": 2}]


def test_extend_of_a_run_that_stopped_inside_its_warmup_is_one_line(tmp_path):
    own = load_recipe(Path(__file__).resolve().parent / "recipes" / "bases" / "tiny.toml", ["train.max_steps=2", "train.warmup_steps=2"])
    with pytest.raises(UsageError, match=r"--extend: .* ended at step 2, inside its warmup \(2 steps\)"):
        extension(tmp_path, own, argparse.Namespace(extend=3, decay=None))
