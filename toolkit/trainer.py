"""Training a recipe through DeepSpeed, into a run folder a person wants to open.

    runs/<recipe name>-<YYYYmmdd-HHMMSS>/
        recipe.toml        the resolved recipe (``playattention train`` it again to rerun)
        ds_config.json     the DeepSpeed config it ran with
        versions.json      python, torch, deepspeed, playattention and plugin versions
        metrics.jsonl      one "train" line per optimizer step, one "eval" line per evaluation
        losses.png         train and val loss vs step, redrawn at each evaluation
        summary.png        learning rate, gradient norm and tokens/s vs step
        samples.txt        generated text, each sample headed by the step it was drawn at
        checkpoints/       checkpoints, step-NNNNNNN, each committed whole (:mod:`toolkit.checkpoint`)
        resume.log         one entry per resume: from which checkpoint, what changed
        model.safetensors  fp32 weights under GPT-2 names, with model.toml and tokenizer.json:
                           the run without DeepSpeed (:func:`toolkit.generate.load_run`)
        summary.json       the result, also returned by :func:`train`

:class:`Trainer` reads top to bottom: ``fit`` is the loop, and each thing it does per step is a
named method. One optimizer step is ``grad_accum`` micro batches through the DeepSpeed engine,
which scales, accumulates and (across ranks) averages the gradients, clips them, and steps the
optimizer and the schedule at the accumulation boundary.

A run survives being stopped: SIGINT/SIGTERM finish the step, save a checkpoint and exit 130/143;
``resume=True`` continues a run folder from its newest complete checkpoint, bitwise as if it had
never stopped (fp32, same ranks); a NaN/inf loss stops the run without saving the broken state.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import resource
import signal
import sys
import threading
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


def train(recipe: Recipe, *, run_dir: str | Path | None = None, progress: bool = True, plugins=(),
          resume: bool = False) -> dict:
    """Train ``recipe`` and return its summary (also written to ``run_dir/summary.json``).

    ``plugins`` are extra plugin files or modules, loaded as if the recipe listed them. Problems
    found before training starts (recipe, data, batch arithmetic) raise; a failure during
    training is reported as ``status: "failed"`` with an ``error`` line, a SIGINT/SIGTERM as
    ``status: "interrupted"`` with the ``signal``. ``resume`` continues ``run_dir`` from its
    newest complete checkpoint.
    """
    return Trainer(recipe, run_dir=run_dir, progress=progress, plugins=plugins, resume=resume).run()


class Interrupted(Exception):
    """SIGINT or SIGTERM: the run stopped after a step and saved a checkpoint."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


class Diverged(Exception):
    """The loss became NaN or inf; nothing of that step was saved."""


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

    def __init__(self, recipe: Recipe, *, run_dir: str | Path | None = None, progress: bool = True, plugins=(),
                 resume: bool = False):
        self.recipe, self.cfg = recipe, recipe.train
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.progress = progress
        self.plugins = list(plugins)
        self.resume = resume  # continue run_dir from its newest complete checkpoint
        if resume and run_dir is None:
            raise ValueError("resume needs the run_dir to continue")
        self.saved_step: int | None = None  # the step of the newest checkpoint this run saved or loaded
        self.signal_received = 0  # SIGINT/SIGTERM seen by this rank (the handler sets it)
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
            self.check_finite(loss)  # NaN/inf: stop before anything of this step is logged or saved
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
            if not last and self.stop_requested():  # SIGINT/SIGTERM on any rank: every rank stops here
                self.stop()
        self.sample()
        self.save_checkpoint()
        self.export()

    def run(self) -> dict:
        """Set up, fit, and write the summary; returns the summary."""
        self.setup()
        status, error = "finished", None
        try:
            with self.stop_on_signals():
                self.fit()
        except Interrupted as exc:
            status, error = "interrupted", str(exc)
        except (Diverged, checkpoint.CheckpointError) as exc:  # said in one line; a traceback adds nothing
            status, error = "failed", str(exc)
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

    # -- stopping: signals and divergence ----------------------------------------------------------
    def check_finite(self, loss: float) -> None:
        """Raise Diverged on a NaN or inf loss, naming the step and the last good checkpoint."""
        if not math.isfinite(loss):
            good = checkpoint.latest(self.run_dir / "checkpoints")
            raise Diverged(f"loss is {loss} at step {self.step + 1}; stopped without saving, the last good "
                           f"checkpoint is {good or 'none (no checkpoint was saved yet)'}")

    @contextlib.contextmanager
    def stop_on_signals(self):
        """While fitting, SIGINT/SIGTERM ask for a stop after the current step; a second one acts at once."""
        if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
            yield
            return
        previous = {s: signal.getsignal(s) or signal.SIG_DFL for s in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum, _frame):
            self.signal_received = signum
            for s, h in previous.items():
                signal.signal(s, h)
            who = f"rank {self.rank}: " if self.world_size > 1 else ""
            sys.stderr.write(f"\n{who}{signal.Signals(signum).name}: finishing this step, then saving a "
                             f"checkpoint and stopping (send it again to stop at once, unsaved)\n")

        for s in previous:
            signal.signal(s, handler)
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def stop_requested(self) -> bool:
        """Whether any rank got SIGINT/SIGTERM; every rank gets the same answer (one int, all-reduced)."""
        signum = self.signal_received
        if self.world_size > 1:
            import torch.distributed as dist

            flag = torch.tensor([signum], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            signum = int(flag.item())
        # only ever set, never cleared: a signal that lands during the all-reduce (its handler runs
        # as the collective returns) is in self.signal_received but not in signum; the next step stops
        if signum:
            self.signal_received = signum
        return signum != 0

    def stop(self) -> None:
        """Save a checkpoint of this step, then raise Interrupted saying how to resume."""
        self.save_checkpoint()
        nproc = f" --nproc {self.world_size}" if self.world_size > 1 else ""
        raise Interrupted(self.signal_received,
                          f"{signal.Signals(self.signal_received).name} at step {self.step}: saved "
                          f"{self.run_dir / 'checkpoints' / checkpoint.tag_for(self.step)}; resume with: "
                          f"playattention train --resume {self.run_dir}{nproc}")

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
            if self.bar.disable:  # a log file or a scheduler's output: plain lines instead of bar frames
                self.say(self.log_line(loss, lr, tokens_per_s, mfu))

    def log_line(self, loss: float, lr: float, tokens_per_s: float, mfu: float | None) -> str:
        """``step 100/2000: loss 2.1234, lr 1.00e-03, 15,000 tokens/s, ETA 1m40s`` (MFU on GPUs)."""
        recent = self.step_times[-20:]
        eta = int((self.cfg.max_steps - self.step) * sum(recent) / len(recent))
        mins, secs = divmod(eta, 60)
        return (f"step {self.step}/{self.cfg.max_steps}: loss {loss:.4f}, lr {lr:.2e}, {tokens_per_s:,.0f} tokens/s"
                + (f", MFU {mfu:.1%}" if mfu is not None else "") + f", ETA {mins}m{secs:02d}s")

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
        """A checkpoint of this step, committed whole: DeepSpeed's engine state plus ours (a collective).

        Ours: step, tokens, best val loss, every rank's loader position and RNG states, the
        tokenizer, and the recipe with the plugin versions that built the model.
        """
        path = self.run_dir / "checkpoints" / checkpoint.tag_for(self.step)
        if self.saved_step == self.step:  # saved (or resumed from) already
            return path
        state = {"step": self.step, "tokens": self.tokens, "best_val_loss": self.best_val_loss,
                 "last_eval": self.last_eval, "elapsed": self.elapsed(),
                 "loaders": self.gather_objects(self.train_loader.state_dict()),
                 "rng": self.gather_objects(checkpoint.rng_state()), **self.identity}
        checkpoint.save(self.engine, self.run_dir / "checkpoints", self.step, state,
                        keep=self.cfg.keep_checkpoints, tokenizer=self.tokenizer)
        self.saved_step = self.step
        return path

    def load_checkpoint(self, tag: str | None = None) -> dict:
        """Restore the engine, step, tokens, data position and RNG states of a checkpoint (default: newest complete)."""
        state = checkpoint.load(self.engine, self.run_dir / "checkpoints", tag)
        self.step, self.tokens, self.elapsed_before = state["step"], state["tokens"], state["elapsed"]
        self.best_val_loss = math.inf if state["best_val_loss"] is None else state["best_val_loss"]
        self.last_eval = state["last_eval"]
        # a loader position counts the windows of all ranks together: any rank's serves every rank
        self.train_loader.load_state_dict(state["loaders"][0])
        if state["world_size"] == self.world_size:
            checkpoint.set_rng_state(state["rng"][self.rank])  # the same dropout masks as if never stopped
        else:
            checkpoint.reseed(self.cfg.seed + 1009 * self.step + self.rank)
        self.saved_step = self.step
        return state

    def check_resume(self) -> None:
        """Refuse a resume that changes the model, its plugins or the engine layout (a line per change)."""
        from .config import ConfigError

        found = checkpoint.latest(self.run_dir / "checkpoints")
        if found is None:
            raise checkpoint.CheckpointError(f"{self.run_dir}: no complete checkpoint to resume from")
        saved = checkpoint.read_state(found)
        refused, self.resume_changes = checkpoint.identity_changes(saved, self.identity)
        if refused:
            raise ConfigError([f"cannot resume {self.run_dir} from {found.name}: the model, its plugins or the "
                               f"engine layout differ from the checkpoint's:", *refused])
        if saved["step"] >= self.cfg.max_steps:
            raise ConfigError([f"train.max_steps: {self.run_dir} is at step {saved['step']} already, max_steps is "
                               f"{self.cfg.max_steps}; raise it to train on (--set train.max_steps=N)"])
        self.resume_from = found, saved

    def record_resume(self) -> None:
        """Drop metrics and samples logged after the checkpoint; note the resume in resume.log and metrics.jsonl."""
        found, saved = self.resume_from
        checkpoint.trim_metrics(self.run_dir / "metrics.jsonl", self.step)
        checkpoint.trim_samples(self.run_dir / "samples.txt", self.step)
        ranks = f"{self.world_size} rank(s)"
        if saved["world_size"] != self.world_size:
            ranks += f" (it was saved by {saved['world_size']}: new optimizer partitions, data position kept)"
        lines = [f"{time.strftime('%Y-%m-%d %H:%M:%S')} resumed at step {self.step} from {found} on {ranks}",
                 *(f"  changed {c}" for c in self.resume_changes)]
        with open(self.run_dir / "resume.log", "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"type": "resume", "step": self.step, "checkpoint": found.name,
                                "world_size": self.world_size, "saved_world_size": saved["world_size"],
                                "changes": self.resume_changes}) + "\n")
        if self.progress:
            print("\n".join(lines), file=sys.stderr)

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
        self.identity = checkpoint.identity(recipe, registry)  # saved with each checkpoint
        if self.resume:
            self.check_resume()
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
        checkpoint.check_room(self.run_dir, self.params, recipe.deepspeed.precision, recipe.deepspeed.zero_stage,
                              self.cfg.keep_checkpoints)
        # forward FLOPs; counted (like params) before ZeRO 3 partitions the weights
        self.flops_per_token = model.flops_per_token(recipe.model.block_size)
        self.engine = build_engine(model, recipe).engine
        self.device = device()
        if self.resume:
            self.load_checkpoint()
        self.peak = peak_flops(self.device)
        self.t_start = time.perf_counter()
        if self.is_main:
            self.write_run_files(registry)
            if self.resume:
                self.record_resume()
        self.metrics = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") if self.is_main else None
        from tqdm.auto import tqdm

        self.bar = tqdm(total=self.cfg.max_steps, initial=self.step, unit="step", dynamic_ncols=True,
                        desc=recipe.name, file=sys.stderr,
                        disable=not (self.progress and self.is_main and shows_a_bar()))

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

        chosen = [str(self.run_dir or default_run_dir(self.recipe)) if self.is_main else None, None]
        if self.is_main:
            chosen[1] = checkpoint.unwritable(chosen[0])  # creates it; None, or why it cannot be written
        dist.broadcast_object_list(chosen, src=0)
        if chosen[1]:
            raise checkpoint.CheckpointError(chosen[1])
        self.run_dir = Path(chosen[0])
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
            "signal": self.signal_received if status == "interrupted" else None,  # SIGINT 2, SIGTERM 15
            "checkpoint": str(checkpoint.latest(self.run_dir / "checkpoints") or "") or None,  # the one to resume
        }
        if self.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            if (self.run_dir / "metrics.jsonl").exists():
                self.plot(summary=True)
        if self.world_size > 1 and status != "failed":
            # no rank leaves before rank 0 has written: torchrun ends the others once one exits non-zero
            # (143 after a SIGTERM). A failed rank may be out of step with the rest, so it does not wait.
            import torch.distributed as dist

            dist.barrier()
        return summary


def shows_a_bar() -> bool:
    """A terminal or a notebook (tqdm.auto's widget); log files get plain lines (Trainer.log_line)."""
    return sys.stderr.isatty() or "ipykernel" in sys.modules


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
