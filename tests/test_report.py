"""Ablation reports from synthetic run folders: statistics over seeds, deltas, ranks, failures, CSV, plots."""
import csv
import json
import math

import pytest

from toolkit import report
from toolkit.report import RunResult, VariantInfo


def write_run(run_dir, *, status="finished", final=2.0, best=None, curve=(3.0, 2.5, 2.0), tokens_per_step=1000,
              error=None, tokens_per_s=5000.0, wall_s=60.0, peak=200 * 2**20):
    """A run folder as the trainer leaves it: summary.json and metrics.jsonl with eval lines."""
    run_dir.mkdir(parents=True)
    lines = []
    for i, loss in enumerate(curve, 1):
        tokens = i * 10 * tokens_per_step
        lines.append({"type": "train", "step": i * 10, "tokens": tokens, "loss": loss + 0.1, "lr": 1e-3,
                      "grad_norm": 1.0, "tokens_per_s": tokens_per_s, "mfu": 0.0, "elapsed": i})
        lines.append({"type": "eval", "step": i * 10, "tokens": tokens, "train_loss": loss - 0.1, "val_loss": loss,
                      "elapsed": i})
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    summary = {"run_dir": str(run_dir), "status": status, "steps": 10 * len(curve),
               "tokens": 10 * len(curve) * tokens_per_step, "final_train_loss": final - 0.1,
               "final_val_loss": final, "best_val_loss": best if best is not None else final,
               "tokens_per_s": tokens_per_s, "peak_mem_bytes": peak, "wall_s": wall_s, "params": 1000,
               "flops_per_token": 6000}
    if error:
        summary["error"] = error
    (run_dir / "summary.json").write_text(json.dumps(summary))


@pytest.fixture
def three_variants(tmp_path):
    """base (2 seeds), better (2 seeds), broken (its one seed failed)."""
    write_run(tmp_path / "base-s1", final=2.0, curve=(3.0, 2.4, 2.0))
    write_run(tmp_path / "base-s2", final=2.2, curve=(3.2, 2.6, 2.2))
    write_run(tmp_path / "better-s1", final=1.7, best=1.65, curve=(2.9, 2.1, 1.7))
    write_run(tmp_path / "better-s2", final=1.9, best=1.85, curve=(3.1, 2.3, 1.9))
    write_run(tmp_path / "broken-s1", status="failed", curve=(3.0,), error="FloatingPointError: loss is nan")
    variants = [VariantInfo("base", (), 1000, 6000), VariantInfo("better", ("model.position.kind=rope",), 900, 6000),
                VariantInfo("broken", ("model.mlp.kind=boom",), 1000, 7000)]
    runs = [report.read_run(v, s, tmp_path / f"{v}-s{s}") for v in ("base", "better") for s in (1, 2)]
    runs.append(report.read_run("broken", 1, tmp_path / "broken-s1"))
    return tmp_path, variants, runs


def test_read_run_takes_status_error_and_eval_curve_from_the_run_folder(tmp_path):
    write_run(tmp_path / "r", status="failed", curve=(3.0, 2.5), error="RuntimeError: boom")
    with open(tmp_path / "r" / "metrics.jsonl", "a") as f:
        f.write('{"type": "eval", "step": 30, "tok')  # a line the trainer is still writing
    run = report.read_run("v", 1, tmp_path / "r", status="running")
    assert run.status == "failed" and run.error == "RuntimeError: boom"
    assert run.evals == ((10000, 3.0), (20000, 2.5))
    missing = report.read_run("v", 1, tmp_path / "nothing-here", status="pending")
    assert missing.status == "pending" and missing.evals == () and missing.summary == {}


def test_summary_rows_have_mean_and_sample_std_over_seeds_deltas_and_ranks(three_variants):
    _, variants, runs = three_variants
    rows = {r["variant"]: r for r in report.summarize(variants, runs, baseline="base")}
    base, better, broken = rows["base"], rows["better"], rows["broken"]
    assert base["final_val_loss"] == pytest.approx(2.1)
    assert base["final_val_loss_std"] == pytest.approx(math.sqrt(0.02))  # sample std of 2.0, 2.2
    assert better["best_val_loss"] == pytest.approx(1.75)
    assert better["delta_final_val_loss"] == pytest.approx(-0.3)
    assert base["delta_final_val_loss"] == 0.0
    assert (better["rank"], base["rank"], broken["rank"]) == (1, 2, None)
    assert broken["status"] == "failed" and broken["final_val_loss"] is None
    assert broken["error"] == "seed 1: FloatingPointError: loss is nan"
    assert better["seeds_finished"] == better["seeds_total"] == 2


def test_one_failed_seed_makes_a_partial_variant_averaged_over_the_rest(tmp_path):
    write_run(tmp_path / "a-s1", final=2.0)
    write_run(tmp_path / "a-s2", status="failed", error="RuntimeError: out of memory")
    runs = [report.read_run("a", 1, tmp_path / "a-s1"), report.read_run("a", 2, tmp_path / "a-s2")]
    (row,) = report.summarize([VariantInfo("a")], runs, baseline="a")
    assert row["status"] == "partial" and row["seeds_finished"] == 1
    assert row["final_val_loss"] == 2.0 and row["final_val_loss_std"] is None
    assert "seed 2: RuntimeError: out of memory" in row["error"]


def test_markdown_ranks_best_first_and_lists_failed_runs_with_their_error(three_variants):
    tmp_path, variants, runs = three_variants
    rows = report.summarize(variants, runs, baseline="base")
    md = report.render_markdown(rows, runs, title="positions", header=["500 steps"], plots=["curves.png"])
    table = [ln for ln in md.splitlines() if ln.startswith("| ")][1:]
    assert table[0].startswith("| 1 | better |") and "1.8000 ± 0.1414" in table[0] and "-0.3000" in table[0]
    assert table[1].startswith("| 2 | **base** (baseline) |")
    assert table[2].startswith("| – | broken [failed] |")
    assert "model.position.kind=rope" in table[0]
    assert "900" in table[0] and "6K" in table[0] and "| 5K |" in table[0] and "200 MiB" in table[0]
    assert "## Runs that did not finish" in md and "`broken` seed 1 (failed): FloatingPointError: loss is nan" in md
    assert "![curves](curves.png)" in md and "- 500 steps" in md


def test_write_report_writes_markdown_csvs_and_both_plots(three_variants):
    tmp_path, variants, runs = three_variants
    out = tmp_path / "report"
    report.write_report(out, variants, runs, baseline="base", title="positions")
    for name in ("report.md", "results.csv", "runs.csv", "curves.png", "tradeoff.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["variant"] for r in rows] == ["better", "base", "broken"]
    assert float(rows[0]["final_val_loss"]) == pytest.approx(1.8) and rows[0]["rank"] == "1"
    assert rows[2]["status"] == "failed" and rows[2]["final_val_loss"] == "" and "nan" in rows[2]["error"]
    with open(out / "runs.csv") as f:
        per_seed = list(csv.DictReader(f))
    assert len(per_seed) == 5 and {r["seed"] for r in per_seed if r["variant"] == "base"} == {"1", "2"}


def test_mean_curve_averages_seeds_and_keeps_the_min_max_band():
    runs = [RunResult("a", 1, "", "finished", evals=((100, 3.0), (200, 2.0))),
            RunResult("a", 2, "", "finished", evals=((100, 3.4), (200, 2.4), (300, 2.2)))]
    xs, mean, lo, hi = report.mean_curve(runs)
    assert xs == [100, 200, 300]
    assert mean == pytest.approx([3.2, 2.2, 2.2]) and lo == [3.0, 2.0, 2.2] and hi == [3.4, 2.4, 2.2]


def test_plots_are_skipped_without_finished_runs(tmp_path):
    runs = [RunResult("a", 1, "", "pending")]
    rows = report.summarize([VariantInfo("a")], runs, baseline="a")
    assert not report.plot_curves(rows, runs, tmp_path / "c.png")
    assert not report.plot_tradeoff(rows, tmp_path / "t.png")
    md = report.render_markdown(rows, runs, title="t")
    assert "1 run(s) not finished yet: a s1" in md and "**a** (baseline) [pending]" in md


def test_si_and_sizes_are_short():
    assert report.si(1234567) == "1.23M" and report.si(809856) == "810K" and report.si(950) == "950"
    assert report.si(None) == "–"
