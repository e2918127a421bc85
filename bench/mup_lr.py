"""Does the best learning rate transfer across width? A sweep at two widths, standard against mup.

    python bench/mup_lr.py [recipes/gpt-cpu.toml] [--widths 32,128] [--lrs 2**-12..2**-5] [--steps 300]
                           [--json bench/results/mup-lr-cpu.json] [--plot docs/img/mup-lr.png]

Trains the recipe's model at each width and learning rate with its own optimizer and schedule (a
plain torch loop, no DeepSpeed), on the same batches in the same order, and reports the validation
loss at the end. mup's base width is the narrowest, so there standard and mup are one model (trained
once). Yang et al. 2021 ("Tensor Programs V", fig. 1): under mup the loss-vs-lr curves of the widths
share their minimum; under standard the wider model's optimum moves to a smaller lr.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script from anywhere
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import attrs  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from toolkit.coordcheck import corpus_tokens, sample_batches  # noqa: E402
from toolkit.errors import ConfigError, UserError  # noqa: E402
from toolkit.families import SPEC_TYPES  # noqa: E402
from toolkit.model import Transformer  # noqa: E402
from toolkit.recipe import load_recipe, registry_of  # noqa: E402


def train_once(recipe, registry, width, parametrization, lr, train_batches, val_batches, seed=0) -> float:
    """Validation loss after training at ``width`` and peak ``lr`` over ``train_batches``."""
    torch.manual_seed(seed)
    model = Transformer(attrs.evolve(recipe.model, n_embd=width, parametrization=parametrization), registry)
    train = attrs.evolve(recipe.train, lr=lr, min_lr=lr / 10, max_steps=len(train_batches),
                         warmup_steps=min(recipe.train.warmup_steps, len(train_batches) // 10), decay_steps=None)
    run = attrs.evolve(recipe, train=train)
    optimizer = registry.build_in("optimizer", recipe.train.optimizer, model, run)
    schedule = registry.build_in("schedule", recipe.train.schedule, train)
    peaks = [g["lr"] for g in optimizer.param_groups]  # each group's own peak (mup: hidden matrices lower)
    model.train()
    for step, (x, y) in enumerate(train_batches):
        for group, peak in zip(optimizer.param_groups, peaks):  # the schedule scales every group alike
            group["lr"] = peak * schedule(step) / lr
        _, loss = model(x, y)
        if not math.isfinite(loss.item()):
            return float("nan")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if train.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        optimizer.step()
    model.eval()
    with torch.no_grad():
        losses = [F.cross_entropy(model(x)[0].flatten(0, 1), y.flatten()).item() for x, y in val_batches]
    return sum(losses) / len(losses)


def plot(result: dict, path: str | Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.4, 3.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    lrs = result["lrs"]
    for ax, p in zip(axes, ("standard", "mup")):
        for w, color in zip(result["widths"], ("tab:blue", "tab:orange", "tab:green", "tab:red")):
            losses = result["loss"][p][str(w)]
            ax.plot(lrs, losses, marker="o", color=color, label=f"width {w}")
            finite = [(v, lr) for v, lr in zip(losses, lrs) if math.isfinite(v)]
            best = min(finite)
            ax.plot([best[1]], [best[0]], marker="*", markersize=14, color=color)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{p}: val loss after {result['steps']} steps", fontsize=10)
        ax.set_xlabel("learning rate")
    axes[0].set_ylabel("validation loss")
    axes[0].legend(fontsize=8)
    finite = [v for p in result["loss"].values() for vs in p.values() for v in vs if math.isfinite(v)]
    axes[0].set_ylim(min(finite) - 0.05, min(max(finite), min(finite) + 1.2) + 0.05)
    fig.savefig(path, dpi=80)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe", nargs="?", default="recipes/gpt-cpu.toml")
    ap.add_argument("--widths", default="32,128")
    ap.add_argument("--lrs", default=",".join(f"{2.0 ** e:g}" for e in range(-12, -4)),
                    help="peak learning rates (default 2^-12 .. 2^-5)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--layers", type=int, default=2, help="model.n_layer for the sweep (default 2)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--val-batches", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0, help="the models' init and the training batches' order")
    ap.add_argument("--json", default=None, help="write the numbers here")
    ap.add_argument("--plot", default=None, help="write the plot here")
    args = ap.parse_args(argv)
    widths = [int(w) for w in args.widths.split(",")]
    lrs = [float(x) for x in args.lrs.split(",")]
    try:
        recipe = load_recipe(args.recipe, [f"model.n_layer={args.layers}"])
        registry = registry_of(recipe)
        tokens = corpus_tokens(recipe, registry)
    except ConfigError as exc:
        print("\n".join(f"error: {line}" for line in exc.lines), file=sys.stderr)
        return 2
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cut = int(len(tokens) * 0.9)  # the last 10% of the text is for validation only
    T = recipe.model.block_size
    train_batches = sample_batches(tokens[:cut], args.steps, args.batch, T, seed=1 + args.seed)
    val_batches = sample_batches(tokens[cut:], args.val_batches, args.batch, T, seed=2)
    spec = SPEC_TYPES["parametrization"]
    kinds = {"standard": spec("standard"), "mup": spec("mup", {"base_width": widths[0]})}
    result = {"recipe": args.recipe, "widths": widths, "lrs": lrs, "steps": args.steps, "n_layer": args.layers,
              "batch": args.batch, "block_size": T, "seed": args.seed, "base_width": widths[0],
              "loss": {p: {} for p in kinds}}
    start = time.perf_counter()
    for w in widths:
        for p, chosen in kinds.items():
            if p == "mup" and w == widths[0]:  # the base width: mup is the standard model
                result["loss"]["mup"][str(w)] = result["loss"]["standard"][str(w)]
                continue
            losses = []
            for lr in lrs:
                losses.append(train_once(recipe, registry, w, chosen, lr, train_batches, val_batches, args.seed))
                print(f"{p:9} width {w:4}  lr {lr:<10g} val loss {losses[-1]:.4f}  "
                      f"({time.perf_counter() - start:.0f} s)", flush=True)
            result["loss"][p][str(w)] = losses
    for p in kinds:
        best = {w: lrs[min(range(len(lrs)), key=lambda i, w=w: _key(result["loss"][p][str(w)][i]))] for w in widths}
        result.setdefault("best_lr", {})[p] = {str(w): lr for w, lr in best.items()}
        print(f"{p:9} best lr: " + ", ".join(f"width {w}: {lr:g}" for w, lr in best.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.plot:
        plot(result, args.plot)
    return 0


def _key(v: float) -> float:
    return v if math.isfinite(v) else float("inf")


if __name__ == "__main__":
    sys.exit(main())
