"""Training a recipe through DeepSpeed, into a run folder a person wants to open (:mod:`toolkit.runfolder`).

:class:`Trainer` reads top to bottom: ``fit`` is the loop, and each thing it does per step is a
named method handing work to a small collaborator: the run folder (metrics, plots, samples,
summary), the :class:`~toolkit.checkpointer.Checkpointer`, the evaluators
(:mod:`toolkit.evaluate`), the progress display and the stop signals. One optimizer step is
``grad_accum`` micro batches through the DeepSpeed engine, which scales, accumulates and (across
ranks) averages the gradients, clips them, and steps the optimizer and the schedule at the
accumulation boundary.

A run survives being stopped: SIGINT/SIGTERM finish the step, save a checkpoint and exit 130/143;
``resume=True`` continues a run folder from its newest complete checkpoint, bitwise as if it had
never stopped (fp32, same ranks); a NaN/inf loss stops the run without saving the broken state.
"""
from __future__ import annotations

import collections
import errno
import math
import resource
import signal
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import attrs
import torch
import torch.distributed as dist

from . import checkpoint, data
from .checkpointer import Checkpointer
from .engine import (batch_plan, build_engine, deepspeed_config, device, engine_step, full_fp32_state_dict,
                     init_distributed, one_rank_zero_note, peak_flops, schedule)
from .contracts import set_progress
from .convert import check_init, init_weights
from .errors import CheckpointError, ConfigError, UsageError, UserError
from .evaluate import EvalContext, LossEvaluator, build_evaluators, run_evaluators
from .generate import check_generate_config, sample
from .model import Transformer
from .plugin_manager import is_path_spec
from .progress import Progress
from .recipe import Recipe, registry_of
from .runfolder import WEIGHTS, RunFolder, files_problem, locked_by_launcher, lock_folder, new_run_dir, unwritable
from .signals import StopSignals
from .trackers import Trackers
from .tokenizer import load_tokenizer

#: the first steps are left out of the mean throughput (allocator warm-up, compilation)
TIMING_SKIP = 3
#: the summary's auxiliary losses are their mean over this many last steps (one step's are noisy)
AUX_WINDOW = 50


def train(recipe: Recipe, *, run_dir: str | Path | None = None, progress: bool = True, plugins=(),
          resume: bool = False, init_from: str | Path | None = None, verbose: bool = False,
          launched: tuple[float, float] | None = None) -> dict:
    """Train ``recipe`` and return its summary (also written to ``run_dir/summary.json``).

    ``plugins`` are extra plugin files or modules, loaded as if the recipe listed them. Problems
    found before training starts (recipe, data, batch arithmetic) raise; a failure during
    training is reported as ``status: "failed"`` with an ``error`` line, a SIGINT/SIGTERM as
    ``status: "interrupted"`` with the ``signal``. ``resume`` continues ``run_dir`` from its
    newest complete checkpoint. ``init_from`` starts the weights from a run or Hugging Face folder
    whose model the recipe must describe (:func:`toolkit.convert.init_weights`). The start-up phases
    go into the summary (``startup``), and with ``verbose`` on stderr once the first step is done;
    ``launched`` is (process start, imports done) on ``time.perf_counter``'s clock, from the command line.
    """
    return Trainer(recipe, run_dir=run_dir, progress=progress, plugins=plugins, resume=resume,
                   init_from=init_from, verbose=verbose, launched=launched).run()


class Interrupted(Exception):
    """SIGINT or SIGTERM: the run stopped after a step and saved a checkpoint."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


class Diverged(Exception):
    """The loss became NaN or inf; nothing of that step was saved."""


class Trainer:
    """Trains one recipe on this rank; every rank of a launch runs the same Trainer."""

    def __init__(self, recipe: Recipe, *, run_dir: str | Path | None = None, progress: bool = True, plugins=(),
                 resume: bool = False, init_from: str | Path | None = None, verbose: bool = False,
                 launched: tuple[float, float] | None = None):
        if resume and run_dir is None:
            raise ValueError("resume needs the run_dir to continue")
        if resume and init_from is not None:
            raise UsageError("--init-from starts a new run from other weights; --resume continues this run's own")
        specs = list(dict.fromkeys(str(Path(p).resolve()) if is_path_spec(p) else p
                                   for p in [*recipe.plugins, *plugins]))
        self.recipe = attrs.evolve(recipe, plugins=specs)  # absolute plugin paths: the run loads anywhere
        self.cfg = self.recipe.train
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.progress = progress
        self.resume = resume  # continue run_dir from its newest complete checkpoint
        self.init_from = init_from  # a run or Hugging Face folder the weights start from
        self.step = 0  # optimizer steps taken
        self.tokens = 0  # tokens trained on, all ranks together
        self.last_eval: dict = {}
        self.best_val_loss = math.inf
        self.elapsed_before = 0.0  # wall time of earlier sessions of this run (resume)
        self.recent_aux: collections.deque = collections.deque(maxlen=AUX_WINDOW)  # the last steps' aux losses
        self.component_metrics: dict = {}  # the components' metrics, as last logged
        self.locked, self.run_lock = False, None  # the run folder's writer lock (rank 0 holds it)
        self.end_errors: list[str] = []  # what failed after the last step was saved and exported
        self.verbose, self.launched = verbose, launched
        self.startup: dict[str, float] = {}  # seconds of each start-up phase, up to the end of the first step
        self.mark = time.perf_counter()  # the end of the last timed phase

    def phase(self, name: str) -> None:
        """The time since the last phase ended counts to ``name``."""
        now = time.perf_counter()
        self.startup[name] = self.startup.get(name, 0.0) + now - self.mark
        self.mark = now

    # -- the loop --------------------------------------------------------------------------
    def fit(self) -> None:
        """Evaluate, then train to max_steps with periodic evaluation, samples and checkpoints."""
        cfg = self.cfg
        if self.step == 0:
            self.evaluate()
            self.phase("first eval")
        while self.step < cfg.max_steps:
            lr = self.lr_of(self.step)
            set_progress(self.engine.module, self.step, cfg.max_steps)  # a component option on a schedule
            t0 = time.perf_counter()
            loss, grad_norm, aux = self.read_step(*self.train_step())  # the one host sync of the step
            self.check_finite(loss + sum(aux.values()))  # NaN/inf: stop before anything of this step is kept
            self.step += 1
            self.tokens += self.plan.tokens_per_step
            self.log(loss, lr, grad_norm, aux, time.perf_counter() - t0)
            if "first step" not in self.startup:
                self.started()
            last = self.step == cfg.max_steps
            if self.step % cfg.eval_interval == 0 and not last:
                self.evaluate()
                self.keep_if_best()
            if cfg.sample_interval and self.step % cfg.sample_interval == 0 and not last:
                self.sample()
            if cfg.checkpoint_interval and self.step % cfg.checkpoint_interval == 0 and not last:
                self.save_checkpoint()
            if not last and self.signals.stop_requested():  # SIGINT/SIGTERM on any rank: every rank stops here
                self.stop()
        # the end: nothing after the last optimizer step may lose it, so the final checkpoint and the
        # export come before the sample, and a failing evaluation or sample is one line of a finished run
        if self.saved_step != self.step:  # else a resume of a run stopped in its last moments: evaluated and saved
            self.after_last_step("the final evaluation", self.evaluate)
            self.save_checkpoint()
            self.export()
            self.after_last_step("the final sample", self.sample)
        else:
            self.export()

    def after_last_step(self, what: str, work) -> None:
        """Run ``work``; an exception is kept as one line of the summary (``end_errors``), not a failed run."""
        try:
            work()
        except Exception as exc:  # noqa: BLE001 - a plugin evaluator, the sampler, a plot: the run is trained
            first = (str(exc).strip().splitlines() or [""])[0]
            self.end_errors.append(f"{what} failed after step {self.step} ({type(exc).__name__}: {first}); "
                                   f"the run is finished and usable: its checkpoint and {WEIGHTS} "
                                   f"are written")

    def started(self) -> None:
        """The first step is done: the start-up's total, and with --verbose its phases on stderr."""
        self.phase("first step")
        begin = self.launched[0] if self.launched else self.mark - sum(self.startup.values())
        self.startup["total"] = self.mark - begin
        if self.verbose and self.is_main:
            line = "start-up: " + ", ".join(f"{k} {v:.2f} s" for k, v in self.startup.items())
            if self.display.enabled:  # above the progress bar, not through it
                self.display.say(line)
            else:  # --quiet --verbose: asked for, so said
                print(line, file=sys.stderr)

    def run(self) -> dict:
        """Set up, fit, and write the summary; returns the summary. The run folder stays locked until then."""
        try:
            return self._run()
        finally:
            if self.run_lock is not None:
                self.run_lock.release()

    def _run(self) -> dict:
        self.setup()
        status, error = "finished", None
        try:
            with self.signals.catching():
                self.fit()
        except Interrupted as exc:
            status, error = "interrupted", str(exc)
        except (Diverged, UserError) as exc:  # a checkpoint, a refused file: one line; a traceback adds nothing
            status, error = "failed", str(exc)
        except (OSError, RuntimeError) as exc:  # a full disk (torch.save and safetensors say it as RuntimeError)
            status, error = "failed", self.disk_error(exc)
            if error is None:
                error = f"{type(exc).__name__}: {exc}"
                # on several ranks it is mostly a peer that died mid-collective (gloo: "Connection closed
                # by peer"): the launcher names the rank that died, and a traceback would bury that line
                if self.world_size == 1:
                    traceback.print_exc()
        except Exception as exc:  # noqa: BLE001 - the run folder records the failure
            status, error = "failed", f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        except BaseException:  # KeyboardInterrupt, SystemExit: record, then let it through
            self.close()
            self.finish("failed", "interrupted")
            raise
        self.close()
        return self.finish(status, error)

    # -- set-up ----------------------------------------------------------------------------
    def setup(self) -> None:
        """Everything before the first step; raises on problems the user must fix."""
        warnings.filterwarnings("ignore", message=r".*is deprecated. Please use .*_single", category=FutureWarning)
        # one fixed thread count for ATen's OpenMP and MKL alike: torch.set_num_threads also turns off
        # MKL's dynamic choice of threads per GEMM (mkl_set_dynamic(0)), and a GEMM or reduction on
        # another number of threads sums in another order (docs/checkpoints.md: reproducibility)
        torch.set_num_threads(torch.get_num_threads())
        if self.launched:  # the command line's imports, then its checks of the recipe before training
            self.startup["imports"] = self.launched[1] - self.launched[0]
            self.startup["command"] = self.mark - self.launched[1]
        self.phase("set-up")
        recipe = self.recipe
        self.rank, self.world_size = init_distributed()
        self.is_main = self.rank == 0
        self.device = device()
        self.registry = registry_of(recipe)
        self.plan = batch_plan(recipe, self.world_size)  # the batch arithmetic and the DeepSpeed config, once
        self.ds_config = deepspeed_config(recipe, self.plan)
        self.lr_of = schedule(self.cfg, self.registry)
        if self.init_from is not None:  # refused before anything is prepared or written
            check_init(self.init_from, recipe.model, recipe.plugins)
        if self.run_dir is not None:  # one writer: refused before anything is prepared
            self.lock_run_dir(str(self.run_dir), create=False)
        if self.resume:  # refused before anything is prepared or written
            self.checkpointer = self.make_checkpointer()
            self.checkpointer.check_resume(self.cfg.max_steps)
        self.phase("set-up")
        self.tokenizer, self.prepared = self.prepare_data()
        self.train_loader = data.TokenLoader(self.prepared, "train", self.cfg.micro_batch, recipe.model.block_size,
                                             seed=self.cfg.seed, rank=self.rank, world_size=self.world_size)
        self.phase("data")
        self.make_run_dir()
        if not self.resume:
            self.checkpointer = self.make_checkpointer()
        torch.manual_seed(self.cfg.seed)  # the same initial weights on every rank
        self.phase("set-up")
        model = Transformer(recipe.model, self.registry)
        if self.init_from is not None:  # every rank loads them whole; DeepSpeed partitions them after (ZeRO 3)
            init_weights(model, self.init_from, recipe.plugins)
        self.phase("model build")
        self.params = model.num_params()
        checkpoint.check_room(self.run_dir, self.params, recipe.deepspeed.precision, recipe.deepspeed.zero_stage,
                              self.cfg.keep_checkpoints + self.cfg.keep_best)
        # forward FLOPs; counted (like params) before ZeRO 3 partitions the weights
        self.flops_per_token = model.flops_per_token(recipe.model.block_size)
        self.phase("set-up")
        self.engine = build_engine(model, recipe, registry=self.registry, plan=self.plan, config=self.ds_config).engine
        self.phase("engine init")
        ctx = EvalContext(recipe, self.registry, self.tokenizer, self.prepared, self.device, self.rank, self.world_size)
        self.loss_evaluator = LossEvaluator(ctx, self.cfg.eval_batches)
        self.evaluators = build_evaluators(ctx)
        if self.resume:
            self.load_checkpoint()
        self.peak = peak_flops(self.device)
        self.signals = StopSignals(self.rank, self.world_size, self.device)
        self.t_start = time.perf_counter()
        self.display = Progress(enabled=self.progress and self.is_main, total=self.cfg.max_steps, initial=self.step,
                                title=recipe.name, log_interval=self.cfg.log_interval)
        note = one_rank_zero_note(recipe.deepspeed.zero_stage, self.world_size)
        if note:
            self.display.say(note)
        if self.is_main:  # the trackers drop what they logged after a resumed checkpoint's step
            trackers = Trackers.open(recipe, self.run_dir, resume_step=self.step if self.resume else None)
        self.folder = RunFolder(self.run_dir, recipe.name, trackers) if self.is_main else None
        if self.folder:
            self.folder.write_start(recipe, self.ds_config, self.registry, self.tokenizer)
            if self.resume:
                found, saved = self.checkpointer.resume_from
                lines = self.folder.record_resume(self.step, found, self.world_size, saved["world_size"],
                                                  self.checkpointer.resume_changes, self.checkpointer.resume_notes)
                self.display.say("\n".join(lines))
        self.phase("set-up")

    def prepare_data(self):
        """Prepare the dataset (rank 0 first, the others then find it ready); the tokenizer and prepared dir."""
        if self.is_main:
            prepared = data.prepare(self.recipe.data, registry=self.registry, progress=self.progress)
        dist.barrier()
        if not self.is_main:
            prepared = data.prepare(self.recipe.data, registry=self.registry, progress=False)
        tokenizer = load_tokenizer(prepared, self.registry)
        check_generate_config(self.recipe.generate, tokenizer)
        vocab = self.recipe.model.vocab_size
        if vocab < tokenizer.vocab_size:
            raise ConfigError([f"model.vocab_size: {vocab} is smaller than the {tokenizer.name} tokenizer's "
                               f"vocabulary of {tokenizer.vocab_size} tokens (data {prepared})"])
        return tokenizer, prepared

    def make_checkpointer(self) -> Checkpointer:
        return Checkpointer(self.run_dir, self.recipe, self.registry, rank=self.rank, world_size=self.world_size)

    def make_run_dir(self) -> None:
        """Rank 0 picks the folder (the others may start a second later) and tells every rank."""
        chosen = [str(self.run_dir or new_run_dir(self.recipe)) if self.is_main else None, None]
        if self.is_main:
            # creates it; None, or why it cannot be written or a file of it (a FIFO, a folder) cannot be used
            chosen[1] = unwritable(chosen[0]) or files_problem(chosen[0])
        dist.broadcast_object_list(chosen, src=0)
        if chosen[1]:
            raise CheckpointError(chosen[1])
        self.run_dir = Path(chosen[0])
        self.lock_run_dir(chosen[0])
        dist.barrier()

    def lock_run_dir(self, run_dir: str, create: bool = True) -> None:
        """Rank 0 locks the run folder until the run ends (``create``: making it if missing, else only
        if it exists); every rank raises if another writer holds it (a collective). Under
        ``train --nproc`` the launching process holds it already."""
        if self.locked:
            return
        said = [None, False]  # why not, locked
        if self.is_main and locked_by_launcher(run_dir):
            said[1] = True
        elif self.is_main and (create or Path(run_dir).is_dir()):
            try:
                self.run_lock, said[1] = lock_folder(run_dir), True
            except CheckpointError as exc:
                said[0] = str(exc)
        dist.broadcast_object_list(said, src=0)
        if said[0]:
            raise CheckpointError(said[0])
        self.locked = said[1]

    # -- one step --------------------------------------------------------------------------
    def train_step(self) -> tuple[torch.Tensor, dict]:
        """One optimizer step over grad_accum micro batches: the mean cross-entropy and the mean of each
        auxiliary loss, still on the device."""
        aux: dict = {}
        return engine_step(self.engine, self.next_batch, self.plan.grad_accum, aux), aux

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.train_loader.next_batch()
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def read_step(self, loss: torch.Tensor, aux: dict) -> tuple[float, float | None, dict[str, float]]:
        """(loss, gradient norm before clipping, auxiliary losses), averaged over ranks, as Python floats."""
        losses = torch.stack([loss.detach().float(), *(v.float() for v in aux.values())])
        if self.world_size > 1:
            losses = losses.clone()
            dist.all_reduce(losses)  # SUM: gloo has no AVG
            losses = losses / self.world_size
        norm = self.engine.get_global_grad_norm()
        if isinstance(norm, torch.Tensor):
            values = torch.cat([losses, norm.detach().to(losses.device, torch.float32).reshape(1)]).tolist()
            values, norm = values[:-1], values[-1]
        else:
            values, norm = losses.tolist(), (float(norm) if norm is not None else None)
        return values[0], norm, dict(zip(aux, values[1:]))

    # -- stopping: signals and divergence ----------------------------------------------------------
    def check_finite(self, loss: float) -> None:
        """Raise Diverged on a NaN or inf loss, naming the step and the last good checkpoint."""
        if not math.isfinite(loss):
            good = self.checkpointer.latest()
            raise Diverged(f"loss is {loss} at step {self.step + 1}; stopped without saving, the last good "
                           f"checkpoint is {good or 'none (no checkpoint was saved yet)'}")

    def disk_error(self, exc: BaseException) -> str | None:
        """A write that failed for want of disk space, in one line naming the checkpoint to resume; else None."""
        text = str(exc)
        if (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or "No space left" in text or (
                isinstance(exc, RuntimeError) and "write" in text.lower()):
            good = self.checkpointer.latest()
            return (f"writing the run folder failed at step {self.step} "
                    f"({checkpoint.describe_write_error(exc, self.run_dir)}); the newest complete checkpoint is "
                    f"{good.name if good else 'none'}: free space and resume with playattention train --resume "
                    f"{self.run_dir}")
        return None

    def stop(self) -> None:
        """Save a checkpoint of this step, then raise Interrupted saying how to resume."""
        self.save_checkpoint()
        signum = self.signals.received
        nproc = f" --nproc {self.world_size}" if self.world_size > 1 else ""
        raise Interrupted(signum, f"{signal.Signals(signum).name} at step {self.step}: saved "
                                  f"{self.run_dir / 'checkpoints' / checkpoint.tag_for(self.step)}; resume with: "
                                  f"playattention train --resume {self.run_dir}{nproc}")

    # -- evaluation, samples, logging ------------------------------------------------------------
    def evaluate(self) -> dict:
        """Train and val loss on fixed batches, and every evaluator of the recipe; logged and plotted."""
        self.engine.eval()
        with torch.no_grad():
            scores = {**self.loss_evaluator(self.engine), **run_evaluators(self.evaluators, self.engine)}
        self.engine.train()
        row = {"type": "eval", "step": self.step, "tokens": self.tokens, **scores, "elapsed": self.elapsed()}
        self.last_eval = row
        self.best_val_loss = min(self.best_val_loss, scores["val_loss"])
        if self.folder:
            self.folder.write_metrics(row)
            extra = "".join(f", {k} {v:.4f}" for k, v in scores.items() if k not in ("train_loss", "val_loss"))
            self.display.say(f"step {self.step}: train loss {scores['train_loss']:.4f}, val loss {scores['val_loss']:.4f}{extra}")
            self.folder.plot()
        return row

    def sample(self) -> list[str]:
        """Generate from every prompt of [generate] and append the texts to samples.txt."""
        texts = []
        # ZeRO 3 gathers each layer's weights on every forward, so all ranks generate in step
        if self.is_main or self.recipe.deepspeed.zero_stage == 3:
            module, gen = self.engine.module, self.recipe.generate
            with torch.compiler.set_stance("force_eager"):  # no recompilation for every new length
                texts = [sample(module, self.tokenizer, p, gen, device=self.device) for p in gen.prompts]
        if self.folder:
            self.folder.append_samples(self.step, texts, self.recipe.generate)
        return texts

    def log(self, loss: float, lr: float, grad_norm: float | None, aux: dict[str, float], dt: float) -> None:
        """Record one step: a metrics line (with the auxiliary losses, and every log_interval the
        components' own metrics), the throughput, the progress display."""
        tokens_per_s = self.plan.tokens_per_step / dt
        if aux:
            self.recent_aux.append(aux)
        mfu = None
        if self.peak is not None:  # training ~ 3x forward FLOPs (forward + backward)
            mfu = 3 * self.flops_per_token * tokens_per_s / (self.peak * self.world_size)
        if self.folder:
            row = {"type": "train", "step": self.step, "tokens": self.tokens, "loss": loss, "lr": lr,
                   "grad_norm": grad_norm, "tokens_per_s": tokens_per_s, "mfu": mfu, "elapsed": self.elapsed()}
            if aux:
                row.update({f"aux/{name}": value for name, value in aux.items()}, **{"aux/total": sum(aux.values())})
            # ZeRO 3 keeps only a shard of each weight on a rank: metrics read from weights would be wrong
            if self.step % self.cfg.log_interval == 0 and self.recipe.deepspeed.zero_stage < 3:
                self.component_metrics = self.engine.module.component_metrics()
                row.update(self.component_metrics)
            self.folder.write_metrics(row)
        self.display.step(self.step, loss, lr, tokens_per_s, mfu, dt)  # shows nothing on other ranks

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t_start

    # -- checkpoints and export -----------------------------------------------------------------
    @property
    def saved_step(self) -> int | None:
        return self.checkpointer.saved_step

    def save_checkpoint(self) -> Path:
        """A checkpoint of this step, committed whole: DeepSpeed's engine state plus ours (a collective)."""
        progress = {"step": self.step, "tokens": self.tokens, "best_val_loss": self.best_val_loss,
                    "last_eval": self.last_eval, "elapsed": self.elapsed()}
        return self.checkpointer.save(self.engine, progress, self.train_loader.state_dict(), self.tokenizer,
                                      keep=self.cfg.keep_checkpoints, keep_best=self.cfg.keep_best)

    def keep_if_best(self) -> None:
        """With train.keep_best, a checkpoint of every evaluation before the last step that lowers the best
        val loss (pruning keeps it; the last step's is the final checkpoint)."""
        if self.cfg.keep_best and self.last_eval.get("val_loss") == self.best_val_loss:
            self.save_checkpoint()

    def load_checkpoint(self) -> None:
        """Restore the engine, step, tokens, data position and RNG states of the newest complete checkpoint."""
        state = self.checkpointer.load(self.engine, self.train_loader, self.cfg.seed)
        self.step, self.tokens, self.elapsed_before = state["step"], state["tokens"], state["elapsed"]
        self.best_val_loss, self.last_eval = state["best_val_loss"], state["last_eval"]

    def export(self) -> Path:
        """model.safetensors (fp32, GPT-2 names, a tied head once) and model.toml; a collective."""
        state = full_fp32_state_dict(self.engine)
        if self.folder:
            self.folder.write_export(state, self.recipe, self.step)
        return self.run_dir / WEIGHTS

    # -- the end ------------------------------------------------------------------------------------
    def close(self) -> None:
        if getattr(self, "display", None) is not None:
            self.display.close()
        if getattr(self, "folder", None) is not None:
            try:
                self.folder.close()
            except OSError:  # flushing the metrics onto a full disk: the run's error says so already
                pass

    def finish(self, status: str, error: str | None = None) -> dict:
        """The run's summary; rank 0 writes summary.json and redraws the plots."""
        times = self.display.step_times
        timed = times[TIMING_SKIP:] or times[1:] or times
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
            "startup": self.startup,
            "signal": self.signals.received if status == "interrupted" else None,  # SIGINT 2, SIGTERM 15
            "checkpoint": str(self.checkpointer.latest() or "") or None,  # the one to resume
        }
        if self.end_errors:
            summary["end_errors"] = self.end_errors
        if self.init_from is not None:
            summary["init_from"] = str(Path(self.init_from).resolve())
        if self.cfg.keep_best:  # the checkpoint RUN@best loads
            summary["best_checkpoint"] = str(checkpoint.best_checkpoint(self.checkpointer.root) or "") or None
        summary.update({k: v for k, v in self.last_eval.items() if "/" in k})  # evaluator scores, final
        for name in dict.fromkeys(k for row in self.recent_aux for k in row):  # aux losses: the last steps' mean
            summary[f"aux/{name}"] = statistics.fmean(row[name] for row in self.recent_aux if name in row)
        summary.update(self.component_metrics)
        if self.folder:
            try:
                self.folder.write_summary(summary)
            except (OSError, RuntimeError, ValueError) as exc:  # a full disk: the summary is still returned
                print(f"error: {self.run_dir / 'summary.json'} not written: "
                      f"{checkpoint.describe_write_error(exc, self.run_dir)}", file=sys.stderr)
        if self.world_size > 1 and status != "failed":
            # no rank leaves before rank 0 has written: torchrun ends the others once one exits non-zero
            # (143 after a SIGTERM). A failed rank may be out of step with the rest, so it does not wait.
            dist.barrier()
        return summary


def peak_memory_bytes(dev: torch.device) -> int:
    """CUDA: the most memory tensors held; CPU: the process's peak resident set."""
    if dev.type == "cuda":
        return int(torch.cuda.max_memory_allocated(dev))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB
