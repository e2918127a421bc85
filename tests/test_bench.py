"""bench/bench.py keeps working: two warm-up and two timed steps of a tiny recipe, both paths."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

TINY = """
name = "bench-tiny"
[model]
vocab_size = 65
block_size = 16
n_layer = 1
n_head = 2
n_embd = 16
[train]
micro_batch = 2
grad_accum = 2
max_steps = 10
warmup_steps = 1
"""


def test_bench_compares_the_engine_with_a_plain_loop(tmp_path):
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(TINY)
    out = tmp_path / "bench.json"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, str(ROOT / "bench" / "bench.py"), str(recipe), "--steps", "2", "--warmup", "2",
           "--set", "deepspeed.zero_stage=1", "--stages", "0,2", "--json", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "engine / plain" in proc.stdout and "ZeRO 1" in proc.stdout and "accum 2" in proc.stdout
    result = json.loads(out.read_text())
    assert list(result["paths"]) == ["engine ZeRO 1", "engine ZeRO 0", "engine ZeRO 2", "plain pytorch"]
    assert set(result["ratios"]) == {"engine ZeRO 1", "engine ZeRO 0", "engine ZeRO 2"}
    for path in result["paths"].values():
        assert path["tokens_per_s"] > 0 and path["step_ms"] > 0 and path["mfu"] is None
    assert result["tokens_per_step"] == 2 * 2 * 16
    assert result["ratio"] > 0


def test_bench_reports_a_bad_recipe_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench.py"), str(tmp_path / "missing.toml")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "missing.toml" in proc.stderr
