"""Ablation reports from synthetic run folders: statistics over seeds, deltas, ranks, failures, CSV, plots."""
import csv
import json
import math
import statistics

import pytest
from scipy import stats

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


# -- the difference from the baseline: Welch interval, verdicts, seeds to resolve ---------------
KNOWN = {"base": [2.0, 2.1, 2.2], "better": [1.80, 1.85], "worse": [2.40, 2.50], "wide": [2.0, 2.4], "lonely": [1.5]}


def known_runs(values=KNOWN):
    """Finished runs with the given final val losses per variant (no folders: summarize needs none)."""
    variants = [VariantInfo(name) for name in values]
    runs = [RunResult(name, seed, f"{name}-s{seed}", "finished", summary={"final_val_loss": x})
            for name, xs in values.items() for seed, x in enumerate(xs, 1)]
    return variants, runs


def welch_by_hand(a, b):
    """diff, half-width and df of the 95% Welch interval of mean(a) - mean(b), written out."""
    na, nb = len(a), len(b)
    ma, mb = sum(a) / na, sum(b) / nb
    va = sum((x - ma) ** 2 for x in a) / (na - 1) / na  # squared standard error of each mean
    vb = sum((x - mb) ** 2 for x in b) / (nb - 1) / nb
    df = (va + vb) ** 2 / (va ** 2 / (na - 1) + vb ** 2 / (nb - 1))
    return ma - mb, stats.t.ppf(0.975, df) * math.sqrt(va + vb), df


def test_welch_interval_of_the_difference_matches_a_hand_computation_not_a_pooled_one():
    variants, runs = known_runs()
    rows = {r["variant"]: r for r in report.summarize(variants, runs, baseline="base")}
    better = rows["better"]
    diff, half, df = welch_by_hand(KNOWN["better"], KNOWN["base"])
    assert df == pytest.approx(2.6350365, rel=1e-6)  # between min(n) - 1 = 1 and n_a + n_b - 2 = 3
    assert better["welch_df"] == pytest.approx(df, rel=1e-9)
    assert better["delta_final_val_loss"] == pytest.approx(diff) == pytest.approx(-0.275)
    assert (better["ci_low"], better["ci_high"]) == (pytest.approx(diff - half, rel=1e-9),
                                                     pytest.approx(diff + half, rel=1e-9))
    # scipy's own Welch test agrees
    ci = stats.ttest_ind(KNOWN["better"], KNOWN["base"], equal_var=False).confidence_interval(0.95)
    assert (better["ci_low"], better["ci_high"]) == (pytest.approx(ci.low), pytest.approx(ci.high))
    # Student's pooled interval (or Welch's error with the pooled df) would be wider here: the test tells them apart
    na, nb = 2, 3
    pooled_var = (statistics.variance(KNOWN["better"]) * (na - 1) + statistics.variance(KNOWN["base"]) * (nb - 1)) / (na + nb - 2)
    pooled_half = stats.t.ppf(0.975, na + nb - 2) * math.sqrt(pooled_var * (1 / na + 1 / nb))
    wrong_df_half = stats.t.ppf(0.975, na + nb - 2) / stats.t.ppf(0.975, df) * half
    assert abs(pooled_half - half) > 0.02 and abs(wrong_df_half - half) > 0.01


def test_verdicts_say_ahead_behind_within_noise_and_baseline():
    variants, runs = known_runs()
    rows = {r["variant"]: r for r in report.summarize(variants, runs, baseline="base")}
    assert rows["base"]["verdict"] == "baseline" and rows["base"]["ci_low"] is None
    assert rows["better"]["verdict"] == "ahead" and rows["better"]["ci_high"] < 0
    assert rows["worse"]["verdict"] == "behind" and rows["worse"]["ci_low"] > 0
    wide = rows["wide"]
    assert wide["verdict"] == "within noise" and wide["ci_low"] < 0 < wide["ci_high"]
    assert rows["better"]["seeds_to_resolve"] is None and rows["worse"]["seeds_to_resolve"] is None
    # the ranking is still by mean final val loss, whatever the verdicts
    assert [r["variant"] for r in report._ordered(list(rows.values()))] == ["lonely", "better", "base", "wide", "worse"]


def test_one_seed_on_either_side_gives_no_interval():
    variants, runs = known_runs()
    rows = {r["variant"]: r for r in report.summarize(variants, runs, baseline="base")}
    lonely = rows["lonely"]
    assert lonely["verdict"] == "1 seed: no interval"
    assert lonely["ci_low"] is lonely["ci_high"] is lonely["seeds_to_resolve"] is None
    assert lonely["delta_final_val_loss"] == pytest.approx(-0.6)  # the delta itself is still there
    rows = {r["variant"]: r for r in report.summarize(variants, runs, baseline="lonely")}
    assert {rows[v]["verdict"] for v in ("base", "better", "worse", "wide")} == {"1 seed: no interval"}


def test_seeds_to_resolve_is_the_smallest_n_whose_welch_interval_excludes_the_gap():
    variants, runs = known_runs()
    wide = {r["variant"]: r for r in report.summarize(variants, runs, baseline="base")}["wide"]
    gap = abs(statistics.fmean(KNOWN["wide"]) - statistics.fmean(KNOWN["base"]))  # 0.1
    sa, sb = statistics.stdev(KNOWN["wide"]), statistics.stdev(KNOWN["base"])

    def first_n(df_of_n):
        return next(n for n in range(2, 1001)
                    if stats.t.ppf(0.975, df_of_n(n)) * math.sqrt((sa ** 2 + sb ** 2) / n) < gap)

    welch = first_n(lambda n: (n - 1) * (sa ** 2 + sb ** 2) ** 2 / (sa ** 4 + sb ** 4))
    assert wide["seeds_to_resolve"] == welch == 37
    # a pooled df (2n - 2), the smaller sample's df (n - 1) or a normal quantile would each give another n
    assert {first_n(lambda n: 2 * n - 2), first_n(lambda n: n - 1), first_n(lambda n: 1e9)} == {36, 38, 35}
    # and at 37 seeds each, with the same means and spreads, Welch's interval excludes 0; at 36 it does not
    for n, excludes in ((37, True), (36, False)):
        va, vb = sa ** 2 / n, sb ** 2 / n
        df = (va + vb) ** 2 / (va ** 2 / (n - 1) + vb ** 2 / (n - 1))
        assert bool(stats.t.ppf(0.975, df) * math.sqrt(va + vb) < gap) is excludes


def test_seeds_to_resolve_is_none_without_a_gap_or_beyond_the_cap():
    assert report.seeds_to_resolve(0.0, 0.1, 0.1) is None
    assert report.seeds_to_resolve(0.001, 0.1, 0.1) is None  # would need about 80,000 seeds
    assert report.seeds_to_resolve(0.001, 0.1, 0.1, cap=100_000) == pytest.approx(76_830, abs=30)
    variants, runs = known_runs({"base": [2.0, 2.2], "same": [2.2, 2.0]})
    same = report.summarize(variants, runs, baseline="base")[1]
    assert same["verdict"] == "within noise" and same["seeds_to_resolve"] is None


def test_report_and_csv_show_interval_verdict_and_seeds_columns(tmp_path):
    variants, runs = known_runs()
    report.write_report(tmp_path, variants, runs, baseline="base", title="known")
    md = (tmp_path / "report.md").read_text()
    head, *table = [ln for ln in md.splitlines() if ln.startswith("| ")]
    assert "| Δ final vs baseline | 95% CI of Δ | verdict | seeds to resolve | tokens/s |" in head
    rows = {ln.split(" | ")[1].split(" ")[0].strip("*"): ln for ln in table}
    assert "| -0.2750 | [-0.4919, -0.0581] | ahead | – |" in rows["better"]
    assert "| +0.1000 |" in rows["wide"] and "| within noise | ≥ 37 seeds |" in rows["wide"]
    assert "| 0 | – | baseline | – |" in rows["base"]
    assert "| 1 seed: no interval | – |" in rows["lonely"]
    assert "Welch's t interval" in md and "Welch–Satterthwaite" in md
    with open(tmp_path / "results.csv") as f:
        csv_rows = {r["variant"]: r for r in csv.DictReader(f)}
    wide = csv_rows["wide"]
    assert wide["verdict"] == "within noise" and wide["seeds_to_resolve"] == "37"
    assert float(wide["delta_final_val_loss"]) == pytest.approx(0.1)
    diff, half, _ = welch_by_hand(KNOWN["wide"], KNOWN["base"])
    assert float(wide["ci_low"]) == pytest.approx(diff - half) and float(wide["ci_high"]) == pytest.approx(diff + half)
    assert csv_rows["lonely"]["ci_low"] == "" and csv_rows["lonely"]["verdict"] == "1 seed: no interval"
    assert list(csv_rows) == ["lonely", "better", "base", "wide", "worse"]  # still ranked best first


def test_seeds_that_agree_exactly_give_a_point_interval():
    variants, runs = known_runs({"base": [2.1, 2.1], "same": [2.1, 2.1], "better": [2.0, 2.0]})
    base, same, better = report.summarize(variants, runs, baseline="base")
    assert better["verdict"] == "ahead" and better["ci_low"] == better["ci_high"] == pytest.approx(-0.1)
    assert better["welch_df"] is None
    assert same["verdict"] == "within noise" and same["ci_low"] == same["ci_high"] == 0.0
    assert same["seeds_to_resolve"] is None


def test_report_has_a_column_per_evaluator_metric_with_mean_and_std_over_seeds(tmp_path):
    acc = {"base": [0.30, 0.32], "rope": [0.34, 0.36]}
    variants = [VariantInfo(name) for name in acc]
    runs = [RunResult(name, seed, f"{name}-s{seed}", "finished",
                      summary={"final_val_loss": 2.0, "hellaswag/acc_norm": x, "perplexity/ppl": 10.0 + seed})
            for name, xs in acc.items() for seed, x in enumerate(xs, 1)]
    rows = {r["variant"]: r for r in report.summarize(variants, runs, baseline="base")}
    mean, std = rows["rope"]["evals"]["hellaswag/acc_norm"]
    assert mean == pytest.approx(0.35) and std == pytest.approx(statistics.stdev([0.34, 0.36]))
    md = report.render_markdown(list(rows.values()), runs, title="t")
    header = next(line for line in md.splitlines() if line.startswith("| rank"))
    assert "| hellaswag/acc_norm |" in header and "| perplexity/ppl |" in header
    rope = next(line for line in md.splitlines() if line.startswith("| ") and "rope" in line)
    assert f"0.3500 ± {statistics.stdev([0.34, 0.36]):.4f}" in rope
    report.write_csv(list(rows.values()), tmp_path / "results.csv")
    report.write_runs_csv(runs, tmp_path / "runs.csv")
    results = {r["variant"]: r for r in csv.DictReader(open(tmp_path / "results.csv"))}
    assert float(results["base"]["hellaswag/acc_norm"]) == pytest.approx(0.31)
    assert float(results["base"]["perplexity/ppl_std"]) == pytest.approx(statistics.stdev([11.0, 12.0]))
    assert [r["hellaswag/acc_norm"] for r in csv.DictReader(open(tmp_path / "runs.csv"))] == ["0.3", "0.32", "0.34", "0.36"]


def test_attention_stats_get_mean_columns_and_a_per_layer_plot_not_a_column_per_layer(tmp_path):
    sinks = {"mha": (0.6, 0.4), "gated": (0.1, 0.05)}  # (layer 0, layer 1)
    runs = [RunResult(name, 1, f"{name}-s1", "finished", summary={
        "final_val_loss": 2.0, "attention_stats/sink_mass": sum(s) / 2,
        **{f"attention_stats/L{i}/sink_mass": x for i, x in enumerate(s)},
        **{f"attention_stats/L{i}/entropy": 1.0 + i for i in range(2)}}) for name, s in sinks.items()]
    rows = report.summarize([VariantInfo(n) for n in sinks], runs, baseline="mha")
    assert list(rows[0]["evals"]) == ["attention_stats/sink_mass"]
    assert rows[1]["evals"]["attention_stats/sink_mass"][0] == pytest.approx(0.075)
    assert report.plot_layer_metrics(rows, runs, tmp_path / "attention.png")
    assert (tmp_path / "attention.png").stat().st_size > 1000
    assert not report.plot_layer_metrics(rows, [RunResult("mha", 1, "x", "finished", summary={"final_val_loss": 2.0})],
                                         tmp_path / "none.png")
