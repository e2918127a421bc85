"""The trainer's checkpoints: what to save besides DeepSpeed's state, when a resume is allowed, how to restore.

Ours, saved with every checkpoint: step, tokens, best val loss, the last evaluation, every rank's
loader position and RNG states, the tokenizer, and the identity of the model (the recipe with the
plugin versions that built it). :mod:`toolkit.checkpoint` does the writing and reading.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed as dist

from . import checkpoint, safeio
from .errors import CheckpointError, ConfigError
from .recipe import Recipe
from .registry import Registry
from .runfolder import WEIGHTS


def gather_objects(obj, world_size: int) -> list:
    """``obj`` from every rank, in rank order (a collective)."""
    out = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


#: the trainer's keys of toolkit_state.json, and their types
STATE_SCHEMA = {"tokens": int, "loaders": list, "rng": list, "recipe": dict, "components": dict, "last_eval": dict,
                "elapsed": (int, float), "best_val_loss": (int, float, type(None))}


def finished(run_dir: Path, steps: int) -> bool:
    """Whether the run in ``run_dir`` finished ``steps`` steps: its summary says so and its weights are there."""
    try:
        summary = safeio.read_json(Path(run_dir) / "summary.json", inside=run_dir)
    except (OSError, ValueError):
        return False
    return (isinstance(summary, dict) and summary.get("status") == "finished" and summary.get("steps") == steps
            and (Path(run_dir) / WEIGHTS).is_file())


def _torch_optimizer(engine):
    return getattr(engine.optimizer, "optimizer", engine.optimizer)  # the torch optimizer inside ZeRO's


def optimizer_hyperparameters(engine) -> list[dict]:
    """Every parameter group's hyperparameters (all but its parameters), as the recipe built them."""
    return [{k: v for k, v in g.items() if k != "params"} for g in _torch_optimizer(engine).param_groups]


def apply_hyperparameters(engine, groups: list[dict]) -> None:
    """Give the optimizer these groups' hyperparameters and the schedule their base lrs, and set
    each group's lr to the schedule's value at the loaded step (LambdaLR: base * factor(step))."""
    opt = _torch_optimizer(engine)
    for g, fresh in zip(opt.param_groups, groups):
        g.update(fresh)
    sched = engine.lr_scheduler
    if isinstance(sched, torch.optim.lr_scheduler.LambdaLR):
        sched.base_lrs = [fresh["initial_lr"] for fresh in groups]
        for g, base, factor in zip(opt.param_groups, sched.base_lrs, sched.lr_lambdas):
            g["lr"] = base * factor(sched.last_epoch)
        sched._last_lr = [g["lr"] for g in opt.param_groups]


class Checkpointer:
    """Saves and restores one run's checkpoints under ``run_dir/checkpoints``."""

    def __init__(self, run_dir: Path, recipe: Recipe, registry: Registry, *, rank: int, world_size: int):
        self.root = Path(run_dir) / "checkpoints"
        self.recipe, self.rank, self.world_size = recipe, rank, world_size
        self.identity = checkpoint.identity(recipe, registry)
        self.saved_step: int | None = None  # the step of the newest checkpoint this run saved or loaded
        self.resume_from: tuple[Path, dict] | None = None
        self.resume_changes: list[str] = []
        self.resume_notes: list[str] = []  # checkpoints skipped as incomplete, a final export to finish

    def latest(self) -> Path | None:
        return checkpoint.latest(self.root)

    def check_resume(self, max_steps: int) -> None:
        """Refuse a resume that changes the model, its plugins or the engine layout (a line per change),
        or that has nothing left to do. A run stopped after its last checkpoint but before its export
        and summary resumes to write them."""
        found = self.latest()
        if found is None:
            raise CheckpointError(f"{self.root.parent}: no complete checkpoint to resume from")
        saved = checkpoint.read_state(found)
        if why := checkpoint.state_problem(saved, STATE_SCHEMA):
            raise CheckpointError(f"{found}: cannot resume from it: {why}")
        refused, self.resume_changes = checkpoint.identity_changes(saved, self.identity)
        if refused:
            raise ConfigError([f"cannot resume {self.root.parent} from {found.name}: the model, its plugins or the "
                               f"engine layout differ from the checkpoint's:", *refused])
        if saved["step"] > max_steps or (saved["step"] == max_steps and finished(self.root.parent, max_steps)):
            raise ConfigError([f"train.max_steps: {self.root.parent} is at step {saved['step']} already, max_steps is "
                               f"{max_steps}; to train on: playattention train --resume {self.root.parent} --extend N"])
        self.resume_notes = [f"skipped {p.name}: {checkpoint.problem(p)}"
                             for p in checkpoint.list_checkpoints(self.root)
                             if checkpoint.step_of(p) > saved["step"]]
        if saved["step"] == max_steps:
            self.resume_notes.append(f"step {max_steps} is the last: writing the export and summary it was stopped before")
        self.resume_from = found, saved

    def save(self, engine, progress: dict, loader_state: dict, tokenizer, keep: int, keep_best: bool = False) -> Path:
        """A checkpoint of ``progress["step"]``, committed whole (a collective)."""
        step = progress["step"]
        path = self.root / checkpoint.tag_for(step)
        if self.saved_step == step:  # saved (or resumed from) already
            return path
        state = {**progress, "loaders": gather_objects(loader_state, self.world_size),
                 "rng": gather_objects(checkpoint.rng_state(), self.world_size), **self.identity}
        checkpoint.save(engine, self.root, step, state, keep=keep, tokenizer=tokenizer, keep_best=keep_best)
        self.saved_step = step
        return path

    def load(self, engine, loader, seed: int) -> dict:
        """Restore the engine, the data position and RNG states of the newest complete checkpoint; its state.

        The optimizer's hyperparameters and the schedule are this recipe's, not the checkpoint's:
        a resume with another lr, min_lr, max_steps, warmup, schedule, weight decay or betas
        trains with them from the next step (resume.log records the change).
        """
        fresh = optimizer_hyperparameters(engine)
        state = checkpoint.load(engine, self.root)
        apply_hyperparameters(engine, fresh)
        try:
            # a loader position counts the windows of all ranks together: any rank's serves every rank
            loader.load_state_dict(state["loaders"][0])
            if state["world_size"] == self.world_size:
                checkpoint.set_rng_state(state["rng"][self.rank])  # the same dropout masks as if never stopped
            else:
                checkpoint.reseed(seed + 1009 * state["step"] + self.rank)
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{self.root / checkpoint.tag_for(state['step'])}: damaged loader or random "
                                  f"state in {checkpoint.STATE_FILE} ({type(exc).__name__}: {exc})") from None
        self.saved_step = state["step"]
        if state["best_val_loss"] is None:
            state["best_val_loss"] = math.inf
        return state
