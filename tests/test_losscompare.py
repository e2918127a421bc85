"""Loss-curve comparison (toolkit.losscompare): a rerun is bitwise equal, a changed run is not."""
import json

import pytest

from toolkit import losscompare
from toolkit.recipe import load_recipe
from toolkit.trainer import train

CHANGES = {"name": "again", "model.block_size": 16, "model.dropout": 0.1, "train.max_steps": 8,
           "train.eval_interval": 4, "train.eval_batches": 1, "train.log_interval": 1}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_recipe):
    """The same recipe twice, and once with another learning rate."""
    folder = tmp_path_factory.mktemp("losscompare")
    recipe = tiny_recipe(folder, CHANGES, name="again")
    out = {}
    for name, sets in (("a", []), ("b", []), ("lr", ["train.lr=2e-3"])):
        out[name] = folder / name
        assert train(load_recipe(recipe, sets), run_dir=out[name], progress=False)["status"] == "finished"
    return out


def test_a_rerun_of_a_recipe_is_bitwise_equal_step_by_step(runs, capsys):
    assert losscompare.differences(runs["a"], runs["b"]) == []
    assert losscompare.main([str(runs["a"]), str(runs["b"]), "--assert-equal"]) == 0
    assert capsys.readouterr().out.startswith("equal: 9 steps")  # step 0's eval and 8 steps


def test_assert_equal_fails_at_the_first_differing_step(runs, capsys):
    lines = losscompare.differences(runs["a"], runs["lr"])
    assert lines[0].startswith("step 1 train lr: ")
    assert losscompare.main([str(runs["a"]), str(runs["lr"]), "--assert-equal"]) == 1
    assert capsys.readouterr().err.startswith("error: the runs differ first at step 1 train lr: ")
    assert losscompare.main([str(runs["a"]), str(runs["lr"])]) == 0  # without --assert-equal: a report


def test_one_ulp_is_reported_as_one_ulp_and_missing_steps_are_named(tmp_path):
    import struct

    loss = 2.5
    nxt = struct.unpack("<f", struct.pack("<i", struct.unpack("<i", struct.pack("<f", loss))[0] + 1))[0]
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"type": "train", "step": s, "loss": loss}) + "\n" for s in (1, 2)))
    b.write_text(json.dumps({"type": "train", "step": 1, "loss": nxt}) + "\n" + "\xff garbage\n")
    assert losscompare.differences(a, b) == [f"step 1 train loss: 2.5 != {nxt!r} (1 ulp)", "step 2 train: only in a"]
