"""Evaluation during training: the train/val loss on fixed batches, and the recipe's evaluators.

Evaluators are a registered family (``register_evaluators``); a recipe lists them as ``[[eval]]``
tables (``kind`` plus the evaluator's options). Each is built once per run as
``factory(options, ctx)`` and then called as ``evaluator(model) -> {metric: float}`` at every
evaluation, on every rank: it shards its work by ``ctx.rank``/``ctx.world_size`` and combines
ranks with ``ctx.sum``/``ctx.mean``, so every rank returns the same numbers. They are logged to
metrics.jsonl as ``<label>/<metric>`` (the label is the kind, numbered when a kind repeats).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import attrs
import numpy as np
import torch
import torch.distributed as dist

from .data import TokenLoader, read_split
from .recipe import Recipe
from .registry import Registry


@attrs.frozen
class EvalContext:
    """What an evaluator may use: the run's tokenizer, model shape, device and ranks."""

    recipe: Recipe
    registry: Registry
    tokenizer: object
    prepared: Path  # the prepared training data
    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def block_size(self) -> int:
        return self.recipe.model.block_size

    @property
    def micro_batch(self) -> int:
        return self.recipe.train.micro_batch

    def sum(self, value: torch.Tensor | float) -> torch.Tensor:
        """The sum of ``value`` over ranks (a float64 tensor on every rank)."""
        t = torch.as_tensor(value, dtype=torch.float64, device=self.device).clone()
        if self.world_size > 1:
            dist.all_reduce(t)
        return t

    def mean(self, value: torch.Tensor | float) -> torch.Tensor:
        return self.sum(value) / self.world_size

    def max(self, value: torch.Tensor | float) -> torch.Tensor:
        """The largest ``value`` of any rank (e.g. how many forwards the busiest rank runs: under ZeRO 3
        every rank must take part in every forward)."""
        t = torch.as_tensor(value, dtype=torch.float64, device=self.device).clone()
        if self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t

    def split(self, name: str, prepared: str | Path | None = None) -> list[np.ndarray]:
        """The token shards of split ``name`` of ``prepared`` (default: the run's prepared data)."""
        return read_split(self.prepared if prepared is None else prepared, name)

    def shard(self, items: list) -> list:
        """This rank's share of ``items`` (every world_size-th, starting at rank)."""
        return items[self.rank::self.world_size]


class LossEvaluator:
    """Mean train and val loss over ``eval_batches`` fixed batches per rank, the same batches each time."""

    def __init__(self, ctx: EvalContext, batches: int):
        t = ctx.recipe.train
        self.ctx, self.batches = ctx, batches
        kw = dict(rank=ctx.rank, world_size=ctx.world_size)
        self.loaders = {split: TokenLoader(ctx.prepared, split, t.micro_batch, ctx.block_size, seed=t.seed + 1 + i, **kw)
                        for i, split in enumerate(("train", "val"))}

    @torch.no_grad()
    def __call__(self, model: Callable) -> dict[str, float]:
        out = {}
        for split, loader in self.loaders.items():
            loader.reset()
            total = torch.zeros((), device=self.ctx.device)
            for _ in range(self.batches):
                x, y = loader.next_batch()
                _, loss = model(x.to(self.ctx.device, non_blocking=True), y.to(self.ctx.device, non_blocking=True))
                total += loss.float()
            out[f"{split}_loss"] = self.ctx.mean(total / self.batches).item()
        return out


def build_evaluators(ctx: EvalContext) -> dict[str, Callable]:
    """The recipe's ``[[eval]]`` evaluators by label: the kind, or ``kind-2``... when a kind repeats."""
    out: dict[str, Callable] = {}
    for spec in ctx.recipe.eval:
        label, n = spec.kind, 1
        while label in out:
            n += 1
            label = f"{spec.kind}-{n}"
        out[label] = ctx.registry.build(spec, ctx)
    return out


def run_evaluators(evaluators: dict[str, Callable], model) -> dict[str, float]:
    """Every evaluator's metrics as ``label/metric``."""
    row = {}
    for label, evaluator in evaluators.items():
        for metric, value in evaluator(model).items():
            row[f"{label}/{metric}"] = float(value)
    return row
