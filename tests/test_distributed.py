"""Two CPU ranks (gloo) through `playattention train --nproc 2`: ZeRO 2 and 3 follow the one-rank curve.

Two ranks with micro batch 4 read the two halves of the windows one rank with micro batch 8 reads
(TokenLoader deals each batch's windows out to the ranks), so in fp32 the loss curves, evaluated
losses and final weights must agree up to summation order.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from test_evaluators import EXAMPLES, write_jsonl
from toolkit.generate import load_run
from toolkit.recipe import load_recipe
from toolkit.trainer import train

pytestmark = pytest.mark.slow

@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_recipe):
    root = tmp_path_factory.mktemp("dist")
    # 3 examples: the ranks get 2 and 1, so under ZeRO 3 the one with less to score must still join every forward
    mc = write_jsonl(root / "mc.jsonl", EXAMPLES)
    path = tiny_recipe(root, {"name": "tiny2", "train.micro_batch": 8, "train.max_steps": 6, "train.lr": 3e-3,
                              "train.eval_interval": 3, "eval": [{"kind": "hellaswag", "path": str(mc), "batch_size": 2},
                                                                 {"kind": "perplexity", "batches": 2, "batch_size": 4}]},
                       name="tiny2")
    reference = train(load_recipe(path), run_dir=root / "one-rank", progress=False)
    assert reference["status"] == "finished"
    return root, path


def rows(run_dir, kind):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


def launch_two_ranks(recipe_path, run_dir, *sets):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR")}
    env["DS_ACCELERATOR"] = "cpu"
    cmd = [sys.executable, "-m", "toolkit", "train", str(recipe_path), "--nproc", "2", "--run-dir", str(run_dir),
           "--set", "train.micro_batch=4", *[a for s in sets for a in ("--set", s)]]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_follow_the_one_rank_curve(setup, stage):
    root, recipe_path = setup
    run = root / f"two-ranks-zero{stage}"
    proc = launch_two_ranks(recipe_path, run, f"deepspeed.zero_stage={stage}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"finished 6 steps ({6 * 8 * 32:,} tokens)" in proc.stdout  # rank 0 reports once
    assert proc.stdout.count("finished 6 steps") == 1

    one, two = root / "one-rank", run
    assert [r["tokens"] for r in rows(two, "train")] == [r["tokens"] for r in rows(one, "train")]
    assert [r["loss"] for r in rows(two, "train")] == pytest.approx([r["loss"] for r in rows(one, "train")], rel=1e-4)
    assert [r["val_loss"] for r in rows(two, "eval")] == pytest.approx(
        [r["val_loss"] for r in rows(one, "eval")], rel=1e-4)
    # the evaluators split their examples and windows between the ranks and add them up again
    for key in ("hellaswag/acc", "hellaswag/acc_norm"):
        assert [r[key] for r in rows(two, "eval")] == [r[key] for r in rows(one, "eval")]
    assert [r["perplexity/loss"] for r in rows(two, "eval")] == pytest.approx(
        [r["perplexity/loss"] for r in rows(one, "eval")], rel=1e-4)
    assert json.loads((two / "ds_config.json").read_text())["train_batch_size"] == 8
    summary = json.loads((two / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["status"] == "finished"

    # ZeRO partitions are gathered into one set of fp32 weights, equal to the one-rank run's
    model_one, _, _ = load_run(one)
    model_two, _, _ = load_run(two)
    for (name, a), (_, b) in zip(model_one.state_dict().items(), model_two.state_dict().items()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=2e-5, msg=name)


def test_the_deepspeed_launcher_runs_the_installed_command_on_two_ranks(setup):
    """`deepspeed --num_accelerators 2 $(which playattention) train ...`: the README's multi-GPU line, on CPU."""
    from pathlib import Path

    from toolkit.engine import free_port

    root, recipe_path = setup
    run = root / "deepspeed-launcher"
    bin_dir = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR")}
    env["DS_ACCELERATOR"] = "cpu"
    cmd = [str(bin_dir / "deepspeed"), "--num_accelerators", "2", "--master_port", str(free_port()),
           str(bin_dir / "playattention"), "train", str(recipe_path), "--run-dir", str(run),
           "--set", "train.micro_batch=4", "--set", "deepspeed.zero_stage=1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["status"], summary["world_size"], summary["steps"]) == ("finished", 2, 6)
    assert [r["loss"] for r in rows(run, "train")] == pytest.approx(
        [r["loss"] for r in rows(root / "one-rank", "train")], rel=1e-4)
