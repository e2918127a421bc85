"""The trainer's checkpoints: what to save besides DeepSpeed's state, when a resume is allowed, how to restore.

Ours, saved with every checkpoint: step, tokens, best val loss, the last evaluation, every rank's
loader position and RNG states, the tokenizer, and the identity of the model (the recipe with the
plugin versions that built it). :mod:`toolkit.checkpoint` does the writing and reading.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch.distributed as dist

from . import checkpoint
from .errors import CheckpointError, ConfigError
from .recipe import Recipe
from .registry import Registry


def gather_objects(obj, world_size: int) -> list:
    """``obj`` from every rank, in rank order (a collective)."""
    out = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


class Checkpointer:
    """Saves and restores one run's checkpoints under ``run_dir/checkpoints``."""

    def __init__(self, run_dir: Path, recipe: Recipe, registry: Registry, *, rank: int, world_size: int):
        self.root = Path(run_dir) / "checkpoints"
        self.recipe, self.rank, self.world_size = recipe, rank, world_size
        self.identity = checkpoint.identity(recipe, registry)
        self.saved_step: int | None = None  # the step of the newest checkpoint this run saved or loaded
        self.resume_from: tuple[Path, dict] | None = None
        self.resume_changes: list[str] = []

    def latest(self) -> Path | None:
        return checkpoint.latest(self.root)

    def check_resume(self, max_steps: int) -> None:
        """Refuse a resume that changes the model, its plugins or the engine layout (a line per change)."""
        found = self.latest()
        if found is None:
            raise CheckpointError(f"{self.root.parent}: no complete checkpoint to resume from")
        saved = checkpoint.read_state(found)
        refused, self.resume_changes = checkpoint.identity_changes(saved, self.identity)
        if refused:
            raise ConfigError([f"cannot resume {self.root.parent} from {found.name}: the model, its plugins or the "
                               f"engine layout differ from the checkpoint's:", *refused])
        if saved["step"] >= max_steps:
            raise ConfigError([f"train.max_steps: {self.root.parent} is at step {saved['step']} already, max_steps is "
                               f"{max_steps}; raise it to train on (--set train.max_steps=N)"])
        self.resume_from = found, saved

    def save(self, engine, progress: dict, loader_state: dict, tokenizer, keep: int) -> Path:
        """A checkpoint of ``progress["step"]``, committed whole (a collective)."""
        step = progress["step"]
        path = self.root / checkpoint.tag_for(step)
        if self.saved_step == step:  # saved (or resumed from) already
            return path
        state = {**progress, "loaders": gather_objects(loader_state, self.world_size),
                 "rng": gather_objects(checkpoint.rng_state(), self.world_size), **self.identity}
        checkpoint.save(engine, self.root, step, state, keep=keep, tokenizer=tokenizer)
        self.saved_step = step
        return path

    def load(self, engine, loader, seed: int) -> dict:
        """Restore the engine, the data position and RNG states of the newest complete checkpoint; its state."""
        state = checkpoint.load(engine, self.root)
        # a loader position counts the windows of all ranks together: any rank's serves every rank
        loader.load_state_dict(state["loaders"][0])
        if state["world_size"] == self.world_size:
            checkpoint.set_rng_state(state["rng"][self.rank])  # the same dropout masks as if never stopped
        else:
            checkpoint.reseed(seed + 1009 * state["step"] + self.rank)
        self.saved_step = state["step"]
        if state["best_val_loss"] is None:
            state["best_val_loss"] = math.inf
        return state
