"""Training a recipe through DeepSpeed, into a run folder a person wants to open.

    runs/<recipe name>-<YYYYmmdd-HHMMSS>/
        recipe.toml        the resolved recipe (``playattention train`` it again to rerun)
        ds_config.json     the DeepSpeed config it ran with
        versions.json      python, torch, deepspeed, playattention and plugin versions
        metrics.jsonl      one "train" line per optimizer step, one "eval" line per evaluation
        losses.png         train and val loss vs step, redrawn at each evaluation
        summary.png        learning rate, gradient norm and tokens/s vs step
        samples.txt        generated text, each sample headed by the step it was drawn at
        checkpoints/       DeepSpeed checkpoints, step-NNNNNNN
        model.safetensors  fp32 weights under GPT-2 names, with model.toml and tokenizer.json:
                           the run without DeepSpeed (:func:`toolkit.generate.load_run`)
        summary.json       the result, also returned by :func:`train`

:class:`Trainer` reads top to bottom: ``fit`` is the loop, and each thing it does per step is a
named method. One optimizer step is ``grad_accum`` micro batches through the DeepSpeed engine,
which scales, accumulates and (across ranks) averages the gradients, clips them, and steps the
optimizer and the schedule at the accumulation boundary.
"""
from __future__ import annotations

import json
import math
import os
import re
import resource
import sys
import time
import traceback
import warnings
from pathlib import Path

import attrs
import torch

from . import checkpoint
from .engine import (batch_plan, build_engine, check_precision, deepspeed_config, device, engine_step,
                     init_distributed, peak_flops)
from .generate import load_run  # noqa: F401 - re-exported: toolkit.trainer.load_run(run_dir)
from .recipe import Recipe

#: the first steps are left out of the mean throughput (allocator warm-up, compilation)
TIMING_SKIP = 3


def train(recipe: Recipe, *, run_dir: str | Path | None = None, progress: bool = True, plugins=()) -> dict:
    """Train ``recipe`` and return its summary (also written to ``run_dir/summary.json``).

    ``plugins`` are extra plugin files or modules, loaded as if the recipe listed them. Problems
    found before training starts (recipe, data, batch arithmetic) raise; a failure during
    training is reported as ``status: "failed"`` with an ``error`` line.
    """
    return Trainer(recipe, run_dir=run_dir, progress=progress, plugins=plugins).run()


def default_run_dir(recipe: Recipe) -> Path:
    """``<train.out_dir>/<recipe name>-<YYYYmmdd-HHMMSS>``, with a numeric suffix if that exists."""
    name = re.sub(r"[^\w.-]+", "-", recipe.name).strip("-") or "run"
    base = Path(recipe.train.out_dir) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


class Trainer:
    """Trains one recipe on this rank; every rank of a launch runs the same Trainer."""

    def __init__(self, recipe: Recipe, *, run_dir: str | Path | None = None, progress: bool = True, plugins=()):
        self.recipe, self.cfg = recipe, recipe.train
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.progress = progress
        self.plugins = list(plugins)
        self.step = 0  # optimizer steps taken
        self.tokens = 0  # tokens trained on, all ranks together
        self.last_eval: dict = {}
        self.best_val_loss = math.inf
        self.step_times: list[float] = []
        self.elapsed_before = 0.0  # wall time of earlier sessions of this run (resume)

    # -- the loop --------------------------------------------------------------------------
    def fit(self) -> None:
        """Evaluate, then train to max_steps with periodic evaluation, samples and checkpoints."""
        cfg = self.cfg
        if self.step == 0:
            self.evaluate()
        while self.step < cfg.max_steps:
            lr = self.lr()
            t0 = time.perf_counter()
            loss = self.train_step()
            loss, grad_norm = self.read_step(loss)  # the one host sync of the step
            self.step += 1
            self.tokens += self.plan.tokens_per_step
            self.log(loss, lr, grad_norm, time.perf_counter() - t0)
            last = self.step == cfg.max_steps
            if self.step % cfg.eval_interval == 0 or last:
                self.evaluate()
            if cfg.sample_interval and self.step % cfg.sample_interval == 0 and not last:
                self.sample()
            if cfg.checkpoint_interval and self.step % cfg.checkpoint_interval == 0 and not last:
                self.save_checkpoint()
        self.sample()
        self.save_checkpoint()
        self.export()

    def run(self) -> dict:
        """Set up, fit, and write the summary; returns the summary."""
        self.setup()
        status, error = "finished", None
        try:
            self.fit()
        except Exception as exc:  # noqa: BLE001 - the run folder records the failure
            status, error = "failed", f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        except BaseException:  # KeyboardInterrupt, SystemExit: record, then let it through
            self.close()
            self.finish("failed", "interrupted")
            raise
        self.close()
        return self.finish(status, error)

    # -- one step --------------------------------------------------------------------------
    def train_step(self) -> torch.Tensor:
        """One optimizer step over grad_accum micro batches; the mean loss, still on the device."""
        return engine_step(self.engine, lambda: self.batch(self.train_loader), self.plan.grad_accum)

    def read_step(self, loss: torch.Tensor) -> tuple[float, float | None]:
        """(loss averaged over ranks, gradient norm before clipping) as Python floats."""
        if self.world_size > 1:
            loss = self.mean_over_ranks(loss)
        norm = self.engine.get_global_grad_norm()
        if isinstance(norm, torch.Tensor):
            values = torch.stack([loss.float(), norm.detach().to(loss.device, torch.float32)]).tolist()
            return values[0], values[1]
        return loss.item(), (float(norm) if norm is not None else None)

    def batch(self, loader) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = loader.next_batch()
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def lr(self) -> float:
        """The learning rate the next optimizer step uses."""
        return float(self.engine.get_lr()[0])

    def mean_over_ranks(self, value: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        value = value.detach().clone().float()
        dist.all_reduce(value)  # SUM: gloo has no AVG
        return value / self.world_size

    # -- evaluation and samples --------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean train and val loss over eval_batches fixed batches per rank (the same batches each time)."""
        self.engine.eval()
        losses = {}
        for split, loader in self.eval_loaders.items():
            loader.reset()
            total = torch.zeros((), device=self.device)
            for _ in range(self.cfg.eval_batches):
                x, y = self.batch(loader)
                _, loss = self.engine(x, y)
                total += loss.float()
            losses[split] = self.mean_over_ranks(total / self.cfg.eval_batches).item()
        self.engine.train()
        row = {"type": "eval", "step": self.step, "tokens": self.tokens, "train_loss": losses["train"],
               "val_loss": losses["val"], "elapsed": self.elapsed()}
        self.last_eval = row
        self.best_val_loss = min(self.best_val_loss, losses["val"])
        if self.is_main:
            self.write_metrics(row)
            self.say(f"step {self.step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
            self.plot()
        return row

    def sample(self) -> list[str]:
        """Generate from every prompt of [generate] and append the texts to samples.txt."""
        from .generate import sample

        texts = []
        # ZeRO 3 gathers each layer's weights on every forward, so all ranks generate in step
        if self.is_main or self.recipe.deepspeed.zero_stage == 3:
            module, gen = self.engine.module, self.recipe.generate
            with torch.compiler.set_stance("force_eager"):  # no recompilation for every new length
                texts = [sample(module, self.tokenizer, p, gen, device=self.device) for p in gen.prompts]
        if self.is_main:
            g = self.recipe.generate
            with open(self.run_dir / "samples.txt", "a", encoding="utf-8") as f:
                for i, text in enumerate(texts):
                    f.write(f"=== step {self.step} | sample {i + 1}/{len(texts)} | temperature {g.temperature}, "
                            f"top_k {g.top_k}, top_p {g.top_p}, seed {g.seed} ===\n{text}\n\n")
        return texts

    # -- logging -----------------------------------------------------------------------------
    def log(self, loss: float, lr: float, grad_norm: float | None, dt: float) -> None:
        """Record one step: a metrics line, the throughput, the progress bar."""
        self.step_times.append(dt)
        tokens_per_s = self.plan.tokens_per_step / dt
        mfu = None
        if self.peak is not None:  # training ~ 3x forward FLOPs (forward + backward)
            mfu = 3 * self.flops_per_token * tokens_per_s / (self.peak * self.world_size)
        if not self.is_main:
            return
        self.write_metrics({"type": "train", "step": self.step, "tokens": self.tokens, "loss": loss, "lr": lr,
                            "grad_norm": grad_norm, "tokens_per_s": tokens_per_s, "mfu": mfu,
                            "elapsed": self.elapsed()})
        self.bar.update(1)
        if self.step % self.cfg.log_interval == 0 or self.step == 1:
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)

    def say(self, message: str) -> None:
        """A line above the progress bar (rank 0, and only when showing progress)."""
        if self.progress and self.is_main:
            self.bar.write(message, file=sys.stderr)

    def write_metrics(self, row: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        self.metrics.write(json.dumps(clean) + "\n")
        self.metrics.flush()

    def plot(self, summary: bool = False) -> None:
        """Redraw losses.png (at every evaluation) and, at the end, summary.png."""
        from .plots import plot_losses, plot_summary

        plot_losses(self.run_dir / "metrics.jsonl", self.run_dir / "losses.png", title=self.recipe.name)
        if summary:
            plot_summary(self.run_dir / "metrics.jsonl", self.run_dir / "summary.png", title=self.recipe.name)

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t_start

    # -- checkpoints and export -----------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """A DeepSpeed checkpoint of this step, with the step, tokens and every rank's loader state."""
        state = {"step": self.step, "tokens": self.tokens, "best_val_loss": self.best_val_loss,
                 "elapsed": self.elapsed(), "world_size": self.world_size,
                 "loaders": self.gather_objects(self.train_loader.state_dict())}
        return checkpoint.save(self.engine, self.run_dir / "checkpoints", self.step, state,
                               keep=self.cfg.keep_checkpoints)

    def load_checkpoint(self, tag: str | None = None) -> dict:
        """Restore the engine, step, tokens and this rank's loader from a checkpoint (default: newest)."""
        state = checkpoint.load(self.engine, self.run_dir / "checkpoints", tag)
        if state.get("world_size", self.world_size) != self.world_size:
            raise ValueError(f"checkpoint was written by {state['world_size']} ranks; this launch has {self.world_size}")
        self.step, self.tokens = state["step"], state["tokens"]
        self.best_val_loss = state.get("best_val_loss", math.inf)
        self.elapsed_before = state.get("elapsed", 0.0)
        self.train_loader.load_state_dict(state["loaders"][self.rank])
        return state

    def export(self) -> Path:
        """model.safetensors (fp32, GPT-2 names, a tied head once) and model.toml; a collective."""
        from .engine import full_fp32_state_dict

        state = full_fp32_state_dict(self.engine)
        path = self.run_dir / checkpoint.WEIGHTS
        if self.is_main:
            checkpoint.export_weights(state, path, tied=self.recipe.model.tie_embeddings,
                                      metadata={"format": "pt", "recipe": self.recipe.name, "step": self.step})
            (self.run_dir / "model.toml").write_text(self.model_toml())
        return path

    def model_toml(self) -> str:
        import tomli_w

        from .recipe import recipe_to_dict

        d = recipe_to_dict(self.recipe)
        return tomli_w.dumps({"plugins": d.get("plugins", []), "model": d["model"]})

    def gather_objects(self, obj) -> list:
        import torch.distributed as dist

        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    # -- set-up and summary --------------------------------------------------------------------
    def setup(self) -> None:
        """Everything before the first step; raises on problems the user must fix."""
        from .model import Transformer
        from .plugin_manager import get_registry

        warnings.filterwarnings("ignore", message=r".*is deprecated. Please use .*_single", category=FutureWarning)
        self.rank, self.world_size = init_distributed()
        self.is_main = self.rank == 0
        self.recipe = recipe = self.resolved_recipe()
        registry = get_registry(recipe.plugins)
        check_precision(recipe)
        self.plan = batch_plan(recipe, self.world_size)
        self.ds_config = deepspeed_config(recipe, self.world_size)
        self.tokenizer, prepared = self.prepare_data()
        self.check_model_fits_data(prepared)
        self.make_loaders(prepared)
        self.make_run_dir()
        torch.manual_seed(self.cfg.seed)  # the same initial weights on every rank
        model = Transformer(recipe.model, registry)
        self.params = model.num_params()
        self.flops_per_token = model.flops_per_token(recipe.model.block_size)  # forward; counted before ZeRO 3 partitions
        self.engine = build_engine(model, recipe).engine
        self.device = device()
        self.peak = peak_flops(self.device)
        self.t_start = time.perf_counter()
        if self.is_main:
            self.write_run_files(registry)
        self.metrics = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") if self.is_main else None
        from tqdm.auto import tqdm

        self.bar = tqdm(total=self.cfg.max_steps, initial=self.step, unit="step", dynamic_ncols=True,
                        desc=recipe.name, disable=not (self.progress and self.is_main), file=sys.stderr)

    def resolved_recipe(self) -> Recipe:
        """The recipe with extra plugins added and plugin file paths made absolute (a run loads anywhere)."""
        specs = []
        for spec in [*self.recipe.plugins, *self.plugins]:
            if spec.endswith(".py") or "/" in spec or os.sep in spec:
                spec = str(Path(spec).resolve())
            if spec not in specs:
                specs.append(spec)
        return attrs.evolve(self.recipe, plugins=specs)

    def prepare_data(self):
        """Prepare the dataset (rank 0 first, the others then find it ready); the tokenizer and prepared dir."""
        import torch.distributed as dist

        from . import data
        from .generate import check_generate_config
        from .tokenizer import load_tokenizer

        if self.is_main:
            prepared = data.prepare(self.recipe.data, progress=self.progress)
        dist.barrier()
        if not self.is_main:
            prepared = data.prepare(self.recipe.data, progress=False)
        tokenizer = load_tokenizer(prepared)
        check_generate_config(self.recipe.generate, tokenizer)
        return tokenizer, prepared

    def check_model_fits_data(self, prepared) -> None:
        from .config import ConfigError

        vocab = self.recipe.model.vocab_size
        if vocab < self.tokenizer.vocab_size:
            raise ConfigError([f"model.vocab_size: {vocab} is smaller than the {self.tokenizer.name} tokenizer's "
                               f"vocabulary of {self.tokenizer.vocab_size} tokens (data {prepared})"])

    def make_loaders(self, prepared) -> None:
        from .data import TokenLoader

        mb, T, seed = self.cfg.micro_batch, self.recipe.model.block_size, self.cfg.seed
        kw = dict(rank=self.rank, world_size=self.world_size)
        self.train_loader = TokenLoader(prepared, "train", mb, T, seed=seed, **kw)
        # separate loaders for evaluation, reset before each one: every evaluation sees the same batches
        self.eval_loaders = {split: TokenLoader(prepared, split, mb, T, seed=seed + 1 + i, **kw)
                             for i, split in enumerate(("train", "val"))}

    def make_run_dir(self) -> None:
        """Rank 0 picks the folder (the others may start a second later) and tells every rank."""
        import torch.distributed as dist

        chosen = [str(self.run_dir or default_run_dir(self.recipe)) if self.is_main else None]
        dist.broadcast_object_list(chosen, src=0)
        self.run_dir = Path(chosen[0])
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        dist.barrier()

    def write_run_files(self, registry) -> None:
        from .recipe import dump_recipe

        (self.run_dir / "recipe.toml").write_text(dump_recipe(self.recipe))
        (self.run_dir / "ds_config.json").write_text(json.dumps(self.ds_config, indent=2) + "\n")
        (self.run_dir / "versions.json").write_text(json.dumps(versions(registry), indent=2) + "\n")
        self.tokenizer.save(self.run_dir)

    def close(self) -> None:
        if getattr(self, "bar", None) is not None:
            self.bar.close()
        if getattr(self, "metrics", None) is not None:
            self.metrics.close()
            self.metrics = None

    def finish(self, status: str, error: str | None = None) -> dict:
        """The run's summary; rank 0 writes summary.json and redraws the plots."""
        timed = self.step_times[TIMING_SKIP:] or self.step_times[1:] or self.step_times
        summary = {
            "run_dir": str(self.run_dir),
            "status": status,
            "error": error,
            "recipe": self.recipe.name,
            "steps": self.step,
            "tokens": self.tokens,
            "final_train_loss": self.last_eval.get("train_loss"),
            "final_val_loss": self.last_eval.get("val_loss"),
            "best_val_loss": self.best_val_loss if math.isfinite(self.best_val_loss) else None,
            "tokens_per_s": self.plan.tokens_per_step * len(timed) / sum(timed) if timed else None,
            "peak_mem_bytes": peak_memory_bytes(self.device),
            "wall_s": self.elapsed(),
            "params": self.params,
            "flops_per_token": self.flops_per_token,
            "world_size": self.world_size,
            "tokens_per_step": self.plan.tokens_per_step,
        }
        if self.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            if (self.run_dir / "metrics.jsonl").exists():
                self.plot(summary=True)
        return summary


def peak_memory_bytes(dev: torch.device) -> int:
    """CUDA: the most memory tensors held; CPU: the process's peak resident set."""
    if dev.type == "cuda":
        return int(torch.cuda.max_memory_allocated(dev))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def versions(registry) -> dict:
    """Versions of everything that shaped the run, plugin packages from the registry's sources."""
    import importlib.metadata as md
    import platform

    import deepspeed

    def version(dist: str) -> str | None:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return None

    plugins: dict[tuple, dict] = {}
    for comp in registry:
        src = comp.source
        entry = plugins.setdefault((src.plugin, src.package, src.version),
                                   {"plugin": src.plugin, "package": src.package, "version": src.version,
                                    "components": []})
        entry["components"].append(f"{comp.family}:{comp.name}")
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "deepspeed": deepspeed.__version__,
        "playattention": version("playattention"),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "plugins": list(plugins.values()),
    }
