"""What composition costs: the composed model against a hand-written GPT-2, the engine against a plain loop.

    python bench/compose.py recipes/gpt-cpu.toml [--compile] [--budget 600] [--set KEY=VALUE] [--json FILE]

Three ways of training one GPT-2-shaped recipe, on the same weights and the same fixed batch:

    oracle    tests/oracle_gpt2.py (nanoGPT's model in one file), a plain PyTorch loop
    composed  toolkit.model.Transformer built from the registry, the same plain loop
    engine    the same Transformer in the DeepSpeed engine (toolkit.engine.build_engine)

The plain loop is bench/bench.py's: forward, backward, clipping, AdamW with weight-decay groups, the
recipe's schedule and precision. Two ratios of throughput: **composed / oracle** (what the registry,
the contracts and the plugins cost) and **engine / plain** (what DeepSpeed costs over the composed
model's plain loop); above 1 is faster.

The oracle spells attention out (softmax(QK^T/sqrt(d) + mask)V); here it runs nanoGPT's own fast
branch instead, F.scaled_dot_product_attention(is_causal=True), so that both models use the same
kernel and the ratio measures composition, not attention arithmetic (``--attention math``: both
spell it out). Every round runs a block of steps of each path, in a rotating order, so that load
on the machine slows them alike, and gives one ratio per pair; rounds repeat until the 95%
interval of each ratio's median (distribution-free: order statistics of the rounds' ratios) lies
within +-1% of it, or ``--budget`` seconds of timed rounds are spent. The load is measured too:
the CPU time other processes took while the rounds ran (from /proc/stat), in cores. ``--profile N``
then runs N steps of each path under torch.profiler and prints where each spends its time.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from torch.profiler import ProfilerActivity, profile  # noqa: E402

from toolkit.converter import ConfigError, resolve_spec  # noqa: E402
from toolkit.engine import batch_plan, build_engine, device, engine_step, ensure_accelerator  # noqa: E402
from toolkit.model import Transformer  # noqa: E402
from toolkit.probe import load_buildable  # noqa: E402
from toolkit.recipe import registry_of  # noqa: E402


def _load(name: str, path: Path):
    """Import a file as a module (bench/ and tests/ are not packages)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


PlainLoop = _load("playattention_bench", ROOT / "bench" / "bench.py").PlainLoop
oracle_gpt2 = _load("oracle_gpt2", ROOT / "tests" / "oracle_gpt2.py")

PAIRS = {"composed / oracle": ("composed", "oracle"), "engine / plain": ("engine", "composed")}


# -- statistics --------------------------------------------------------------------------------
def median_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float] | None:
    """Median and a distribution-free ``level`` interval for it: order statistics k and n-k+1 of n values.

    The interval [x_(k), x_(n-k+1)] covers the median with probability 1 - 2 P(Binomial(n, 1/2) <= k-1);
    k is the largest with that at least ``level``. None when n is too small for any k (n < 6 at 95%).
    """
    n = len(values)
    xs = sorted(values)
    k, tail = 0, 0.0
    while True:  # tail = P(B <= k) for B ~ Binomial(n, 1/2)
        tail += math.comb(n, k) / 2**n
        if 2 * tail > 1 - level:
            break
        k += 1
    if k == 0:
        return None
    return statistics.median(xs), xs[k - 1], xs[n - k]


def converged(interval, width: float) -> bool:
    """The interval lies within median x (1 -+ width)."""
    return interval is not None and interval[1] >= interval[0] * (1 - width) and interval[2] <= interval[0] * (1 + width)


class OtherLoad:
    """CPU time that other processes take meanwhile, in cores (Linux /proc/stat; None elsewhere)."""

    @staticmethod
    def _busy() -> float | None:
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    def __init__(self):
        self.busy, self.own, self.wall = self._busy(), time.process_time(), time.perf_counter()

    def cores(self) -> float | None:
        busy = self._busy()
        if busy is None or self.busy is None:
            return None
        others = (busy - self.busy) - (time.process_time() - self.own)
        return max(0.0, others / (time.perf_counter() - self.wall))


# -- the three paths ---------------------------------------------------------------------------
def flash_forward(self, x):
    """nanoGPT's CausalSelfAttention.forward on its flash branch (SDPA, is_causal)."""
    B, T, C = x.size()
    q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
    k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
    q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
    v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
    dropout = self.attn_dropout.p if self.training else 0.0
    y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
    y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
    return self.resid_dropout(self.c_proj(y))


class FlashOracle(oracle_gpt2.CausalSelfAttention):
    forward = flash_forward


def oracle_for(recipe, attention: str):
    """The hand-written GPT-2 with the recipe's shape; a ValueError names what it cannot express."""
    m, registry = recipe.model, registry_of(recipe)
    kinds = {"attention": (m.attention.kind, "mha"), "norm": (m.norm.kind, "layernorm"),
             "position": (m.position.kind, "learned"), "mlp": (m.mlp.kind, "gelu")}
    for family, (got, want) in kinds.items():
        if got != want:
            raise ValueError(f"model.{family}: the oracle is GPT-2 ({want}), got {got!r}")
    if m.block.kind not in ("pre_norm", "post_norm") or m.layers:
        raise ValueError(f"model.block: the oracle has pre_norm or post_norm blocks alike in every layer, "
                         f"got {m.block.kind!r}{' and layer groups' if m.layers else ''}")
    attn, norm, mlp = (resolve_spec(registry, spec).options for spec in (m.attention, m.norm, m.mlp))
    extras = {"attention.qk_norm": attn.qk_norm, "attention.softcap": attn.softcap, "attention.scale": attn.scale,
              "head_dim": m.head_dim, "embedding_multiplier": m.embedding_multiplier, "logit_softcap": m.logit_softcap}
    for key, value in extras.items():
        if value is not None:
            raise ValueError(f"model.{key}: the oracle is GPT-2, which has none; got {value!r}")
    if norm.eps != 1e-5:
        raise ValueError(f"model.norm.eps: the oracle's LayerNorm has 1e-5, got {norm.eps!r}")
    cfg = oracle_gpt2.GPTConfig(block_size=m.block_size, vocab_size=m.vocab_size, n_layer=m.n_layer,
                                n_head=m.n_head, n_embd=m.n_embd, dropout=m.dropout, bias=m.bias,
                                tie_weights=m.tie_embeddings, post_norm=m.block.kind == "post_norm",
                                gelu_approximate=mlp.approximate)
    model = oracle_gpt2.GPT(cfg)
    if attention == "sdpa":
        for block in model.transformer.h:
            block.attn.__class__ = FlashOracle
    return model


class Path_:
    """One way of training, timed in blocks: per-step wall and CPU time of each block."""

    def __init__(self, name, step):
        self.name, self.step, self.wall, self.cpu = name, step, [], []

    def run(self, n: int, record: bool = True) -> None:
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(n):
            self.step().item()  # the one host sync per step, as in the trainer
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if record:
            self.wall.append((time.perf_counter() - t0) / n)
            self.cpu.append((time.process_time() - c0) / n)


def build_paths(recipe, attention: str, compile_: bool) -> tuple[list[Path_], object]:
    registry = registry_of(recipe)
    dev = device()
    plan = batch_plan(recipe, 1)
    T, mb = recipe.model.block_size, recipe.train.micro_batch
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, recipe.model.vocab_size, (mb, T + 1), generator=g)
    x, y = batch[:, :-1].contiguous().to(dev), batch[:, 1:].contiguous().to(dev)

    torch.manual_seed(recipe.train.seed)
    reference = Transformer(recipe.model, registry)
    oracle = oracle_for(recipe, attention)
    oracle.load_state_dict(reference.state_dict(), strict=True)  # GPT-2's names on both sides
    composed = Transformer(recipe.model, registry)
    composed.load_state_dict(reference.state_dict())
    engine = build_engine(reference, recipe).engine  # compiles the module inside when train.compile

    paths = []
    for name, model in (("oracle", oracle), ("composed", composed)):
        model.to(dev).train()
        if compile_:
            model.compile()
        loop = PlainLoop(model, recipe, plan.grad_accum)
        paths.append(Path_(name, lambda loop=loop: loop.step(x, y)))
    paths.append(Path_("engine", lambda: engine_step(engine, lambda: (x, y), plan.grad_accum)))
    return paths, plan


def profile_steps(path: Path_, steps: int) -> str:
    """torch.profiler's table of the ops that took the most CPU time over ``steps`` steps of one path."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        path.run(steps, record=False)
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=15)


def bench(recipe, attention: str = "sdpa", budget: float = 600.0, warmup: int = 3, block: int | None = None,
          width: float = 0.01, min_rounds: int = 6, max_rounds: int = 10_000, log=None, profile: int = 0) -> dict:
    """Warm up, then rounds of one block per path until every ratio's interval is within +-width or the budget ends."""
    compile_ = recipe.train.compile
    paths, plan = build_paths(recipe, attention, compile_)
    t0 = time.perf_counter()
    for path in paths:  # compiles (when asked) and first-step allocations happen here
        path.run(warmup, record=False)
    warmup_s = time.perf_counter() - t0
    if block is None:  # about half a second per block: long enough to time, short enough to interleave
        for path in paths:
            path.run(1)
        block = max(1, round(0.5 / max(p.wall.pop() for p in paths)))
        for path in paths:
            path.cpu.clear()
    load, started, rounds = OtherLoad(), time.perf_counter(), 0
    loadavg = os.getloadavg()
    ratios: dict[str, list[float]] = {name: [] for name in PAIRS}
    cpu_ratios: dict[str, list[float]] = {name: [] for name in PAIRS}
    by_name = {p.name: p for p in paths}
    while rounds < max_rounds:
        order = paths[rounds % len(paths):] + paths[:rounds % len(paths)]  # rotate who goes first
        for path in order:
            path.run(block)
        rounds += 1
        for name, (a, b) in PAIRS.items():
            ratios[name].append(by_name[b].wall[-1] / by_name[a].wall[-1])  # throughput of a over b
            cpu_ratios[name].append(by_name[b].cpu[-1] / by_name[a].cpu[-1])
        intervals = {name: median_interval(r) for name, r in ratios.items()}
        elapsed = time.perf_counter() - started
        if log and (rounds % 10 == 0):
            log(f"  round {rounds}, {elapsed:.0f} s: " + ", ".join(
                f"{n} {iv[0]:.3f}x [{iv[1]:.3f}, {iv[2]:.3f}]" for n, iv in intervals.items() if iv))
        done = rounds >= min_rounds and all(converged(iv, width) for iv in intervals.values())
        if done or elapsed >= budget:
            break
    timed_s = time.perf_counter() - started
    other = load.cores()
    profiles = {p.name: profile_steps(p, profile) for p in paths} if profile else {}

    out = {"recipe": recipe.name, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "threads": torch.get_num_threads(), "compile": compile_, "attention": attention,
           "precision": recipe.deepspeed.precision, "zero_stage": recipe.deepspeed.zero_stage,
           "shape": {"n_layer": recipe.model.n_layer, "n_embd": recipe.model.n_embd, "n_head": recipe.model.n_head,
                     "block_size": recipe.model.block_size, "vocab_size": recipe.model.vocab_size,
                     "micro_batch": plan.micro_batch, "grad_accum": plan.grad_accum},
           "tokens_per_step": plan.tokens_per_step, "warmup_steps": warmup, "warmup_s": warmup_s,
           "block_steps": block, "rounds": rounds, "timed_s": timed_s, "budget_s": budget, "width": width,
           "converged": all(converged(median_interval(r), width) for r in ratios.values()),
           "other_load_cores": other, "loadavg_before": loadavg[0], "loadavg_after": os.getloadavg()[0],
           "cpu_count": os.cpu_count(), "paths": {}, "ratios": {}, "profiles": profiles}
    for p in paths:
        step_s = statistics.median(p.wall)
        out["paths"][p.name] = {"tokens_per_s": plan.tokens_per_step / step_s, "step_ms": 1000 * step_s,
                                "cpu_ms": 1000 * statistics.median(p.cpu)}
    for name, r in ratios.items():
        iv = median_interval(r)
        civ = median_interval(cpu_ratios[name])
        out["ratios"][name] = {"median": statistics.median(r), "low": iv[1] if iv else None,
                               "high": iv[2] if iv else None, "cpu_median": statistics.median(cpu_ratios[name]),
                               "cpu_low": civ[1] if civ else None, "cpu_high": civ[2] if civ else None,
                               "rounds": r}
    return out


def render(result: dict) -> str:
    s = result["shape"]
    head = (f"{result['recipe']}: {s['n_layer']} layers x {s['n_embd']}, block {s['block_size']}, micro "
            f"{s['micro_batch']} x accum {s['grad_accum']} ({result['tokens_per_step']:,} tokens/step), "
            f"{result['precision']}, ZeRO {result['zero_stage']}, {'compiled' if result['compile'] else 'eager'}, "
            f"attention {result['attention']}, {result['device']} ({result['threads']} threads)")
    other = result["other_load_cores"]
    load = f"other processes used {other:.2f} of {result['cpu_count']} cores" if other is not None else "load unknown"
    rounds = (f"{result['rounds']} rounds of {result['block_steps']} steps per path in {result['timed_s']:.0f} s "
              f"(after {result['warmup_s']:.0f} s of warm-up); {load}; "
              f"{'converged' if result['converged'] else 'budget ended before +-' + format(result['width'], '.0%')}")
    rows = [head, rounds, "", f"{'path':<12}{'tokens/s':>12}{'step ms':>10}{'cpu ms':>10}"]
    for name, p in result["paths"].items():
        rows.append(f"{name:<12}{p['tokens_per_s']:>12,.0f}{p['step_ms']:>10.2f}{p['cpu_ms']:>10.2f}")
    rows += ["", f"{'ratio':<20}{'median':>9}{'95% interval':>20}{'cpu-time median':>17}{'95% interval':>20}"]

    def interval(lo, hi):
        return f"[{lo:.3f}, {hi:.3f}]" if lo is not None else "(too few rounds)"

    for name, r in result["ratios"].items():
        rows.append(f"{name:<20}{r['median']:>8.3f}x{interval(r['low'], r['high']):>20}"
                    f"{r['cpu_median']:>16.3f}x{interval(r['cpu_low'], r['cpu_high']):>20}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("recipe")
    p.add_argument("--compile", action="store_true", help="torch.compile every path (else eager, whatever the recipe says)")
    p.add_argument("--attention", choices=["sdpa", "math"], default="sdpa",
                   help="both models' attention: fused SDPA (default) or spelled out")
    p.add_argument("--budget", type=float, default=600.0, metavar="SECONDS",
                   help="stop the timed rounds after this long if the intervals are still wider (default 600)")
    p.add_argument("--width", type=float, default=0.01, help="target half-width of each interval (default 0.01: +-1%%)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per path first (default 3)")
    p.add_argument("--block", type=int, default=None, help="steps per path per round (default: about 0.5 s worth)")
    p.add_argument("--min-rounds", type=int, default=6, help="at least this many rounds (default 6)")
    p.add_argument("--max-rounds", type=int, default=10_000, help="at most this many rounds")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe value")
    p.add_argument("--plugin", action="append", default=[], help="also load this plugin file or module")
    p.add_argument("--json", metavar="FILE", help="also write the numbers as JSON")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="afterwards, run STEPS steps of each path under torch.profiler and print the top ops")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = p.parse_args(argv)
    if args.warmup < 1 or args.min_rounds < 1 or (args.block is not None and args.block < 1) or args.budget <= 0 \
            or args.profile < 0:
        p.error("--warmup, --min-rounds and --block must be >= 1, --budget > 0, --profile >= 0")
    ensure_accelerator()

    overrides = [*args.set, f"train.compile={'true' if args.compile else 'false'}"]
    if args.attention == "math":
        overrides.append('model.attention.backend="math"')
    try:
        recipe = load_buildable(args.recipe, overrides, args.plugin)
        oracle_for(recipe, args.attention)  # refuse a recipe the oracle cannot express before building anything
    except (ConfigError, FileNotFoundError) as exc:
        for line in getattr(exc, "lines", [str(exc)]):
            print(f"error: {line}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"error: {args.recipe}: {exc}", file=sys.stderr)
        return 2
    log = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    result = bench(recipe, args.attention, args.budget, args.warmup, args.block, args.width,
                   args.min_rounds, args.max_rounds, log, args.profile)
    result["command"] = " ".join(["python", "bench/compose.py", *(argv if argv is not None else sys.argv[1:])])
    print(render(result))
    for name, table in result["profiles"].items():
        print(f"\n{name}: the ops that took the most time over {args.profile} steps\n{table}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip gloo's shutdown (see toolkit.cli.cmd_train)
