"""Checkpoints on their own: atomic commits, incomplete ones ignored, a full disk, keep-last-K, RNG, safety."""
import ast
import errno
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from toolkit import checkpoint, runfolder
from toolkit.checkpoint import CheckpointError
from toolkit.engine import build_engine
from toolkit.model import ModelConfig, Transformer
from toolkit.recipe import DeepSpeedConfig, Recipe, TrainConfig, load_recipe, registry_of

TOOLKIT = Path(__file__).resolve().parent.parent / "toolkit"


def tiny_recipe(stage=0):
    return Recipe(model=ModelConfig(vocab_size=65, block_size=8, n_layer=1, n_head=2, n_embd=16),
                  train=TrainConfig(micro_batch=2, lr=1e-2, warmup_steps=0), deepspeed=DeepSpeedConfig(zero_stage=stage))


@pytest.fixture(scope="module")
def engine():
    torch.manual_seed(0)
    return build_engine(Transformer(tiny_recipe().model), tiny_recipe()).engine


def step(engine):
    x = torch.randint(0, 65, (2, 8))
    _, loss = engine(x, x)
    engine.backward(loss)
    engine.step()


def weights(engine):
    return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


def save(engine, root, n, **kw):
    return checkpoint.save(engine, root, n, {"tokens": n * 16, "note": "ours"}, **kw)


def test_save_writes_into_a_partial_folder_then_renames_it_and_moves_latest(engine, tmp_path, monkeypatch):
    seen = []
    original = checkpoint._commit

    def spy(root, partial, tag):
        seen.append((partial.name, sorted(p.name for p in partial.iterdir()), (root / tag).exists(),
                     (root / "latest").exists()))
        original(root, partial, tag)

    monkeypatch.setattr(checkpoint, "_commit", spy)
    path = save(engine, tmp_path, 1)
    assert seen == [(".partial-step-0000001", ["mp_rank_00_model_states.pt", "toolkit_state.json"], False, False)]
    assert path == tmp_path / "step-0000001" and (tmp_path / "latest").read_text() == "step-0000001"
    state = checkpoint.read_state(path)
    assert (state["step"], state["tokens"], state["note"], state["world_size"], state["zero_stage"]) == (1, 16, "ours", 1, 0)
    size = (path / "mp_rank_00_model_states.pt").stat().st_size
    digest = checkpoint.sha256_of(path / "mp_rank_00_model_states.pt")
    assert state["files"] == {"mp_rank_00_model_states.pt": {"size": size, "sha256": digest}}
    assert checkpoint.problem(path) is None and checkpoint.latest(tmp_path) == path


def test_only_the_newest_k_are_kept(engine, tmp_path):
    for n in range(1, 5):
        save(engine, tmp_path, n, keep=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-0000003", "step-0000004"]
    assert (tmp_path / "latest").read_text() == "step-0000004"


def test_a_crash_before_the_rename_leaves_the_previous_checkpoint_newest(engine, tmp_path, monkeypatch):
    step(engine)
    save(engine, tmp_path, 1)
    at_one = weights(engine)
    step(engine)

    def crash(*_):
        raise KeyboardInterrupt("killed after DeepSpeed wrote its files, before the rename")

    monkeypatch.setattr(checkpoint, "_commit", crash)
    with pytest.raises(KeyboardInterrupt):
        save(engine, tmp_path, 2)
    monkeypatch.undo()
    partial = tmp_path / ".partial-step-0000002"
    assert (partial / "mp_rank_00_model_states.pt").is_file() and (partial / "toolkit_state.json").is_file()
    assert checkpoint.latest(tmp_path).name == "step-0000001" and (tmp_path / "latest").read_text() == "step-0000001"

    state = checkpoint.load(engine, tmp_path)  # the newest complete one
    assert state["step"] == 1
    assert all(torch.equal(v, at_one[k]) for k, v in weights(engine).items())
    save(engine, tmp_path, 2)  # the next save of that step clears the leftover
    assert not partial.exists() and checkpoint.latest(tmp_path).name == "step-0000002"


def test_a_truncated_checkpoint_is_incomplete_and_skipped(engine, tmp_path):
    save(engine, tmp_path, 1)
    save(engine, tmp_path, 2)
    states = tmp_path / "step-0000002" / "mp_rank_00_model_states.pt"
    size = states.stat().st_size
    with open(states, "r+b") as f:
        f.truncate(size // 2)
    assert checkpoint.problem(tmp_path / "step-0000002") == \
        f"mp_rank_00_model_states.pt has {size // 2:,} bytes, {size:,} were written"
    assert checkpoint.latest(tmp_path).name == "step-0000001"
    assert checkpoint.load(engine, tmp_path)["step"] == 1
    with pytest.raises(CheckpointError, match="step-0000002: incomplete checkpoint: mp_rank_00_model_states.pt has"):
        checkpoint.load(engine, tmp_path, "step-0000002")
    (tmp_path / "step-0000001" / "toolkit_state.json").unlink()  # e.g. copied by hand, half-way
    assert checkpoint.problem(tmp_path / "step-0000001") == "no toolkit_state.json (the save did not finish)"
    assert checkpoint.latest(tmp_path) is None
    save(engine, tmp_path, 3, keep=5)  # saving goes on beside broken ones (pruned by age like the rest)
    assert checkpoint.latest(tmp_path).name == "step-0000003"


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(engine, tmp_path, monkeypatch):
    save(engine, tmp_path, 1)
    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        with open(f, "wb") as out:
            out.write(b"\0" * 100)  # part of the file got out before the disk filled
        raise OSError(errno.ENOSPC, "No space left on device", str(f))

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointError) as err:
        save(engine, tmp_path, 2)
    monkeypatch.setattr(torch, "save", real_save)
    assert str(err.value).startswith("saving checkpoint step-0000002 failed (no space left on the device: ")
    assert str(err.value).endswith("the newest complete checkpoint is step-0000001")
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["step-0000001"]  # no partial left
    assert (tmp_path / "latest").read_text() == "step-0000001"
    assert checkpoint.load(engine, tmp_path)["step"] == 1


def test_rng_states_round_trip_through_json():
    state = json.loads(json.dumps(checkpoint.rng_state()))
    first = (random.random(), np.random.rand(), torch.rand(3))
    checkpoint.set_rng_state(state)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert first[:2] == again[:2] and torch.equal(first[2], again[2])


def test_trimming_logs_keeps_the_steps_up_to_the_checkpoint(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    lines = [{"type": "eval", "step": 0}, {"type": "train", "step": 1}, {"type": "train", "step": 2},
             {"type": "resume", "step": 1}, {"type": "eval", "step": 2}]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"type": "train", "st')
    assert runfolder.trim_metrics(metrics, 1) == 3  # steps 2 and 2, and the torn line
    assert [json.loads(ln) for ln in metrics.read_text().splitlines()] == [lines[0], lines[1], lines[3]]
    assert runfolder.trim_metrics(metrics, 1) == 0

    samples = tmp_path / "samples.txt"
    samples.write_text("=== step 2 | sample 1/1 ===\na\n\n=== step 4 | sample 1/1 ===\nb\n\n=== step 6 | x ===\nc\n")
    assert runfolder.trim_samples(samples, 4) == 1
    assert samples.read_text() == "=== step 2 | sample 1/1 ===\na\n\n=== step 4 | sample 1/1 ===\nb\n\n"


@pytest.mark.parametrize("stage, precision, per_param", [(0, "fp32", 12), (2, "fp32", 16), (3, "fp32", 12),
                                                         (1, "bf16", 14)])
def test_checkpoint_size_estimate(stage, precision, per_param):
    assert checkpoint.checkpoint_bytes(1000, precision, stage) == 1000 * per_param


def test_the_estimate_matches_a_real_checkpoint(engine, tmp_path):
    path = save(engine, tmp_path, 1)
    params = sum(p.numel() for p in engine.module.parameters())
    real = sum(p.stat().st_size for p in path.rglob("*.pt"))
    assert 0.9 < real / checkpoint.checkpoint_bytes(params, "fp32", 0) < 1.5  # tiny: pickle headers weigh in


def test_too_little_disk_space_is_refused_with_the_numbers(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**12, 10**12 - 10**6, 10**6))
    with pytest.raises(CheckpointError) as err:
        checkpoint.check_room(tmp_path, 10**6, "fp32", 0, keep=3)
    assert str(err.value) == (
        f"{tmp_path}: 976.6 KiB free, but this run needs about 49.6 MiB (3 checkpoint(s) kept + 1 being written, "
        "~11.4 MiB each, and the exported weights); free space, lower train.keep_checkpoints or pick another "
        "train.out_dir")
    checkpoint.check_room(tmp_path, 10, "fp32", 0, keep=3)  # a few hundred bytes fit


def test_a_run_folder_that_cannot_be_written_is_named(tmp_path):
    (tmp_path / "file").write_text("")
    assert runfolder.unwritable(tmp_path / "file" / "run").startswith(f"{tmp_path / 'file' / 'run'}: cannot write "
                                                                      "to the run folder (")
    assert runfolder.unwritable(tmp_path / "new" / "run") is None and (tmp_path / "new" / "run").is_dir()
    assert list((tmp_path / "new" / "run").iterdir()) == []  # the probe is gone


def torch_load_calls(path: Path):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
            yield node


def test_every_torch_load_in_the_toolkit_is_weights_only():
    calls = [(path, node) for path in sorted(TOOLKIT.rglob("*.py")) for node in torch_load_calls(path)]
    assert calls, "the scan found no torch.load at all (toolkit/hf reads pytorch_model.bin with it)"
    for path, node in calls:
        flags = {kw.arg: kw.value for kw in node.keywords}
        assert isinstance(flags.get("weights_only"), ast.Constant) and flags["weights_only"].value is True, \
            f"{path.relative_to(TOOLKIT.parent)}:{node.lineno}: torch.load without weights_only=True"


def test_a_checkpoint_saved_before_a_model_key_existed_resumes_when_the_key_keeps_its_default():
    # a run saved before model.parametrization existed resolved without it; its default is what that run had
    recipe = load_recipe(Path(__file__).resolve().parent.parent / "recipes" / "smoke.toml")
    current = checkpoint.identity(recipe, registry_of(recipe))
    saved = json.loads(json.dumps(current))
    del saved["recipe"]["model"]["parametrization"]
    assert checkpoint.identity_changes(saved, current) == ([], [])
    chosen = json.loads(json.dumps(current))
    chosen["recipe"]["model"]["parametrization"] = {"kind": "mup", "base_width": 16}
    refused, _ = checkpoint.identity_changes(saved, chosen)
    assert refused == ['model.parametrization.kind: "standard" -> "mup"', "model.parametrization.base_width: (unset) -> 16"]
