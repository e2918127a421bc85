"""Evaluation: the train/val loss on fixed batches, the recipe's evaluators, and evaluators run
after the fact on a finished run, a checkpoint of one or a Hugging Face folder (``playattention eval``).

Evaluators are a registered family (``register_evaluators``); a recipe lists them as ``[[eval]]``
tables (``kind`` plus the evaluator's options). Each is built once per run as
``factory(options, ctx)`` and then called as ``evaluator(model) -> {metric: float}`` at every
evaluation, on every rank: it shards its work by ``ctx.rank``/``ctx.world_size`` and combines
ranks with ``ctx.sum``/``ctx.mean``, so every rank returns the same numbers. They are logged to
metrics.jsonl as ``<label>/<metric>`` (the label is the kind, numbered when a kind repeats).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import attrs
import numpy as np
import torch
import torch.distributed as dist

from .converter import structure
from .convert import load_model
from .data import TokenLoader, read_split
from .errors import DataError, UsageError
from .families import SPEC_TYPES, Spec
from .recipe import Recipe, parse_override, registry_of
from .registry import Registry


@attrs.frozen
class EvalContext:
    """What an evaluator may use: the run's tokenizer, model shape, device and ranks."""

    recipe: Recipe
    registry: Registry
    tokenizer: object
    prepared: Path | None  # the prepared training data (None: a model that came without any)
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
        if prepared is None and self.prepared is None:
            raise DataError(f"no prepared data to read split {name!r} from: give prepared = DIR or path = FILE")
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
    # their batches vary in length: with train.compile, compiling every new shape would cost more than it saves
    with torch.compiler.set_stance("force_eager"):
        for label, evaluator in evaluators.items():
            for metric, value in evaluator(model).items():
                row[f"{label}/{metric}"] = float(value)
    return row


# -- after the fact: `playattention eval` -----------------------------------------------------------
def parse_task(text: str, registry: Registry) -> Spec:
    """``"hellaswag:path=val.jsonl,limit=100"`` -> the evaluator's spec, options typed and validated
    (values in TOML syntax, a bare word being a string, as ``--set``); ConfigError naming what is wrong."""
    kind, _, rest = text.partition(":")
    options: dict = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        keys, value = parse_override(item) if "=" in item else ([], None)
        if len(keys) != 1:
            raise UsageError(f"--task {text}: expected KIND:KEY=VALUE,KEY=VALUE..., e.g. hellaswag:path=val.jsonl,limit=100")
        options[keys[0]] = value
    return structure(registry, {"kind": kind.strip(), **options}, SPEC_TYPES["evaluator"], root=f"--task {kind.strip()}")


def load_target(path: str | Path, device: str | torch.device = "cpu", plugins=()):
    """(model in eval mode, tokenizer, recipe, prepared data dir or None) of a finished run, any checkpoint
    of one (``RUN@best``...), or a Hugging Face folder of any architecture convert reads, with its own
    tokenizer (:func:`toolkit.convert.load_model`)."""
    return load_model(path, device, plugins)


def evaluate_target(path: str | Path, tasks: list[str], *, device: str | torch.device = "cpu",
                    batch_size: int | None = None, plugins=()) -> dict[str, float]:
    """Run evaluators (``--task`` texts, or the run's own ``[[eval]]`` when none) on what :func:`load_target` reads;
    their metrics as ``label/metric``."""
    model, tokenizer, recipe, prepared = load_target(path, device, plugins)
    registry = registry_of(recipe)
    specs = [parse_task(t, registry) for t in tasks] if tasks else list(recipe.eval)
    if not specs:
        raise UsageError(f"{path}: its recipe lists no [[eval]]; name evaluators with --task KIND:KEY=VALUE,...")
    train = attrs.evolve(recipe.train, micro_batch=batch_size) if batch_size else recipe.train
    recipe = attrs.evolve(recipe, train=train, eval=specs)
    ctx = EvalContext(recipe, registry, tokenizer, prepared, torch.device(device))
    with torch.no_grad():
        return run_evaluators(build_evaluators(ctx), model)


def render_results(results: dict[str, float]) -> str:
    """A table of ``label/metric`` results: evaluator, metric, value."""
    rows = [key.split("/", 1) for key in results]
    w = max([len("evaluator"), *(len(r[0]) for r in rows)])
    m = max([len("metric"), *(len(r[1]) for r in rows)])
    lines = [f"{'evaluator':<{w}}  {'metric':<{m}}  value"]
    lines += [f"{label:<{w}}  {metric:<{m}}  {value:.4f}" for (label, metric), value in zip(rows, results.values())]
    return "\n".join(lines)


def write_results(results: dict[str, float], target: str | Path, out: str | Path) -> None:
    """``{"target": ..., "results": {...}}`` as JSON to ``out`` ("-": stdout)."""
    text = json.dumps({"target": str(target), "results": results}, indent=2) + "\n"
    if str(out) == "-":
        print(text, end="")
    else:
        Path(out).write_text(text)
