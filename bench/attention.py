"""FlexAttention against SDPA with an explicit mask, for the attention that SDPA cannot fuse.

    python bench/attention.py [--shapes gpt-cpu,gpt,gpt2] [--rounds 7] [--json FILE]

For each shape (the heads, head size and context of a recipe) and each case where SDPA needs an
explicit mask or bias (a sliding window, ALiBi, both; a decoding step over a cache), times the
forward of ``toolkit.contracts.attend`` with flex and with SDPA plus a mask, eagerly (flex through
its compiled kernel, as attend runs it in an eager model) and inside ``torch.compile``. Both
contenders alternate in blocks so load slows them alike; each time is the median of the blocks'
per-call times. ``flex speedup`` > 1 means flex is faster. Without CUDA forward only, under
``no_grad``: FlexAttention has no backward on CPU (torch 2.13). The first call of each
compiled contender is timed apart ("compile s"), since an eager model pays it once per shape.
This is the measurement behind ``toolkit.contracts.prefer_flex``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

if __package__ in (None, ""):  # run as a script from anywhere
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from toolkit import contracts  # noqa: E402

#: batch, heads, head size, context: the attention of recipes/gpt-cpu.toml, gpt.toml, gpt2.toml
SHAPES = {"gpt-cpu": (12, 4, 32, 64), "gpt": (8, 6, 64, 256), "gpt2": (2, 12, 64, 1024)}
CASES = ("window", "alibi", "window+alibi", "decode alibi")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def make_case(shape, case: str, dev, dtype):
    """The attend call of ``case`` as a function of its backend, and what it needs."""
    from toolkit.plugins.impl.position import ALiBiPosition
    from toolkit.contracts import Dims
    from toolkit.registry import NoOptions

    B, nh, hs, T = shape
    g = torch.Generator().manual_seed(0)
    window = T // 4 if "window" in case else None
    position = None
    if "alibi" in case:
        position = ALiBiPosition(NoOptions(), Dims(nh * hs, nh, 1, T, 1)).to(dev)
    Tq = 1 if case.startswith("decode") else T
    q = torch.randn(B, nh, Tq, hs, generator=g).to(dev, dtype)
    k = torch.randn(B, nh, T, hs, generator=g).to(dev, dtype)
    v = torch.randn(B, nh, T, hs, generator=g).to(dev, dtype)
    k_pos = torch.arange(T, device=dev)
    q_pos = k_pos if Tq == T else k_pos[-1:].clone()  # a fresh sequence, or the newest token over the cache

    def call(backend: str):
        return contracts.attend(q, k, v, q_pos, k_pos, position, window=window, backend=backend)

    return call


class Contender:
    def __init__(self, name, fn):
        self.name, self.fn, self.times, self.first_s = name, fn, [], None

    def first(self) -> None:
        t0 = time.perf_counter()
        self.fn()
        sync()
        self.first_s = time.perf_counter() - t0

    def block(self, n: int) -> None:
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            self.fn()
        sync()
        self.times.append((time.perf_counter() - t0) / n)


def bench_case(shape, case: str, mode: str, rounds: int, calls: int, dev, dtype) -> dict:
    call = make_case(shape, case, dev, dtype)
    sdpa_masked = contracts.prefer_flex  # forced off below, so "sdpa" means SDPA with the explicit mask

    def sdpa():
        return call("sdpa")

    def flex():
        return call("flex")

    if mode == "compiled":
        torch._dynamo.reset()
        sdpa, flex = torch.compile(sdpa), torch.compile(flex)
    contenders = [Contender("sdpa+mask", sdpa), Contender("flex", flex)]
    contracts.prefer_flex = lambda q, fresh: False
    try:
        with torch.no_grad():
            for c in contenders:
                c.first()
            want = contenders[0].fn()
            err = (contenders[1].fn().float() - want.float()).abs().max().item()
            for c in contenders:  # a few warm-up calls
                c.block(2)
                c.times.clear()
            for r in range(rounds):
                for c in contenders if r % 2 == 0 else contenders[::-1]:
                    c.block(calls)
    finally:
        contracts.prefer_flex = sdpa_masked
    out = {c.name: {"ms": 1000 * statistics.median(c.times), "first_s": c.first_s} for c in contenders}
    out["speedup"] = out["sdpa+mask"]["ms"] / out["flex"]["ms"]
    out["max_abs_diff"] = err
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="gpt-cpu,gpt,gpt2", help="comma-separated, of: " + ", ".join(SHAPES))
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated, of: " + ", ".join(CASES))
    p.add_argument("--modes", default="eager,compiled")
    p.add_argument("--rounds", type=int, default=7, help="timed blocks per contender (default 7)")
    p.add_argument("--calls", type=int, default=10, help="calls per block (default 10)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--json", metavar="FILE", help="also write the numbers as JSON")
    args = p.parse_args(argv)
    shapes, cases, modes = (s.split(",") for s in (args.shapes, args.cases, args.modes))
    bad = [s for s in shapes if s not in SHAPES] + [c for c in cases if c not in CASES] + \
          [m for m in modes if m not in ("eager", "compiled")]
    if bad:
        print(f"error: unknown shape, case or mode: {', '.join(bad)}", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    result = {"device": name, "threads": torch.get_num_threads(), "dtype": args.dtype, "torch": torch.__version__,
              "rounds": args.rounds, "calls": args.calls, "runs": []}
    print(f"attend forward, {name} ({torch.get_num_threads()} threads), {args.dtype}, no_grad; "
          f"median of {args.rounds} blocks of {args.calls} calls")
    print(f"{'shape':<9}{'case':<14}{'mode':<10}{'sdpa+mask ms':>13}{'flex ms':>10}{'flex speedup':>14}"
          f"{'compile s (sdpa/flex)':>23}{'max diff':>10}")
    for shape in shapes:
        for case in cases:
            for mode in modes:
                r = bench_case(SHAPES[shape], case, mode, args.rounds, args.calls, dev, dtype)
                result["runs"].append({"shape": shape, "dims": SHAPES[shape], "case": case, "mode": mode, **r})
                print(f"{shape:<9}{case:<14}{mode:<10}{r['sdpa+mask']['ms']:>13.3f}{r['flex']['ms']:>10.3f}"
                      f"{r['speedup']:>13.2f}x{r['sdpa+mask']['first_s']:>12.1f} /{r['flex']['first_s']:>6.1f}"
                      f"{r['max_abs_diff']:>10.1e}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
