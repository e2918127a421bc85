"""Plots of a run's ``metrics.jsonl``: losses, and learning rate / gradient norm / throughput.

Figures are drawn with matplotlib's object API on an Agg canvas (no pyplot, no global backend
switch), so importing this module or calling it from a training process has no side effects.
"""
from __future__ import annotations

import json
import math
from pathlib import Path


def read_metrics(path: str | Path) -> tuple[list[dict], list[dict]]:
    """The ``train`` and ``eval`` lines of a metrics.jsonl file (a half-written last line is skipped)."""
    train, evals = [], []
    for line in Path(path).read_bytes().decode("utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(row, dict):  # a damaged line that happens to be JSON
            continue
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


def plot_losses(metrics_path: str | Path, out_png: str | Path, title: str | None = None) -> Path:
    """Train loss per step (raw and smoothed) and the evaluated train/val losses, vs step."""
    train, evals = read_metrics(metrics_path)
    fig = _figure()
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
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=110)
    return out_png


def plot_summary(metrics_path: str | Path, out_png: str | Path, title: str | None = None) -> Path:
    """Three panels vs step: learning rate, gradient norm (before clipping), tokens/s."""
    train, _ = read_metrics(metrics_path)
    fig = _figure(nrows=3, height=2.6)
    axes = fig.subplots(3, 1, sharex=True)
    panels = (("lr", "learning rate", "tab:green", False), ("grad_norm", "gradient norm", "tab:purple", True),
              ("tokens_per_s", "tokens/s", "tab:blue", False))
    for ax, (key, label, color, log) in zip(axes, panels):
        xs, ys = _finite([r["step"] for r in train], [r.get(key) for r in train])
        if ys:
            ax.plot(xs, ys, color=color, linewidth=1.0)
            if log:
                _log_axis(ax, ys)
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_title(f"{title}: schedule and throughput" if title else "schedule and throughput")
    axes[-1].set_xlabel("optimizer step")
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=110)
    return out_png
