"""One AdamW step: fused against foreach, on a recipe's parameters, side by side in one process.

    python bench/adamw.py [recipes/gpt-cpu.toml recipes/gpt2.toml ...] [--rounds 7] [--json FILE]

For each recipe, builds its model (fp32) with a gradient on every parameter and times
``optimizer.step()`` of ``torch.optim.AdamW`` three ways: ``foreach`` over the model's tensors
(what the optimizer plugin used on CPU before), ``fused`` over them (what it uses now), and both
over one flat fp32 tensor of every parameter, as DeepSpeed's ZeRO 1/2 optimizer hands it over.
The contenders alternate in rounds so that load on the machine slows them alike; each time is the
median over rounds. ``speedup`` is foreach's time over fused's.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script from anywhere
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from toolkit.errors import ConfigError  # noqa: E402
from toolkit.model import Transformer  # noqa: E402
from toolkit.probe import load_buildable  # noqa: E402
from toolkit.recipe import registry_of  # noqa: E402

LAYOUTS = ("per tensor", "one flat tensor")


def params_of(recipe, layout: str) -> list[torch.Tensor]:
    """The recipe's parameters with random gradients: the model's own tensors, or one flat copy of them."""
    torch.manual_seed(0)
    model = Transformer(recipe.model, registry_of(recipe)).to("cuda" if torch.cuda.is_available() else "cpu")
    params = [p for p in model.parameters()]
    if layout == "one flat tensor":
        params = [torch.nn.Parameter(torch.cat([p.detach().reshape(-1) for p in params]))]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    return params


def time_steps(opt: torch.optim.Optimizer, steps: int) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def bench(recipe, rounds: int, steps: int) -> list[dict]:
    rows = []
    for layout in LAYOUTS:
        opts = {impl: torch.optim.AdamW(params_of(recipe, layout), lr=1e-4, weight_decay=0.1, **{impl: True})
                for impl in ("foreach", "fused")}
        for opt in opts.values():
            time_steps(opt, 1)  # state allocated, first-touch page faults paid
        times = {impl: [] for impl in opts}
        for r in range(rounds):
            for impl in (("foreach", "fused") if r % 2 == 0 else ("fused", "foreach")):
                times[impl].append(time_steps(opts[impl], steps))
        n = sum(p.numel() for p in opts["fused"].param_groups[0]["params"])
        med = {impl: statistics.median(ts) for impl, ts in times.items()}
        rows.append({"recipe": recipe.name, "layout": layout, "params": n, "foreach_ms": 1000 * med["foreach"],
                     "fused_ms": 1000 * med["fused"], "speedup": med["foreach"] / med["fused"]})
    return rows


def render(rows: list[dict]) -> str:
    lines = ["| recipe | parameters | layout | foreach ms | fused ms | speedup |", "|---|---:|---|---:|---:|---:|"]
    lines += [f"| {r['recipe']} | {r['params']:,} | {r['layout']} | {r['foreach_ms']:.1f} | {r['fused_ms']:.1f} | "
              f"{r['speedup']:.2f}x |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("recipes", nargs="*", default=["recipes/gpt-cpu.toml", "recipes/gpt2.toml"])
    p.add_argument("--rounds", type=int, default=7, help="alternating rounds per contender (default 7)")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per round (default 3)")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.steps < 1:
        p.error("--rounds and --steps must be >= 1")
    try:
        recipes = [load_buildable(path) for path in args.recipes]
    except (ConfigError, FileNotFoundError) as exc:
        for line in (exc.lines if isinstance(exc, ConfigError) else [str(exc)]):
            print(f"error: {line}", file=sys.stderr)
        return 2
    rows = [row for recipe in recipes for row in bench(recipe, args.rounds, args.steps)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {'cuda' if torch.cuda.is_available() else 'cpu'}")
    print(render(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
