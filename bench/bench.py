"""Throughput of the DeepSpeed engine against a plain PyTorch loop, on the same model and batch.

    python bench/bench.py recipes/gpt-cpu.toml [--steps 50 --warmup 10 --set train.micro_batch=16]

Both paths start from the same weights and train on the same fixed batch with the same optimizer
(AdamW, weight-decay groups, the recipe's schedule), precision (DeepSpeed's bf16/fp16 against
autocast with fp32 weights), compile setting, gradient accumulation and clipping, and read the
loss once per step. Their timed steps alternate in blocks so that a busy machine slows both alike;
step time is the median (wall clock, and the process's CPU time, which a busy machine disturbs
less when torch runs one thread: OMP_NUM_THREADS=1). Peak memory on CUDA is what each
path holds (weights, optimizer, buffers) plus what one step adds; on CPU, the process's peak RSS.

Utilisation is each path's training FLOP/s (three times the model's forward FLOPs per token from
its components' exact counts, ``Transformer.flops_per_token``: 6N plus attention) over a peak
measured in the same process: the matmul rate this machine reaches on the model's own GEMMs (each
distinct ``nn.Linear`` at micro_batch x block_size rows, lm_head included), best of ``--reps``
repetitions, in the recipe's dtype (fp32, or bf16 for bf16 and fp16). The peak is measured once per
round, between the paths' blocks of steps, so that a shared machine slows both alike; the median
of the rounds' ratios is given with a distribution-free 95% interval. "By CPU time" divides by the
process's CPU time per step instead (one thread: the time it ran, not the time others ran) and by
the best peak of all rounds. MFU is the same FLOPs over
the device's datasheet dense bf16 peak (CUDA only). ``--profile N`` adds torch.profiler's top ops
over N steps of each path.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import resource
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script from anywhere
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from toolkit.engine import (build_engine, device, engine_step, ensure_accelerator, make_optimizer,  # noqa: E402
                            make_scheduler, peak_flops)


def training_flops_per_token(model) -> int:
    """Forward + backward FLOPs per token: three times the components' exact forward counts (6N + attention)."""
    return 3 * model.flops_per_token(model.config.block_size)


def model_gemms(model, rows: int) -> list[dict]:
    """The model's matmuls at ``rows`` tokens: one entry per distinct nn.Linear shape, named after its first
    module (c_attn, c_proj, c_fc, ..., lm_head), with how many modules share it."""
    shapes: dict[tuple[int, int], dict] = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            entry = shapes.setdefault((m.in_features, m.out_features),
                                      {"name": name.rsplit(".", 1)[-1], "M": rows, "K": m.in_features,
                                       "N": m.out_features, "count": 0})
            entry["count"] += 1
    return list(shapes.values())


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class GemmPeak:
    """The best matmul rate (FLOP/s) this machine reaches on the model's GEMM shapes, per dtype.

    Each shape runs as the model runs it, ``F.linear`` (x @ W.T) on (M, K) activations and an (N, K) weight.
    ``dtype`` is measured every round; the other dtype once, for the table (bf16 can be slow to time on CPUs
    without bf16 instructions)."""

    def __init__(self, gemms: list[dict], dev, dtype: str, reps: int = 3):
        self.gemms, self.dtype, self.reps = gemms, dtype, reps
        g = torch.Generator().manual_seed(0)
        self.operands = {(i, d): (torch.randn(e["M"], e["K"], generator=g).to(dev, DTYPES[d]),
                                  torch.randn(e["N"], e["K"], generator=g).to(dev, DTYPES[d]))
                         for i, e in enumerate(gemms) for d in DTYPES}
        self.rates = {(i, d): [] for i in range(len(gemms)) for d in DTYPES}  # best of reps, per round

    def measure(self) -> float:
        """One round: each shape's best of ``reps``; returns the round's peak (best over shapes) in ``dtype``."""
        for (i, d), (x, w) in self.operands.items():
            if d != self.dtype and self.rates[(i, d)]:
                continue
            e, best = self.gemms[i], math.inf
            for _ in range(self.reps):
                sync()
                t0 = time.perf_counter()
                torch.nn.functional.linear(x, w)
                sync()
                best = min(best, time.perf_counter() - t0)
            self.rates[(i, d)].append(2 * e["M"] * e["K"] * e["N"] / best)
        return max(self.rates[(i, self.dtype)][-1] for i in range(len(self.gemms)))

    def table(self) -> list[dict]:
        """Each shape's best rate over all rounds, per dtype."""
        return [{**e, **{f"{d}_flops": max(self.rates[(i, d)]) for d in DTYPES}} for i, e in enumerate(self.gemms)]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class PlainLoop:
    """The same training step without DeepSpeed: autocast, backward, clip, AdamW, schedule."""

    def __init__(self, model, recipe, grad_accum: int):
        self.model, self.recipe, self.grad_accum = model, recipe, grad_accum
        self.optimizer = make_optimizer(model, recipe)
        self.scheduler = make_scheduler(self.optimizer, recipe.train)
        precision = recipe.deepspeed.precision
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.scaler = torch.amp.GradScaler(device().type) if precision == "fp16" else None
        self.params = [p for p in model.parameters() if p.requires_grad]

    def step(self, x, y) -> torch.Tensor:
        total = None
        for _ in range(self.grad_accum):
            with torch.autocast(device().type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
                _, loss = self.model(x, y)
            scaled = loss / self.grad_accum
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            total = loss.detach() if total is None else total + loss.detach()
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.recipe.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.recipe.train.grad_clip, foreach=True)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total / self.grad_accum


class Timed:
    """One way of training (engine or plain) with its step times and memory."""

    def __init__(self, name, step):
        self.name, self.step, self.times, self.cpu_times, self.mem = name, step, [], [], None
        self.rounds: list[float] = []  # the median step time of each timed block
        self.cpu_rounds: list[float] = []  # and its median CPU time

    def run(self, n: int, record: bool = True) -> None:
        for _ in range(n):
            t0, c0 = time.perf_counter(), time.process_time()
            self.step().item()  # the one host sync per step, as in the trainer
            if record:
                self.times.append(time.perf_counter() - t0)
                self.cpu_times.append(time.process_time() - c0)
        if record and n:
            self.rounds.append(statistics.median(self.times[-n:]))
            self.cpu_rounds.append(statistics.median(self.cpu_times[-n:]))


def cuda_mem() -> int:
    return torch.cuda.memory_allocated() if torch.cuda.is_available() else 0


def measure_cuda_peak(path: Timed, resident: int) -> int:
    """What the path holds between steps (``resident``) plus the most one step adds on top."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    path.run(1, record=False)
    torch.cuda.synchronize()
    return resident + torch.cuda.max_memory_allocated() - before


def _compose():
    """bench/compose.py (its interval and profile helpers); loaded late, as it loads this file itself."""
    spec = importlib.util.spec_from_file_location("playattention_compose", Path(__file__).with_name("compose.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench(recipe, steps: int, warmup: int, block: int = 5, stages: list[int] | None = None, reps: int = 3,
          profile: int = 0) -> dict:
    """Warm every path up, then alternate timed blocks of ``block`` steps; the numbers of each and the ratios.

    Each round is one block per path and one measurement of the GEMM peak; utilisation is per round.

    One engine path per ZeRO stage in ``stages`` (default: the recipe's own), then the plain loop.
    The first engine path is the recipe's configuration; ``ratio`` compares it with the plain loop.
    """
    import attrs

    from toolkit.engine import batch_plan
    from toolkit.model import Transformer
    from toolkit.plugin_manager import get_registry

    registry = get_registry(recipe.plugins)
    dev = device()
    plan = batch_plan(recipe, 1)
    T, mb = recipe.model.block_size, recipe.train.micro_batch
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, recipe.model.vocab_size, (mb, T + 1), generator=g)
    x, y = batch[:, :-1].contiguous().to(dev), batch[:, 1:].contiguous().to(dev)

    torch.manual_seed(recipe.train.seed)
    reference = Transformer(recipe.model, registry)
    flops = training_flops_per_token(reference)
    dtype = "fp32" if recipe.deepspeed.precision == "fp32" else "bf16"  # what the matmuls run in
    gemm = GemmPeak(model_gemms(reference, mb * T), dev, dtype, reps)
    compose = _compose()
    other = compose.OtherLoad()
    stages = stages or [recipe.deepspeed.zero_stage]
    stages = [recipe.deepspeed.zero_stage] + [s for s in stages if s != recipe.deepspeed.zero_stage]

    def copy_of_model():
        model = Transformer(recipe.model, registry)
        model.load_state_dict(reference.state_dict())
        return model

    paths, resident = [], {}
    for stage in stages:  # one engine per stage; several deepspeed.initialize calls in one process work
        staged = attrs.evolve(recipe, deepspeed=attrs.evolve(recipe.deepspeed, zero_stage=stage))
        m0 = cuda_mem()
        engine = build_engine(copy_of_model(), staged).engine
        path = Timed(f"engine ZeRO {stage}", lambda engine=engine: engine_step(engine, lambda: (x, y), plan.grad_accum))
        path.run(warmup, record=False)
        resident[path.name] = cuda_mem() - m0  # weights, optimizer states and buffers
        paths.append(path)
    m0 = cuda_mem()
    plain_model = copy_of_model().to(dev)
    plain_model.activation_checkpointing = recipe.train.activation_checkpointing
    if recipe.train.compile:
        plain_model.compile()
    plain = PlainLoop(plain_model, recipe, plan.grad_accum)
    plain_path = Timed("plain pytorch", lambda: plain.step(x, y))
    plain_path.run(warmup, record=False)
    resident[plain_path.name] = cuda_mem() - m0
    paths.append(plain_path)
    if torch.cuda.is_available():
        for path in paths:
            path.mem = measure_cuda_peak(path, resident[path.name])
    done, peaks = 0, []
    while done < steps:
        n = min(block, steps - done)
        for path in paths:
            path.run(n)
        peaks.append(gemm.measure())
        done += n
    other_load = other.cores()
    if not torch.cuda.is_available():
        for path in paths:
            path.mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    peak = peak_flops(dev)
    gemms = gemm.table()
    # the rate of the model's own GEMM mix (each shape as often as the model has it) at its best measured rates
    mix = sum(2 * e["M"] * e["K"] * e["N"] * e["count"] for e in gemms) / sum(
        2 * e["M"] * e["K"] * e["N"] * e["count"] / e[f"{dtype}_flops"] for e in gemms)
    out = {"recipe": recipe.name, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "tokens_per_step": plan.tokens_per_step,
           "steps": steps, "warmup": warmup, "block": block, "reps": reps, "rounds": len(peaks),
           "flops_per_token": flops, "dtype": dtype, "other_load_cores": other_load,
           "peak": max(peaks), "peak_median": statistics.median(peaks), "peaks": peaks, "gemm_mix_flops": mix,
           "gemms": gemms, "paths": {}, "ratios": {}, "cpu_ratios": {}}
    for path in paths:
        step_s = statistics.median(path.times)
        tps = plan.tokens_per_step / step_s
        per_round = [flops * plan.tokens_per_step / t / p for t, p in zip(path.rounds, peaks)]
        interval = compose.median_interval(per_round)
        # by the process's CPU time per step, on a shared machine with one thread the time it actually ran,
        # over the best peak of all rounds, the one least disturbed by other processes
        per_round_cpu = [flops * plan.tokens_per_step / t / max(peaks) for t in path.cpu_rounds if t > 0]
        interval_cpu = compose.median_interval(per_round_cpu)
        out["paths"][path.name] = {"tokens_per_s": tps, "step_ms": 1000 * step_s,
                                   "cpu_ms": 1000 * statistics.median(path.cpu_times),
                                   "train_flops": flops * tps, "utilisation": statistics.median(per_round),
                                   "utilisation_interval": list(interval[1:]) if interval else None,
                                   "utilisation_rounds": per_round,
                                   "utilisation_cpu": statistics.median(per_round_cpu) if per_round_cpu else None,
                                   "utilisation_cpu_interval": list(interval_cpu[1:]) if interval_cpu else None,
                                   "utilisation_cpu_rounds": per_round_cpu,
                                   "mfu": flops * tps / peak if peak else None, "peak_mem_bytes": path.mem}
    out["profiles"] = {p.name: compose.profile_steps(p, profile) for p in paths} if profile else {}
    plain_p = out["paths"][plain_path.name]
    for path in paths[:-1]:
        p = out["paths"][path.name]
        out["ratios"][path.name] = p["tokens_per_s"] / plain_p["tokens_per_s"]
        # on a shared CPU the process's own CPU time per step is steadier than the wall clock
        out["cpu_ratios"][path.name] = plain_p["cpu_ms"] / p["cpu_ms"] if p["cpu_ms"] > 0 else None
    out["ratio"] = out["ratios"][paths[0].name]
    out["cpu_ratio"] = out["cpu_ratios"][paths[0].name]
    return out


def render(result: dict, recipe) -> str:
    m, t, ds = recipe.model, recipe.train, recipe.deepspeed
    accum = result["tokens_per_step"] // (t.micro_batch * m.block_size)
    head = (f"{result['recipe']}: {m.n_layer} layers x {m.n_embd}, block {m.block_size}, micro {t.micro_batch} x "
            f"accum {accum} ({result['tokens_per_step']:,} tokens/step), {ds.precision}, "
            f"ZeRO {ds.zero_stage}, compile {'on' if t.compile else 'off'}, {result['device']} "
            f"({result['threads']} threads); {result['steps']} timed steps after {result['warmup']} warm-up")
    mem_label = "peak mem" if result["device"] != "cpu" else "peak RSS*"
    load = result.get("other_load_cores")
    rows = [head, f"{result['rounds']} rounds of {result['block']} steps per path and one GEMM peak measurement"
                  + (f"; other processes took {load:.2f} cores meanwhile" if load is not None else ""), "",
            f"model GEMMs at {t.micro_batch * m.block_size} rows, best of {result['reps']} x {result['rounds']} "
            f"rounds (GFLOP/s):", f"{'':<10}{'M x K x N':>22}{'count':>7}{'fp32':>10}{'bf16':>10}"]
    for e in result["gemms"]:
        rows.append(f"{e['name']:<10}{e['M']:>8} x{e['K']:>5} x{e['N']:>6}{e['count']:>7}"
                    f"{e['fp32_flops'] / 1e9:>10.1f}{e['bf16_flops'] / 1e9:>10.1f}")
    rows.append(f"peak ({result['dtype']}, best shape): median over rounds {result['peak_median'] / 1e9:.1f}, best "
                f"{result['peak'] / 1e9:.1f} GFLOP/s; the model's GEMM mix at its shapes' best rates "
                f"{result['gemm_mix_flops'] / 1e9:.1f} GFLOP/s ({100 * result['gemm_mix_flops'] / result['peak']:.0f}% "
                f"of the best)")
    rows += ["", f"{'':<16}{'tokens/s':>12}{'GFLOP/s':>9}{'util [95% interval]':>24}{'by CPU time':>24}{'MFU':>7}"
                 f"{'step ms':>10}{'cpu ms':>10}{mem_label:>12}{'vs plain':>10}{'(cpu)':>8}"]

    def util(value, iv):
        if value is None:
            return "n/a"
        return f"{100 * value:.1f}%" + (f" [{100 * iv[0]:.1f}, {100 * iv[1]:.1f}]" if iv else " [n<6]")

    for name, p in result["paths"].items():
        mfu = f"{100 * p['mfu']:.1f}%" if p["mfu"] is not None else "n/a"
        ratio = f"{result['ratios'][name]:.3f}x" if name in result["ratios"] else ""
        cpu = result["cpu_ratios"].get(name)
        rows.append(f"{name:<16}{p['tokens_per_s']:>12,.0f}{p['train_flops'] / 1e9:>9.1f}"
                    f"{util(p['utilisation'], p['utilisation_interval']):>24}"
                    f"{util(p['utilisation_cpu'], p['utilisation_cpu_interval']):>24}{mfu:>7}"
                    f"{p['step_ms']:>10.2f}{p['cpu_ms']:>10.2f}"
                    f"{p['peak_mem_bytes'] / 2**20:>10,.0f}MB{ratio:>10}{f'{cpu:.3f}x' if cpu else '':>8}")
    rows.append(f"engine / plain (recipe's ZeRO {ds.zero_stage}): {result['ratio']:.3f}x; utilisation is training "
                f"FLOP/s ({result['flops_per_token']:,} per token) over the measured {result['dtype']} GEMM peak")
    for name, table in result.get("profiles", {}).items():
        rows += ["", f"{name}: the ops that took the most time", table]
    if result["device"] == "cpu":
        rows.append("* the process's peak resident set, shared by all paths")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("recipe")
    p.add_argument("--steps", type=int, default=50, help="timed steps per path (default 50)")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps per path first (default 10)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe value")
    p.add_argument("--plugin", action="append", default=[], help="also load this plugin file or module")
    p.add_argument("--json", metavar="FILE", help="also write the numbers as JSON")
    p.add_argument("--block", type=int, default=5, help="steps per path in each round (default 5)")
    p.add_argument("--reps", type=int, default=3, help="repetitions of each GEMM per round, the best kept (default 3)")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="afterwards, run STEPS steps of each path under torch.profiler and print the top ops")
    p.add_argument("--stages", default="", metavar="S,S",
                   help="also time the engine at these ZeRO stages (e.g. 0,2), beside the recipe's own")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.block < 1 or args.reps < 1 or args.profile < 0:
        p.error("--steps, --block and --reps must be >= 1, --warmup and --profile >= 0")
    ensure_accelerator()
    from toolkit.converter import ConfigError
    from toolkit.probe import load_buildable

    try:
        recipe = load_buildable(args.recipe, args.set, args.plugin)
        stages = [int(v) for v in args.stages.split(",") if v.strip()]
        if any(v not in (0, 1, 2, 3) for v in stages):
            raise ConfigError([f"--stages: ZeRO stages are 0 to 3, got {args.stages}"])
        result = bench(recipe, args.steps, args.warmup, args.block, stages, args.reps, args.profile)
    except (ConfigError, FileNotFoundError) as exc:
        for line in getattr(exc, "lines", [str(exc)]):
            print(f"error: {line}", file=sys.stderr)
        return 2
    print(render(result, recipe))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip gloo's shutdown (see toolkit.commands.train.cmd_train)
