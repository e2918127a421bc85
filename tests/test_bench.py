"""bench/bench.py and bench/compose.py keep working on tiny recipes; compose.py's interval arithmetic."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
        assert 0 < path["utilisation"] and 0 < path["utilisation_cpu"] and len(path["utilisation_rounds"]) == 1
    # the peak is measured on the model's own matmuls at micro_batch x block_size rows, in both dtypes
    assert [(g["name"], g["M"], g["K"], g["N"]) for g in result["gemms"]] == [
        ("c_attn", 32, 16, 48), ("c_proj", 32, 16, 16), ("c_fc", 32, 16, 64), ("c_proj", 32, 64, 16),
        ("lm_head", 32, 16, 65)]
    assert all(g["fp32_flops"] > 0 and g["bf16_flops"] > 0 for g in result["gemms"])
    assert result["dtype"] == "fp32" and result["peak"] == max(g["fp32_flops"] for g in result["gemms"])
    assert "util [95% interval]" in proc.stdout
    assert result["tokens_per_step"] == 2 * 2 * 16
    assert result["ratio"] > 0


def test_bench_reports_a_bad_recipe_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench.py"), str(tmp_path / "missing.toml")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "missing.toml" in proc.stderr


def test_adamw_bench_times_fused_against_foreach_per_tensor_and_flat(tmp_path):
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(TINY)
    out = tmp_path / "adamw.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "adamw.py"), str(recipe), "--rounds", "2",
                           "--steps", "1", "--json", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())
    assert [r["layout"] for r in rows] == ["per tensor", "one flat tensor"]
    assert rows[0]["params"] == rows[1]["params"] > 0 and all(r["fused_ms"] > 0 and r["foreach_ms"] > 0 for r in rows)
    assert "| bench-tiny |" in proc.stdout and "speedup" in proc.stdout
    bad = subprocess.run([sys.executable, str(ROOT / "bench" / "adamw.py"), str(tmp_path / "missing.toml")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "missing.toml" in bad.stderr


def load_compose():
    spec = importlib.util.spec_from_file_location("bench_compose", ROOT / "bench" / "compose.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def compose_env():
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def test_compose_times_composed_against_oracle_and_engine_against_plain_loop(tmp_path):
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(TINY)
    out = tmp_path / "compose.json"
    cmd = [sys.executable, str(ROOT / "bench" / "compose.py"), str(recipe), "--warmup", "1", "--block", "1",
           "--min-rounds", "6", "--max-rounds", "6", "--json", str(out), "--quiet", "--profile", "1"]
    proc = subprocess.run(cmd, env=compose_env(), capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "composed / oracle" in proc.stdout and "engine / plain" in proc.stdout and "6 rounds" in proc.stdout
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["compile"] is False and result["rounds"] == 6
    assert list(result["paths"]) == ["oracle", "composed", "engine"]
    for ratio in result["ratios"].values():
        assert len(ratio["rounds"]) == 6 and ratio["low"] <= ratio["median"] <= ratio["high"]
    assert result["tokens_per_step"] == 2 * 2 * 16 and result["shape"]["grad_accum"] == 2
    assert "engine: the ops that took the most time over 1 steps" in proc.stdout  # --profile
    assert "aten::mm" in result["profiles"]["oracle"] and "aten::mm" in result["profiles"]["engine"]


def test_compose_refuses_a_recipe_the_gpt2_oracle_cannot_express_in_one_line(tmp_path):
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(TINY)
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "compose.py"), str(recipe),
                           "--set", "model.position.kind=rope"], env=compose_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "model.position: the oracle is GPT-2 (learned), got 'rope'" in proc.stderr


def test_median_interval_takes_the_order_statistics_of_a_95_percent_sign_test():
    compose = load_compose()
    assert compose.median_interval([1.0, 2.0, 3.0, 4.0, 5.0]) is None  # 5 values cannot reach 95%
    assert compose.median_interval(list(range(1, 7))) == (3.5, 1, 6)  # 1 - 2/64 = 96.9%
    assert compose.median_interval(list(range(1, 21))) == (10.5, 6, 15)  # the sign-test table's n = 20
    assert compose.median_interval(list(range(100, 0, -1)))[1:] == (40, 61)  # sorted first


def test_rounds_stop_only_when_the_interval_is_within_the_width():
    compose = load_compose()
    assert compose.converged((1.0, 0.991, 1.009), 0.01)
    assert not compose.converged((1.0, 0.985, 1.005), 0.01)
    assert not compose.converged(None, 0.01)


@pytest.mark.slow
def test_startup_bench_prints_import_time_and_each_light_commands_times(tmp_path):
    out = tmp_path / "startup.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "startup.py"), "--rounds", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "s of imports in all" in proc.stdout and "| playattention recipe show |" in proc.stdout
    numbers = json.loads(out.read_text())
    assert numbers["import_total_s"] > 0 and set(numbers["commands"]) == {"--help", "recipe show", "plugins", "diff"}
