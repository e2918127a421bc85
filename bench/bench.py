"""Throughput of the DeepSpeed engine against a plain PyTorch loop, on the same model and batch.

    python bench/bench.py recipes/gpt-cpu.toml [--steps 50 --warmup 10 --set train.micro_batch=16]

Both paths start from the same weights and train on the same fixed batch with the same optimizer
(AdamW, weight-decay groups, the recipe's schedule), precision (DeepSpeed's bf16/fp16 against
autocast with fp32 weights), compile setting, gradient accumulation and clipping, and read the
loss once per step. Their timed steps alternate in blocks so that a busy machine slows both alike;
step time is the median (wall clock, and the process's CPU time, which a busy machine disturbs
less when torch runs one thread: OMP_NUM_THREADS=1). MFU counts 6N + 12*L*H*Q*T FLOPs per token
(PaLM appendix B, as nanoGPT's estimate_mfu) against the device's dense bf16 peak; n/a on CPU. Peak memory on CUDA is what each
path holds (weights, optimizer, buffers) plus what one step adds; on CPU, the process's peak RSS.
"""
from __future__ import annotations

import argparse
import json
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


def mfu_flops_per_token(model) -> int:
    """nanoGPT's estimate: 6N (forward + backward through the weights) + 12*L*H*Q*T (attention scores)."""
    cfg = model.config
    return 6 * model.num_params() + 12 * cfg.n_layer * cfg.n_head * (cfg.n_embd // cfg.n_head) * cfg.block_size


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

    def run(self, n: int, record: bool = True) -> None:
        for _ in range(n):
            t0, c0 = time.perf_counter(), time.process_time()
            self.step().item()  # the one host sync per step, as in the trainer
            if record:
                self.times.append(time.perf_counter() - t0)
                self.cpu_times.append(time.process_time() - c0)


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


def bench(recipe, steps: int, warmup: int, block: int = 5, stages: list[int] | None = None) -> dict:
    """Warm every path up, then alternate timed blocks of ``block`` steps; the numbers of each and the ratios.

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
    flops = mfu_flops_per_token(reference)
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
    done = 0
    while done < steps:
        n = min(block, steps - done)
        for path in paths:
            path.run(n)
        done += n
    if not torch.cuda.is_available():
        for path in paths:
            path.mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    peak = peak_flops(dev)
    out = {"recipe": recipe.name, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "threads": torch.get_num_threads(), "tokens_per_step": plan.tokens_per_step, "steps": steps,
           "warmup": warmup, "flops_per_token": flops, "paths": {}, "ratios": {}, "cpu_ratios": {}}
    for path in paths:
        step_s = statistics.median(path.times)
        tps = plan.tokens_per_step / step_s
        out["paths"][path.name] = {"tokens_per_s": tps, "step_ms": 1000 * step_s,
                                   "cpu_ms": 1000 * statistics.median(path.cpu_times),
                                   "mfu": flops * tps / peak if peak else None, "peak_mem_bytes": path.mem}
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
    rows = [head, "", f"{'':<16}{'tokens/s':>12}{'MFU':>8}{'step ms':>10}{'cpu ms':>10}{mem_label:>12}"
                      f"{'vs plain':>10}{'(cpu)':>8}"]
    for name, p in result["paths"].items():
        mfu = f"{100 * p['mfu']:.1f}%" if p["mfu"] is not None else "n/a"
        ratio = f"{result['ratios'][name]:.3f}x" if name in result["ratios"] else ""
        cpu = result["cpu_ratios"].get(name)
        rows.append(f"{name:<16}{p['tokens_per_s']:>12,.0f}{mfu:>8}{p['step_ms']:>10.2f}{p['cpu_ms']:>10.2f}"
                    f"{p['peak_mem_bytes'] / 2**20:>10,.0f}MB{ratio:>10}{f'{cpu:.3f}x' if cpu else '':>8}")
    rows.append(f"engine / plain (recipe's ZeRO {ds.zero_stage}): {result['ratio']:.3f}x")
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
    p.add_argument("--stages", default="", metavar="S,S",
                   help="also time the engine at these ZeRO stages (e.g. 0,2), beside the recipe's own")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    ensure_accelerator()
    from toolkit.config import ConfigError
    from toolkit.recipe import load_recipe

    try:
        recipe = load_recipe(args.recipe, args.set, args.plugin)
        stages = [int(v) for v in args.stages.split(",") if v.strip()]
        if any(v not in (0, 1, 2, 3) for v in stages):
            raise ConfigError([f"--stages: ZeRO stages are 0 to 3, got {args.stages}"])
        result = bench(recipe, args.steps, args.warmup, stages=stages)
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
    os._exit(code)  # skip gloo's shutdown (see toolkit.cli.cmd_train)
