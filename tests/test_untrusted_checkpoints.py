"""A checkpoint folder from elsewhere runs no code (issue 19.1).

Its manifest can be rewritten to match any file, so the hash proves nothing about a folder someone
hands you: every file must be in the manifest, and every torch.load DeepSpeed makes (its checkpoint
engine, ZeRO 3's and the universal loaders, ds_to_universal) runs weights-only.
"""
import json
import shutil
from pathlib import Path

import pytest
import torch

from test_checkpoint import step, tiny_recipe
from test_run_hardening import write_evil_pickle
from toolkit import checkpoint
from toolkit.checkpoint import CheckpointError
from toolkit.engine import build_engine
from toolkit.model import Transformer


@pytest.fixture(scope="module", params=[0, 1, 3], ids=lambda s: f"zero{s}")
def saved(request, tmp_path_factory):
    """(engine, checkpoints root) of one step trained and saved at the ZeRO stage."""
    recipe = tiny_recipe(stage=request.param)
    torch.manual_seed(0)
    engine = build_engine(Transformer(recipe.model), recipe).engine
    step(engine)
    root = tmp_path_factory.mktemp(f"zero{request.param}")
    checkpoint.save(engine, root, 1, {"tokens": 16})
    return engine, root


def copy_checkpoints(root: Path, tmp_path: Path) -> Path:
    out = tmp_path / "checkpoints"
    shutil.copytree(root, out)
    return out


def rewrite_manifest(folder: Path, **changes) -> None:
    """Record every file's current size and sha256, as someone handing over a doctored folder would."""
    state = json.loads((folder / checkpoint.STATE_FILE).read_text())
    files = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": checkpoint.sha256_of(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != checkpoint.STATE_FILE}
    (folder / checkpoint.STATE_FILE).write_text(json.dumps({**state, **changes, "files": files}))


def pt_files(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "step-0000001").glob("*.pt"))


def test_a_zero_checkpoint_loads_weights_only(saved, tmp_path):
    engine, root = saved
    assert checkpoint.load(engine, copy_checkpoints(root, tmp_path))["step"] == 1
    with checkpoint.weights_only_loads():  # every file it wrote, nothing but tensors and the allowed classes
        for name in pt_files(root):
            torch.load(root / "step-0000001" / name, weights_only=False)  # forced to True inside


@pytest.mark.parametrize("ranks", [1, pytest.param(2, marks=pytest.mark.slow)], ids=["same-ranks", "other-ranks"])
def test_a_malicious_pickle_with_a_rewritten_manifest_runs_nothing(saved, tmp_path, ranks):
    """In each file of the checkpoint; saved by 2 ranks, ZeRO 1-3 goes through ds_to_universal first."""
    engine, root = saved
    if ranks == 2 and engine.zero_optimization_stage() == 0:
        pytest.skip("ZeRO 0 loads as it is on any number of ranks")
    for name in pt_files(root):
        folder = copy_checkpoints(root, tmp_path / name) / "step-0000001"
        marker = tmp_path / f"pwned-{name}"
        write_evil_pickle(folder / name, marker)
        rewrite_manifest(folder, world_size=ranks)
        assert checkpoint.verify(folder) is None  # the hashes cannot tell
        with pytest.raises(CheckpointError) as exc:
            checkpoint.load(engine, folder.parent)
        assert "\n" not in str(exc.value) and str(exc.value).endswith(
            "a file holds a pickle of something other than tensors and DeepSpeed's state (it asks for "
            "io.open); nothing of it was run"), str(exc.value)
        assert not marker.exists()


@pytest.mark.parametrize("extra", ["zero_pp_rank_9_mp_rank_00_optim_states.pt", "mp_rank_01_model_states.pt",
                                   "sub/evil.pt"])
def test_a_file_the_manifest_does_not_list_is_refused_before_anything_loads(saved, tmp_path, extra, monkeypatch):
    engine, root = saved
    folder = copy_checkpoints(root, tmp_path) / "step-0000001"
    marker = tmp_path / "pwned"
    (folder / extra).parent.mkdir(exist_ok=True)
    shutil.copyfile(folder / pt_files(root)[0], folder / extra)
    write_evil_pickle(folder / extra, marker)
    loaded = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: loaded.append(a))
    with pytest.raises(CheckpointError) as exc:
        checkpoint.load(engine, folder.parent)
    assert str(exc.value) == (f"{folder}: refused: {Path(extra).parts[0]} is not in the manifest of toolkit_state.json (this save "
                              "did not write it); nothing was loaded")
    assert loaded == [] and not marker.exists()
