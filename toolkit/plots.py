"""Plots of a run's ``metrics.jsonl``: losses, and learning rate / gradient norm / throughput.

Figures are drawn with matplotlib's object API on an Agg canvas (no pyplot, no global backend
switch), so importing this module or calling it from a training process has no side effects.
"""
from __future__ import annotations

import math
from pathlib import Path

from . import safeio


def read_metrics(path: str | Path) -> tuple[list[dict], list[dict]]:
    """The ``train`` and ``eval`` lines of a metrics.jsonl file (a half-written last line is skipped)."""
    train, evals = [], []
    for row in safeio.read_jsonl(path):
        if row.get("type") == "train":
            train.append(row)
        elif row.get("type") == "eval":
            evals.append(row)
    return train, evals


def _finite(xs, ys):
    pairs = [(x, y) for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _ema(values: list[float], beta: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average (as TensorBoard's smoothing)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta**i))
    return out


def _figure(nrows: int = 1, height: float = 4.5):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, height * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _log_axis(ax, values: list[float]) -> None:
    """Log scale with plain-number ticks when the values are positive and span a useful range."""
    from matplotlib.ticker import FuncFormatter

    if values and min(values) > 0 and max(values) / min(values) > 1.5:
        ax.set_yscale("log")
        plain = FuncFormatter(lambda y, _: f"{y:g}")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)


def evaluator_metrics(evals: list[dict]) -> list[str]:
    """The evaluator metrics of eval lines (``<label>/<metric>``), in the order they first appear."""
    return list(dict.fromkeys(k for row in evals for k in row if "/" in k))


def plot_losses(metrics_path: str | Path, out_png: str | Path, title: str | None = None) -> Path:
    """losses.png: :func:`losses_figure` of a metrics.jsonl."""
    out_png = Path(out_png)
    losses_figure(metrics_path, title).savefig(out_png, dpi=110)
    return out_png


def losses_figure(metrics_path: str | Path, title: str | None = None):
    """Train loss per step (raw and smoothed) and the evaluated train/val losses vs step, and below
    them a panel for each evaluator metric (``hellaswag/acc_norm``...) vs step."""
    train, evals = read_metrics(metrics_path)
    metrics = evaluator_metrics(evals)
    rows = -(-len(metrics) // 2)  # two metric panels a row
    fig = _figure()
    if metrics:
        fig.set_size_inches(9, 4.5 + 2.6 * rows)
        grid = fig.add_gridspec(1 + rows, 2, height_ratios=[4.5] + [2.6] * rows)
        ax = fig.add_subplot(grid[0, :])
        for i, key in enumerate(metrics):
            _plot_metric(fig.add_subplot(grid[1 + i // 2, i % 2]), evals, key)
    else:
        ax = fig.add_subplot()
    steps, loss = _finite([r["step"] for r in train], [r.get("loss") for r in train])
    shown = list(loss)
    window = min(100, len(loss) // 40)  # smooth over ~1/40 of the run: readable, and not lagging
    if loss and window >= 3:
        ax.plot(steps, loss, color="tab:blue", alpha=0.25, linewidth=0.8, label="train loss (per step)")
        ax.plot(steps, _ema(loss, 1 - 1 / window), color="tab:blue", linewidth=1.5,
                label=f"train loss (smoothed over ~{window} steps)")
    elif loss:
        ax.plot(steps, loss, color="tab:blue", alpha=0.6, linewidth=1.0, label="train loss (per step)")
    for key, color, label in (("train_loss", "tab:orange", "eval: train"), ("val_loss", "tab:red", "eval: val")):
        xs, ys = _finite([r["step"] for r in evals], [r.get(key) for r in evals])
        if ys:
            ax.plot(xs, ys, "o-", color=color, markersize=3.5, linewidth=1.5, label=f"{label} ({ys[-1]:.4f})")
            shown += ys
    _log_axis(ax, shown)
    best = [r["val_loss"] for r in evals if r.get("val_loss") is not None and math.isfinite(r["val_loss"])]
    heading = f"{title}: loss" if title else "loss"
    if best:
        heading += f" (best val {min(best):.4f})"
    ax.set_title(heading)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(True, which="both", alpha=0.3)
    if shown:
        ax.legend(loc="upper right")
    return fig


def _plot_metric(ax, evals: list[dict], key: str) -> None:
    """One evaluator metric vs step, its last value in the title."""
    xs, ys = _finite([r["step"] for r in evals], [r.get(key) for r in evals])
    if ys:
        ax.plot(xs, ys, "o-", color="tab:green", markersize=3.5, linewidth=1.5)
    ax.set_title(f"{key} ({ys[-1]:.4f})" if ys else key, fontsize=10)
    ax.set_xlabel("optimizer step")
    ax.grid(True, alpha=0.3)


def plot_summary(metrics_path: str | Path, out_png: str | Path, title: str | None = None) -> Path:
    """Panels vs step: learning rate, gradient norm (before clipping), tokens/s, and when the run has them
    the auxiliary losses (``aux/*``, smoothed) and each component metric (``mlp/expert_load_max``...)."""
    train, _ = read_metrics(metrics_path)
    keys = list(dict.fromkeys(k for r in train for k in r if "/" in k))
    aux = [k for k in keys if k.startswith("aux/")]
    metrics = [k for k in keys if not k.startswith("aux/")]
    panels = [("lr", "learning rate", "tab:green", False), ("grad_norm", "gradient norm", "tab:purple", True),
              ("tokens_per_s", "tokens/s", "tab:blue", False)] + [(k, k, "tab:brown", False) for k in metrics]
    fig = _figure(nrows=len(panels) + bool(aux), height=2.6)
    axes = list(fig.subplots(len(panels) + bool(aux), 1, sharex=True))
    for ax, (key, label, color, log) in zip(axes, panels):
        xs, ys = _finite([r["step"] for r in train if key in r], [r.get(key) for r in train if key in r])
        if ys:
            ax.plot(xs, ys, color=color, linewidth=1.0, marker="." if len(ys) < 50 else None)
            if log:
                _log_axis(ax, ys)
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    if aux:  # the terms a component adds to the objective, each summed over layers
        ax = axes[-1]
        for key in aux:
            xs, ys = _finite([r["step"] for r in train if key in r], [r.get(key) for r in train if key in r])
            if ys:
                ax.plot(xs, _ema(ys), linewidth=1.0, label=key)
        ax.set_ylabel("auxiliary losses")
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    heading = "schedule, throughput and components" if len(axes) > 3 else "schedule and throughput"
    axes[0].set_title(f"{title}: {heading}" if title else heading)
    axes[-1].set_xlabel("optimizer step")
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=110)
    return out_png
