"""Does looking inside cost anything when it is off? A training step, side by side in one process.

    python bench/observe.py [recipes/gpt-cpu.toml ...] [--rounds 7] [--steps 5] [--json FILE]

Times one training step (forward, backward, fused AdamW; a plain loop, no DeepSpeed) of each
recipe's model three ways, alternating in rounds so that load on the machine slows them alike, the
median per step over rounds; the ratios are medians of each round's ratio (paired: one round sees
one load):

- ``baseline``: ``attend`` as it was before observation existed (toolkit/contracts.py at commit
  BASE, read with git and swapped into the attention plugins);
- ``off``: today's ``attend``, observation off (the training path; the bench counts the observer's
  calls and asserts there were none);
- ``on``: inside ``model.observe_attention()``: the explicit math path, recording every map (what
  ``playattention attention`` and the ``attention_stats`` evaluator pay, never training).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from toolkit import contracts  # noqa: E402
from toolkit.model import Transformer  # noqa: E402
from toolkit.probe import load_buildable  # noqa: E402
from toolkit.recipe import registry_of  # noqa: E402

#: the commit before observation was added to attend (the branch point of look-inside)
BASE = "901ca2c"
MODES = ("baseline", "off", "on")
#: the built-in plugins that call attend by the name they imported
USERS = ("toolkit.plugins.impl.attention", "toolkit.plugins.impl.differential", "toolkit.plugins.impl.mla")


def attend_before() -> callable:
    """``attend`` from toolkit/contracts.py at BASE, as a function of its own module."""
    src = subprocess.run(["git", "show", f"{BASE}:toolkit/contracts.py"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    module = types.ModuleType("contracts_at_base")
    exec(compile(src, f"contracts.py@{BASE}", "exec"), module.__dict__)
    return module.attend


def use_attend(fn) -> None:
    for name in USERS:
        if name in sys.modules:
            sys.modules[name].attend = fn


def bench(recipe, rounds: int, steps: int, old_attend) -> dict:
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = Transformer(recipe.model, registry_of(recipe)).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    B, T, V = recipe.train.micro_batch, recipe.model.block_size, recipe.model.vocab_size
    x, y = (torch.randint(0, V, (B, T), device=device) for _ in range(2))
    calls = []
    record = contracts.AttentionObserver.record
    contracts.AttentionObserver.record = lambda self, p: calls.append(1) or record(self, p)

    def step():
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def timed(mode) -> float:
        use_attend(old_attend if mode == "baseline" else contracts.attend)
        before = len(calls)
        with model.observe_attention() if mode == "on" else _nothing():
            step()  # warm-up for this mode
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            if device == "cuda":
                torch.cuda.synchronize()
            dt = (time.perf_counter() - t0) / steps
        if mode != "on":
            assert len(calls) == before, f"{mode}: the observer was called {len(calls) - before} times"
        return dt

    times = {m: [] for m in MODES}
    try:
        for r in range(rounds):
            for m in MODES[r % 3:] + MODES[:r % 3]:  # the order turns each round: none always runs first
                times[m].append(timed(m))
    finally:
        contracts.AttentionObserver.record = record
        use_attend(contracts.attend)
    ms = {m: 1000 * statistics.median(t) for m, t in times.items()}
    # paired by round (the same load on the machine): the median and range of each round's ratio
    ratios = {m: sorted(a / b for a, b in zip(times[m], times["baseline"])) for m in ("off", "on")}
    return dict(recipe=recipe.name, attention=recipe.model.attention.kind, tokens=B * T, device=device, ms=ms,
                off_over_baseline=statistics.median(ratios["off"]), on_over_baseline=statistics.median(ratios["on"]),
                off_range=(ratios["off"][0], ratios["off"][-1]), rounds={m: [1000 * t for t in ts] for m, ts in times.items()})


def call_overhead(old_attend, rounds: int, calls: int = 20000) -> dict:
    """Microseconds per attend() call on tiny tensors (1 x 4 heads x 8 tokens x 8), where Python overhead
    is all there is to time: an upper bound on what the observation check adds to a call."""
    q, k, v = (torch.randn(1, 4, 8, 8) for _ in range(3))
    pos = torch.arange(8)
    times = {"baseline": [], "off": []}
    for r in range(rounds):
        for mode in (("baseline", "off") if r % 2 == 0 else ("off", "baseline")):
            fn = old_attend if mode == "baseline" else contracts.attend
            t0 = time.perf_counter()
            for _ in range(calls):
                fn(q, k, v, pos, pos)
            times[mode].append((time.perf_counter() - t0) / calls * 1e6)
    us = {m: statistics.median(t) for m, t in times.items()}
    return dict(us=us, off_minus_baseline_us=statistics.median(a - b for a, b in zip(times["off"], times["baseline"])))


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("recipes", nargs="*", default=[str(ROOT / "recipes" / "gpt-cpu.toml")])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe value")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=5, help="timed steps per mode per round")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = p.parse_args()
    old = attend_before()
    results = [bench(load_buildable(r, args.set), args.rounds, args.steps, old) for r in args.recipes]
    print("| recipe | attention | tokens/step | baseline ms | off ms | on ms | off / baseline (range) | on / baseline |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        ms, (lo, hi) = r["ms"], r["off_range"]
        print(f"| {r['recipe']} | {r['attention']} | {r['tokens']} | {ms['baseline']:.1f} | {ms['off']:.1f} | "
              f"{ms['on']:.1f} | {r['off_over_baseline']:.3f} ({lo:.2f}-{hi:.2f}) | {r['on_over_baseline']:.2f} |")
    calls = call_overhead(old, args.rounds)
    print(f"\nattend() alone, 1 x 4 x 8 x 8: baseline {calls['us']['baseline']:.2f} us, off {calls['us']['off']:.2f} us "
          f"per call; off - baseline, paired by round: {calls['off_minus_baseline_us']:+.3f} us")
    if args.json:
        Path(args.json).write_text(json.dumps({"torch": torch.__version__, "results": results, "attend_call": calls},
                                              indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
