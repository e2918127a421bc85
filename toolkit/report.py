"""Ablation reports: one table, two CSV files and two plots from a folder of runs.

Input is what the trainer leaves in each run folder (``summary.json``, and the ``eval`` lines of
``metrics.jsonl``) plus what the ablation runner knows (variant, seed, the keys that differ from the
baseline, parameters and FLOPs per token, and why a run failed). Output, in the ablation folder:

- ``report.md``: one row per variant, ranked by mean final validation loss;
- ``results.csv``: the same rows as numbers; ``runs.csv``: one row per (variant, seed) run;
- ``curves.png``: validation loss against tokens seen (mean over seeds, band from min to max);
- ``tradeoff.png``: final validation loss against FLOPs per token (or parameters when FLOPs are equal);
- ``attention.png``: when runs log ``attention_stats``, its sink mass, entropy and mean distance per
  layer, one line per variant (the means over layers are columns of the table).
- ``scaling.png`` and a section of report.md, for a size sweep: final val loss against training FLOPs,
  power-law fits with seed-bootstrap intervals, crossings and a verdict per variant (:mod:`toolkit.scaling`).

Statistics over seeds are the mean and the sample standard deviation (n - 1); a variant counts as
finished when at least one of its seeds finished, and failed seeds are named in the report. Each
variant's difference from the baseline gets a 95% Welch t interval (unequal variances), a verdict
(ahead, behind, within noise) and, when within noise, the seeds per variant that would resolve it.
"""
from __future__ import annotations

import csv
import math
import re
import statistics
from pathlib import Path
from typing import Any, Sequence

import attrs
import numpy as np

from . import safeio, scaling

STATUS_ORDER = ("finished", "partial", "running", "pending", "interrupted", "failed")
CONFIDENCE = 0.95
MAX_SEEDS = 1000  # seeds_to_resolve looks no further: a gap that needs more is not one to chase with seeds


@attrs.frozen
class VariantInfo:
    """What the report says about a variant before any of its runs: its differences, size and cost."""

    name: str
    diff: tuple[str, ...] = ()  # "key=value" for each setting that differs from the baseline
    params: int | None = None
    flops_per_token: int | None = None
    # in a size sweep: the variant this is one rung of ("rope" for "rope@w64"), and the rung
    group: str | None = None
    rung: str | None = None


@attrs.frozen
class RunResult:
    """One (variant, seed) run: its status, the trainer's summary and its validation curve."""

    variant: str
    seed: int
    run_dir: str
    status: str  # finished | failed | interrupted | running | pending
    summary: dict = attrs.Factory(dict)
    evals: tuple[tuple[int, float], ...] = ()  # (tokens seen, val loss)
    error: str | None = None


def read_evals(metrics_path: str | Path) -> tuple[tuple[int, float], ...]:
    """(tokens, val_loss) of every ``eval`` line of a metrics.jsonl; a half-written last line is skipped."""
    path = Path(metrics_path)
    if not path.is_file():
        return ()
    try:
        rows = safeio.read_jsonl(path)
    except OSError:
        return ()
    return tuple((int(r["tokens"]), float(r["val_loss"])) for r in rows
                 if r.get("type") == "eval" and _is_number(r.get("val_loss")))


def read_run(variant: str, seed: int, run_dir: str | Path, status: str = "pending",
             error: str | None = None) -> RunResult:
    """A run as its folder shows it; the folder's summary.json status wins over ``status``."""
    run_dir = Path(run_dir)
    summary: dict = {}
    try:
        summary = safeio.read_json(run_dir / "summary.json")
    except (OSError, ValueError):
        pass
    summary = summary if isinstance(summary, dict) else {}
    if summary.get("status"):
        status = str(summary["status"])
    if status != "finished" and error is None and summary.get("error"):
        error = str(summary["error"])
    return RunResult(variant, seed, str(run_dir), status, summary, read_evals(run_dir / "metrics.jsonl"), error)


# -- aggregation -------------------------------------------------------------------------------
def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if _is_number(v)]
    if not values:
        return None, None
    std = statistics.stdev(values) if len(values) > 1 else None
    return statistics.fmean(values), std


def _mean(values) -> float | None:
    return _mean_std(list(values))[0]


# -- the difference from the baseline ------------------------------------------------------------
@attrs.frozen
class Comparison:
    """A variant's mean final val loss against the baseline's: Welch interval, verdict, seeds to resolve."""

    diff: float  # mean_variant - mean_baseline (negative: the variant is ahead)
    verdict: str  # ahead | behind | within noise | 1 seed: no interval
    ci_low: float | None = None
    ci_high: float | None = None
    df: float | None = None  # Welch-Satterthwaite degrees of freedom; None for zero spread or no interval
    seeds_to_resolve: int | None = None  # only for "within noise"; None when no n up to MAX_SEEDS does it


def _stats():
    from scipy import stats  # imported here: scipy is slow to import and only reports need it

    return stats


def _t_quantile(df):
    """Two-sided CONFIDENCE quantile of Student's t at ``df`` (a float or an array)."""
    return _stats().t.ppf(0.5 + CONFIDENCE / 2, df)


def seeds_to_resolve(gap: float, std_a: float, std_b: float, cap: int = MAX_SEEDS) -> int | None:
    """Smallest n (seeds per variant, both sides) for which the Welch interval of a ``gap`` at the
    observed spreads excludes 0: t(df(n)) * sqrt((s_a^2 + s_b^2) / n) < |gap|; None if gap is 0 or n > cap."""
    gap = abs(gap)
    va, vb = std_a ** 2, std_b ** 2
    if gap == 0:
        return None
    if va + vb == 0:
        return 2  # no spread at all: any two seeds each show the gap
    n = np.arange(2, cap + 1)
    # with n seeds on both sides Welch's df is (n - 1) (va + vb)^2 / (va^2 + vb^2), between n - 1 and 2n - 2
    df = (n - 1) * (va + vb) ** 2 / (va ** 2 + vb ** 2)
    ok = np.nonzero(_t_quantile(df) * np.sqrt((va + vb) / n) < gap)[0]
    return int(n[ok[0]]) if len(ok) else None


def compare(values: Sequence[float], base_values: Sequence[float]) -> Comparison:
    """Welch's t interval (Welch 1947) of mean(values) - mean(base_values), and what it says.

    Welch rather than Student's pooled t because a variant need not share the baseline's spread (in
    docs/ablations.md geglu's final losses scatter five times wider over seeds than gelu's)."""
    n_a, n_b = len(values), len(base_values)
    diff = statistics.fmean(values) - statistics.fmean(base_values)
    if n_a < 2 or n_b < 2:
        return Comparison(diff, "1 seed: no interval")
    s_a, s_b = statistics.stdev(values), statistics.stdev(base_values)
    if s_a == s_b == 0:  # no spread: the interval is the point (scipy's would be nan)
        lo = hi = diff
        df = None
    else:
        test = _stats().ttest_ind(values, base_values, equal_var=False)
        ci = test.confidence_interval(CONFIDENCE)
        lo, hi, df = float(ci.low), float(ci.high), float(test.df)
    if hi < 0:
        return Comparison(diff, "ahead", lo, hi, df)
    if lo > 0:
        return Comparison(diff, "behind", lo, hi, df)
    return Comparison(diff, "within noise", lo, hi, df, seeds_to_resolve(diff, s_a, s_b))


#: a per-layer evaluator metric, ``attention_stats/L3/sink_mass``: plotted by layer, not a column
PER_LAYER = re.compile(r"^(?P<label>[^/]+)/L(?P<layer>\d+)/(?P<stat>[^/]+)$")


def evaluator_metrics(runs: Sequence[RunResult]) -> list[str]:
    """The evaluator metrics (``hellaswag/acc_norm``...) any finished run's summary reports, in first-seen
    order; per-layer ones (``label/L3/stat``) are left to :func:`plot_layer_metrics`."""
    return list(dict.fromkeys(k for r in runs if r.status == "finished"
                              for k, v in r.summary.items() if "/" in k and _is_number(v) and not PER_LAYER.match(k)))


def summarize(variants: Sequence[VariantInfo], runs: Sequence[RunResult], baseline: str | None) -> list[dict]:
    """One row per variant (in the order given): losses and evaluator metrics as mean and std over its
    finished seeds, delta of the mean final val loss against the baseline's with its Welch interval,
    verdict and seeds to resolve, and rank by mean final val loss (1 = best). In a size sweep each
    rung's variants are compared with the baseline at the same rung."""
    rows = []
    metrics = evaluator_metrics(runs)
    finals: dict[str, list[float]] = {}  # each variant's final val losses over its finished seeds
    for v in variants:
        mine = [r for r in runs if r.variant == v.name]
        done = [r for r in mine if r.status == "finished"]
        failed = [r for r in mine if r.status == "failed"]
        if done and len(done) == len(mine):
            status = "finished"
        elif done:
            status = "partial"
        elif mine and len(failed) == len(mine):
            status = "failed"
        else:
            status = next((s for s in STATUS_ORDER if any(r.status == s for r in mine)), "pending")
        finals[v.name] = [x for x in (r.summary.get("final_val_loss") for r in done) if _is_number(x)]
        final_m, final_s = _mean_std(finals[v.name])
        best_m, best_s = _mean_std([r.summary.get("best_val_loss") for r in done])
        errors = [f"seed {r.seed}: {r.error or 'no error recorded'}" for r in mine if r.status == "failed"]
        rows.append(dict(
            variant=v.name,
            baseline=(v.group if v.group is not None else v.name) == baseline,
            status=status,
            seeds_finished=len(done),
            seeds_total=len(mine),
            diff="; ".join(v.diff),
            params=v.params,
            flops_per_token=v.flops_per_token,
            final_val_loss=final_m,
            final_val_loss_std=final_s,
            best_val_loss=best_m,
            best_val_loss_std=best_s,
            delta_final_val_loss=None,
            ci_low=None,
            ci_high=None,
            welch_df=None,
            verdict=None,
            seeds_to_resolve=None,
            final_train_loss=_mean(r.summary.get("final_train_loss") for r in done),
            tokens=_mean(r.summary.get("tokens") for r in done),
            tokens_per_s=_mean(r.summary.get("tokens_per_s") for r in done),
            peak_mem_bytes=_mean(r.summary.get("peak_mem_bytes") for r in done),
            wall_s=_mean(r.summary.get("wall_s") for r in done),
            rank=None,
            error=" | ".join(errors),
            evals={k: _mean_std([r.summary.get(k) for r in done]) for k in metrics},  # final values: (mean, std)
        ))
    rung_of = {v.name: v.rung for v in variants}
    bases = {rung_of[r["variant"]]: r for r in rows if r["baseline"]}
    for r in rows:
        base = bases.get(rung_of[r["variant"]])
        if base is not None and base["final_val_loss"] is not None:
            if r["final_val_loss"] is None:
                continue
            r["delta_final_val_loss"] = r["final_val_loss"] - base["final_val_loss"]
            if r is base:
                r["verdict"] = "baseline"
                continue
            c = compare(finals[r["variant"]], finals[base["variant"]])
            r.update(ci_low=c.ci_low, ci_high=c.ci_high, welch_df=c.df, verdict=c.verdict,
                     seeds_to_resolve=c.seeds_to_resolve)
    ranked = sorted((r for r in rows if r["final_val_loss"] is not None), key=lambda r: r["final_val_loss"])
    for i, r in enumerate(ranked, 1):
        r["rank"] = i
    return rows


# -- formatting --------------------------------------------------------------------------------
def si(n: float | None, unit: str = "") -> str:
    """1234567 -> '1.23M' (three significant digits)."""
    if n is None:
        return "–"
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.3g}{suffix}{unit}"
    return f"{n:.3g}{unit}"


def _bytes(n: float | None) -> str:
    if n is None:
        return "–"
    for div, suffix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= div:
            return f"{n / div:.3g} {suffix}"
    return f"{n:.0f} B"


def _duration(s: float | None) -> str:
    if s is None:
        return "–"
    if s < 90:
        return f"{s:.0f}s"
    m, s = divmod(round(s), 60)
    if m < 90:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


def _loss(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "–"
    return f"{mean:.4f} ± {std:.4f}" if std is not None else f"{mean:.4f}"


def _interval(lo: float | None, hi: float | None) -> str:
    return "–" if lo is None or hi is None else f"[{lo:+.4f}, {hi:+.4f}]"


def _seeds(row: dict) -> str:
    """'≥ N seeds' for a within-noise row, '—' when no sane number resolves it, '–' otherwise."""
    if row["verdict"] != "within noise":
        return "–"
    n = row["seeds_to_resolve"]
    return "—" if n is None else f"≥ {n} seeds"


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _ordered(rows: list[dict]) -> list[dict]:
    """Ranked variants first (best first), then the others in their given order."""
    ranked = sorted((r for r in rows if r["rank"] is not None), key=lambda r: r["rank"])
    return ranked + [r for r in rows if r["rank"] is None]


def render_markdown(rows: list[dict], runs: Sequence[RunResult], *, title: str, header: Sequence[str] = (),
                    plots: Sequence[str] = ()) -> str:
    """The report as Markdown: the ranked table, failed runs with their last error line, the plots."""
    n_seeds = max((r["seeds_total"] for r in rows), default=0)
    lines = [f"# Ablation: {title}", ""]
    lines += [f"- {h}" for h in header]
    if header:
        lines.append("")
    metrics = list(rows[0].get("evals", {})) if rows else []
    lines += [
        "| rank | variant | differs from baseline | params | FLOPs/token | final val loss | best val loss "
        + "".join(f"| {_md(k)} " for k in metrics)
        + "| Δ final vs baseline | 95% CI of Δ | verdict | seeds to resolve | tokens/s | peak mem | wall |",
        "|---:|---|---|---:|---:|---:|---:" + "|---:" * len(metrics) + "|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in _ordered(rows):
        name = f"**{r['variant']}** (baseline)" if r["baseline"] else r["variant"]
        if r["status"] != "finished":
            name += f" [{r['status']}{'' if r['status'] != 'partial' else ' ' + str(r['seeds_finished']) + '/' + str(r['seeds_total'])}]"
        diff = r["diff"] or ("–" if not r["baseline"] else "")
        delta = "" if r["delta_final_val_loss"] is None else f"{r['delta_final_val_loss']:+.4f}"
        if r["baseline"] and delta:
            delta = "0"
        lines.append("| " + " | ".join([
            str(r["rank"] or "–"), _md(name), _md(diff), si(r["params"]), si(r["flops_per_token"]),
            _loss(r["final_val_loss"], r["final_val_loss_std"]), _loss(r["best_val_loss"], r["best_val_loss_std"]),
            *(_loss(*r["evals"][k]) for k in metrics), delta or "–", _interval(r["ci_low"], r["ci_high"]), r["verdict"] or "–", _seeds(r),
            si(r["tokens_per_s"]), _bytes(r["peak_mem_bytes"]), _duration(r["wall_s"]),
        ]) + " |")
    lines.append("")
    seeds_note = f"mean ± std over {n_seeds} seeds (sample std)" if n_seeds > 1 else "from one seed"
    lines.append(f"Losses are {seeds_note}; rank and Δ use the mean final val loss (lower is better). "
                 "Parameters count every weight once (tied embeddings once); FLOPs/token are forward FLOPs "
                 "at the full context." + (" Evaluator columns (`label/metric`) are the final evaluation's values, "
                                           "mean ± std over the same seeds." if metrics else ""))
    if any(r["ci_low"] is not None for r in rows):
        lines.append("")
        lines.append(f"95% CI of Δ: Welch's t interval of the difference of mean final val loss over seeds "
                     "(unequal variances, Welch–Satterthwaite degrees of freedom). A variant is *ahead* when the "
                     "whole interval is below 0, *behind* when it is above 0, and *within noise* when it contains 0; "
                     "for those, *seeds to resolve* is the fewest seeds per variant (baseline too) at which the same "
                     f"gap at the same spread would exclude 0 (—: no gap, or more than {MAX_SEEDS} seeds).")
    failed = [r for r in runs if r.status in ("failed", "interrupted")]
    if failed:
        lines += ["", "## Runs that did not finish", ""]
        for r in failed:
            lines.append(f"- `{r.variant}` seed {r.seed} ({r.status}): {_md(r.error or 'no error recorded')} "
                         f"(`{r.run_dir}`)")
    waiting = [r for r in runs if r.status in ("pending", "running")]
    if waiting:
        lines += ["", f"{len(waiting)} run(s) not finished yet: " + ", ".join(f"{r.variant} s{r.seed}" for r in waiting)]
    for p in plots:
        lines += ["", f"![{Path(p).stem}]({p})"]
    return "\n".join(lines) + "\n"


CSV_FIELDS = ["rank", "variant", "baseline", "status", "seeds_finished", "seeds_total", "diff", "params",
              "flops_per_token", "final_val_loss", "final_val_loss_std", "best_val_loss", "best_val_loss_std",
              "delta_final_val_loss", "ci_low", "ci_high", "welch_df", "verdict", "seeds_to_resolve",
              "final_train_loss", "tokens", "tokens_per_s", "peak_mem_bytes", "wall_s", "error"]
RUN_FIELDS = ["variant", "seed", "status", "run_dir", "steps", "tokens", "final_train_loss", "final_val_loss",
              "best_val_loss", "tokens_per_s", "peak_mem_bytes", "wall_s", "error"]


def write_csv(rows: list[dict], path: str | Path) -> None:
    """results.csv: one row per variant, best first; empty cells where there is no number."""
    metrics = list(rows[0].get("evals", {})) if rows else []
    fields = CSV_FIELDS[:-1] + [f for k in metrics for f in (k, f"{k}_std")] + CSV_FIELDS[-1:]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fields, extrasaction="ignore")
        w.writeheader()
        for r in _ordered(rows):
            evals = {f: v for k, (m, sd) in r.get("evals", {}).items() for f, v in ((k, m), (f"{k}_std", sd))}
            w.writerow({k: "" if v is None else v for k, v in {**r, **evals}.items() if k in fields})


def write_runs_csv(runs: Sequence[RunResult], path: str | Path) -> None:
    """runs.csv: one row per (variant, seed) run, straight from its summary."""
    fields = RUN_FIELDS[:-1] + evaluator_metrics(runs) + RUN_FIELDS[-1:]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fields)
        w.writeheader()
        for r in runs:
            row = {k: r.summary.get(k, "") for k in fields}
            row.update(variant=r.variant, seed=r.seed, status=r.status, run_dir=r.run_dir, error=r.error or "")
            w.writerow({k: "" if v is None else v for k, v in row.items()})


# -- plots -------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(n: int):
    plt = _pyplot()
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def mean_curve(runs: Sequence[RunResult]) -> tuple[list[int], list[float], list[float], list[float]]:
    """tokens, mean, min, max of val loss over the given runs, at every token count any of them evaluated."""
    by_tokens: dict[int, list[float]] = {}
    for r in runs:
        for tokens, loss in r.evals:
            by_tokens.setdefault(tokens, []).append(loss)
    xs = sorted(by_tokens)
    return (xs, [statistics.fmean(by_tokens[x]) for x in xs], [min(by_tokens[x]) for x in xs],
            [max(by_tokens[x]) for x in xs])


def plot_curves(rows: list[dict], runs: Sequence[RunResult], path: str | Path, title: str = "") -> bool:
    """curves.png: val loss against tokens, one line per variant (legend best first); False if no data."""
    plt = _pyplot()
    order = _ordered(rows)
    curves = []
    for r in order:
        xs, mean, lo, hi = mean_curve([x for x in runs if x.variant == r["variant"] and x.status == "finished"])
        if xs:
            curves.append((r, xs, mean, lo, hi))
    if not curves:
        return False
    fig, ax = plt.subplots(figsize=(8.5, 4.4), dpi=100)
    colors = _colors(len(rows))
    color_of = {r["variant"]: colors[i] for i, r in enumerate(rows)}
    for r, xs, mean, lo, hi in curves:
        c = color_of[r["variant"]]
        label = f"{r['variant']}{' (baseline)' if r['baseline'] else ''}  {r['final_val_loss']:.3f}"
        ax.plot(xs, mean, color=c, lw=2.4 if r["baseline"] else 1.5, ls="--" if r["baseline"] else "-", label=label)
        if any(h != l for h, l in zip(hi, lo)):
            ax.fill_between(xs, lo, hi, color=c, alpha=0.18, lw=0)
    # Zoom on the part of training where variants separate: the first evaluations (loss near ln(vocab))
    # would otherwise squash every difference into a few pixels.
    last = max(xs[-1] for _, xs, *_ in curves)
    late = [v for _, xs, _, lo, hi in curves for x, l, h in zip(xs, lo, hi) if x >= 0.2 * last for v in (l, h)]
    if len(late) >= 2 * len(curves) * 2:
        bottom, top = min(late), max(late)
        pad = 0.08 * (top - bottom or 1.0)
        ax.set_ylim(bottom - pad, top + pad)
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("validation loss")
    ax.set_title(title or "validation loss")
    ax.grid(alpha=0.3)
    # outside the axes, best first: it never hides a curve, and reads as the ranking
    ax.legend(title="variant  final val loss", fontsize=8, title_fontsize=8, loc="upper left",
              bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda x, _: si(x)))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_tradeoff(rows: list[dict], path: str | Path, title: str = "") -> bool:
    """tradeoff.png: final val loss (± std) against FLOPs per token, or parameters when FLOPs barely differ."""
    plt = _pyplot()
    pts = [r for r in rows if r["final_val_loss"] is not None]
    if not pts:
        return False
    key, xlabel = "flops_per_token", "forward FLOPs per token"
    flops = [r["flops_per_token"] for r in pts if r["flops_per_token"]]
    if not flops or max(flops) <= 1.01 * min(flops):
        key, xlabel = "params", "parameters"
    pts = [r for r in pts if r[key] is not None]
    if not pts:
        return False
    fig, ax = plt.subplots(figsize=(6.5, 4.4), dpi=110)
    colors = _colors(len(rows))
    color_of = {r["variant"]: colors[i] for i, r in enumerate(rows)}
    # labels alternate sides, in order of loss, so points at the same x stay readable
    for i, r in enumerate(sorted(pts, key=lambda r: r["final_val_loss"])):
        c = color_of[r["variant"]]
        ax.errorbar(r[key], r["final_val_loss"], yerr=r["final_val_loss_std"] or 0.0, fmt="*" if r["baseline"] else "o",
                    ms=11 if r["baseline"] else 7, color=c, capsize=3)
        side = 1 if i % 2 == 0 else -1
        ax.annotate(r["variant"] + (" (baseline)" if r["baseline"] else ""), (r[key], r["final_val_loss"]),
                    xytext=(8 * side, 0), textcoords="offset points", fontsize=8, va="center",
                    ha="left" if side > 0 else "right")
    xs = [r[key] for r in pts]
    span = (max(xs) - min(xs)) or max(xs) * 0.1 or 1.0
    ax.set_xlim(min(xs) - 0.35 * span, max(xs) + 0.35 * span)
    ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda x, _: si(x)))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("final validation loss")
    ax.set_title(title or f"final val loss vs {xlabel}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_layer_metrics(rows: list[dict], runs: Sequence[RunResult], path: str | Path, title: str = "") -> bool:
    """attention.png: each per-layer evaluator statistic (sink mass, entropy, distance) against the layer,
    one line per variant (mean over its finished seeds); False when no run logged any."""
    values: dict[tuple[str, str], dict[str, dict[int, list[float]]]] = {}  # (label, stat) -> variant -> layer -> values
    for r in runs:
        if r.status != "finished":
            continue
        for key, v in r.summary.items():
            m = PER_LAYER.match(key)
            if m and _is_number(v):
                values.setdefault((m["label"], m["stat"]), {}).setdefault(r.variant, {}).setdefault(
                    int(m["layer"]), []).append(float(v))
    if not values:
        return False
    plt = _pyplot()
    panels = sorted(values)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), dpi=100, squeeze=False)
    colors = _colors(len(rows))
    color_of = {r["variant"]: colors[i] for i, r in enumerate(rows)}
    for ax, (label, stat) in zip(axes[0], panels):
        for variant, by_layer in values[(label, stat)].items():
            layers = sorted(by_layer)
            ax.plot(layers, [statistics.fmean(by_layer[i]) for i in layers], marker="o", label=variant,
                    color=color_of.get(variant))
        ax.set_xticks(sorted({i for by_layer in values[(label, stat)].values() for i in by_layer}))
        ax.set_xlabel("layer")
        ax.set_title(f"{label}/{stat}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title or "attention statistics per layer", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def write_report(out_dir: str | Path, variants: Sequence[VariantInfo], runs: Sequence[RunResult], *,
                 baseline: str | None, title: str, header: Sequence[str] = ()) -> list[dict]:
    """Write report.md, results.csv, runs.csv, curves.png and tradeoff.png into ``out_dir``; return the rows."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = summarize(variants, runs, baseline)
    plots = []
    if plot_curves(rows, runs, out / "curves.png", title=f"{title}: validation loss"):
        plots.append("curves.png")
    if plot_tradeoff(rows, out / "tradeoff.png", title=f"{title}: loss vs cost"):
        plots.append("tradeoff.png")
    if plot_layer_metrics(rows, runs, out / "attention.png", title=f"{title}: attention statistics per layer"):
        plots.append("attention.png")
    write_csv(rows, out / "results.csv")
    write_runs_csv(runs, out / "runs.csv")
    text = render_markdown(rows, runs, title=title, header=header, plots=plots)
    if any(v.rung is not None for v in variants):
        points = scaling_points(variants, runs)
        analysis = scaling.analyse(points, baseline) if points else None
        plotted = analysis is not None and plot_scaling(analysis, points, out / "scaling.png", title=f"{title}: loss vs compute")
        text += render_scaling(analysis, points, baseline, plot="scaling.png" if plotted else None)
    (out / "report.md").write_text(text)
    return rows


# -- size sweeps -------------------------------------------------------------------------------
def scaling_points(variants: Sequence[VariantInfo], runs: Sequence[RunResult]) -> list[scaling.Point]:
    """One point per finished run of a sweep: its training FLOPs (3 x forward FLOPs per token x the tokens
    it trained) and final val loss."""
    info = {v.name: v for v in variants}
    out = []
    for r in runs:
        v = info.get(r.variant)
        loss, tokens = r.summary.get("final_val_loss"), r.summary.get("tokens")
        if r.status == "finished" and v and v.rung is not None and v.flops_per_token and _is_number(loss) and _is_number(tokens):
            out.append(scaling.Point(v.group, v.rung, r.seed, scaling.train_flops(v.flops_per_token, tokens), float(loss)))
    return out


def _rung_stats(points: Sequence[scaling.Point], variant: str):
    """compute, mean, min and max loss of each rung of ``variant``, by compute."""
    by_rung: dict[str, list[scaling.Point]] = {}
    for p in points:
        if p.variant == variant:
            by_rung.setdefault(p.rung, []).append(p)
    stats = [(statistics.fmean(p.compute for p in ps), statistics.fmean(p.loss for p in ps),
              min(p.loss for p in ps), max(p.loss for p in ps)) for ps in by_rung.values()]
    return [list(col) for col in zip(*sorted(stats))]


def plot_scaling(analysis: scaling.Analysis, points: Sequence[scaling.Point], path: str | Path, title: str = "") -> bool:
    """scaling.png: final val loss against training FLOPs on log-log axes, per variant the mean over seeds at
    each rung with a band from min to max, and its fitted curve over the compute it covers."""
    if not analysis.fits:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8.5, 4.6), dpi=100)
    colors = _colors(len(analysis.fits))
    for vf, c in zip(analysis.fits, colors):
        xs, mean, lo, hi = _rung_stats(points, vf.variant)
        b = f"b = {vf.fit.b:.3f}" + (f" [{vf.b_low:.3f}, {vf.b_high:.3f}]" if vf.b_low is not None else "")
        ax.plot(xs, mean, "o", color=c, label=f"{vf.variant}: {b}")
        if any(h != l for h, l in zip(hi, lo)):
            ax.fill_between(xs, lo, hi, color=c, alpha=0.18, lw=0)
        grid = np.logspace(math.log10(vf.c_min), math.log10(vf.c_max), 100)
        ax.plot(grid, vf.fit(grid), color=c, lw=1.5, ls="-")
    ax.set_xscale("log")
    ax.set_yscale("log")
    loss_ticks = plt.FuncFormatter(lambda y, _: f"{y:.3g}")  # plain losses, not 4.16 x 10^0
    ax.yaxis.set_major_formatter(loss_ticks)
    ax.yaxis.set_minor_formatter(loss_ticks)
    ax.set_xlabel("training FLOPs (3 x forward FLOPs per token x tokens)")
    ax.set_ylabel("final validation loss")
    ax.set_title(title or "loss vs compute")
    ax.grid(alpha=0.3, which="both")
    ax.legend(title="variant: exponent (95% CI)", fontsize=8, title_fontsize=8, loc="upper left",
              bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def _cross(c: float, lo: float, hi: float) -> str:
    if lo <= c <= hi:
        return f"{c:.3g} (within the sweep)"
    where = f"{c / hi:.3g} x past the largest" if c > hi else f"{lo / c:.3g} x below the smallest"
    return f"{c:.3g} (outside the sweep, {where} compute: an extrapolation of the fits, not measured)"


def render_scaling(analysis: scaling.Analysis | None, points: Sequence[scaling.Point], baseline: str | None,
                   plot: str | None) -> str:
    """The report's section on a size sweep: fits, exponent intervals, crossings and a verdict per variant."""
    lines = ["", "## Scaling: loss against training compute", ""]
    if analysis is None or not analysis.fits:
        lines.append("No variant has finished runs at two rungs yet: nothing to fit.")
        return "\n".join(lines) + "\n"
    lo = min(f.c_min for f in analysis.fits)
    hi = max(f.c_max for f in analysis.fits)
    boot = (f"{analysis.draws} bootstrap draws of the seeds (resampled within each rung, the same draw for every "
            "variant), percentile interval widened by sqrt(n/(n-1)) for n seeds" if analysis.draws
            else "no interval: one seed per rung")
    lines += [f"Compute C = 3 x forward FLOPs per token (the components' own counts, as `inspect`) x tokens trained, "
              f"from {lo:.3g} to {hi:.3g} FLOPs. Each variant is fitted to all its (rung, seed) final val losses, "
              f"L = a (C/C0)^-b + c, or a (C/C0)^-b when c is not resolved (C0: the geometric mean of its compute). "
              f"Exponent intervals: {boot}.", "",
              "| variant | rungs x seeds | form | a | b (exponent) | 95% CI of b | c | C0 | why this form |",
              "|---|---:|---|---:|---:|---:|---:|---:|---|"]
    for vf in analysis.fits:
        f = vf.fit
        ci = "–" if vf.b_low is None else f"[{vf.b_low:.4f}, {vf.b_high:.4f}]"
        c = f"{f.c:.4f}" if f.form == scaling.FULL else "–"
        name = f"**{vf.variant}** (baseline)" if vf.variant == baseline else vf.variant
        lines.append(f"| {_md(name)} | {vf.rungs} x {vf.seeds} | {f.form} | {f.a:.4f} | {f.b:.4f} | {ci} | {c} | "
                     f"{f.c0:.3g} | {_md(f.why or 'forced')} |")
    if analysis.trends:
        lines += ["", "| variant vs baseline | gap at smallest C | gap at largest C | 95% CI of the change | verdict | "
                      "fitted curves cross at C = |", "|---|---:|---:|---:|---|---|"]
        for t in analysis.trends:
            ci = "–" if t.change_low is None else f"[{t.change_low:+.4f}, {t.change_high:+.4f}]"
            cross = "; ".join(_cross(c, lo, hi) for c in t.crossings) or \
                "nowhere from 1/1000 of the smallest to 1000 x the largest compute"
            lines.append(f"| {_md(t.variant)} | {t.gap_lo:+.4f} at {t.c_lo:.3g} | {t.gap_hi:+.4f} at {t.c_hi:.3g} | "
                         f"{ci} | {t.verdict} | {cross} |")
        lines += ["", "Gap: the variant's fitted loss minus the baseline's at the same compute (negative: the variant is "
                      "ahead), at the smallest and largest compute both reached. The verdict reads the interval of its "
                      "change: *grows* or *shrinks* when the interval excludes 0, *constant* when it contains 0."]
    lines += ["", f"What this says holds within the sweep, {lo:.3g} to {hi:.3g} training FLOPs. A fit is a summary "
                  "of these points, not a law: past the largest rung it is an extrapolation, and a crossing outside "
                  "the sweep is where two extrapolations meet, not a measurement. The intervals cover seed noise "
                  "only, not the choice of form, the budget rule, or the learning rate left untuned across sizes."]
    if plot:
        lines += ["", f"![loss against compute]({plot})"]
    return "\n".join(lines) + "\n"
