"""TOML recipes: the typed schema and loading.

A recipe is one TOML file (optionally ``extends = "base.toml"``) structured by the one converter
(:func:`toolkit.config.make_converter`) into the frozen attrs classes below.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal

import attrs
from attrs import validators as v

from .model import ModelConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@attrs.frozen
class DataConfig:
    """Where tokens come from: a dataset of text files, a tokenizer and a validation split."""

    # "tinyshakespeare" (shipped with the package) or a name of your own for `paths`
    dataset: str = "tinyshakespeare"
    tokenizer: Literal["char", "gpt2"] = "char"
    # input text (.txt) or JSONL (a `text` field) files or folders; empty means the shipped dataset
    paths: list[str] = attrs.Factory(list)
    # prepared token shards; default data/<dataset>-<tokenizer> under the working directory
    prepared_dir: str | None = None
    val_fraction: float = attrs.field(default=0.1, validator=[v.gt(0.0), v.lt(1.0)])


@attrs.frozen
class TrainConfig:
    """The optimisation: batch arithmetic, schedule, evaluation, sampling, checkpoints."""

    micro_batch: int = attrs.field(default=12, validator=v.gt(0))
    # give either grad_accum or tokens_per_step (= micro_batch * block_size * grad_accum * world size)
    grad_accum: int | None = attrs.field(default=None, validator=v.optional(v.gt(0)))
    tokens_per_step: int | None = attrs.field(default=None, validator=v.optional(v.gt(0)))
    max_steps: int = attrs.field(default=2000, validator=v.gt(0))
    lr: float = attrs.field(default=1e-3, validator=v.gt(0.0))
    min_lr: float = attrs.field(default=1e-4, validator=v.ge(0.0))
    warmup_steps: int = attrs.field(default=100, validator=v.ge(0))
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    # steps over which lr decays to min_lr; default max_steps
    decay_steps: int | None = attrs.field(default=None, validator=v.optional(v.gt(0)))
    weight_decay: float = attrs.field(default=0.1, validator=v.ge(0.0))
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = attrs.field(default=1.0, validator=v.ge(0.0))  # 0 disables clipping
    eval_interval: int = attrs.field(default=250, validator=v.gt(0))
    eval_batches: int = attrs.field(default=20, validator=v.gt(0))
    sample_interval: int = attrs.field(default=0, validator=v.ge(0))  # 0: sample at the end only
    checkpoint_interval: int = attrs.field(default=0, validator=v.ge(0))  # 0: at the end only
    keep_checkpoints: int = attrs.field(default=3, validator=v.gt(0))
    log_interval: int = attrs.field(default=10, validator=v.gt(0))
    seed: int = 1337
    compile: bool = False
    activation_checkpointing: bool = False
    out_dir: str = "runs"


@attrs.frozen
class DeepSpeedConfig:
    """ZeRO data parallelism. ``config`` is merged last, verbatim, into the DeepSpeed config."""

    zero_stage: int = attrs.field(default=0, validator=v.in_((0, 1, 2, 3)))
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    offload: Literal["none", "cpu"] = "none"
    config: dict[str, Any] = attrs.Factory(dict)


@attrs.frozen
class GenerateConfig:
    """Sampling for periodic and final samples (and the default of `playattention generate`)."""

    prompts: list[str] = attrs.Factory(lambda: ["\n"])
    max_new_tokens: int = attrs.field(default=500, validator=v.gt(0))
    temperature: float = attrs.field(default=0.8, validator=v.ge(0.0))
    top_k: int | None = attrs.field(default=200, validator=v.optional(v.gt(0)))
    top_p: float | None = attrs.field(default=None, validator=v.optional([v.gt(0.0), v.le(1.0)]))
    seed: int = 1337


@attrs.frozen
class Recipe:
    name: str = "recipe"
    description: str = ""
    plugins: list[str] = attrs.Factory(list)
    model: ModelConfig = attrs.Factory(ModelConfig)
    data: DataConfig = attrs.Factory(DataConfig)
    train: TrainConfig = attrs.Factory(TrainConfig)
    deepspeed: DeepSpeedConfig = attrs.Factory(DeepSpeedConfig)
    generate: GenerateConfig = attrs.Factory(GenerateConfig)


def read_toml(path: str | Path) -> dict:
    with open(path, "rb") as f:
        return tomllib.load(f)


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, resolve and validate a recipe file; raises :class:`toolkit.config.ConfigError`."""
    from .config import structure
    from .plugin_manager import get_registry

    data = read_toml(path)
    data.setdefault("name", Path(path).stem)
    registry = get_registry(data.get("plugins", []))
    return structure(registry, data, Recipe)


def _drop_none(value):
    """TOML has no null: leave unset optional keys out (they resolve to the same defaults)."""
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_drop_none(v) for v in value]
    return value


def recipe_to_dict(recipe: Recipe) -> dict:
    """The fully resolved recipe as plain data (every component's options spelled out)."""
    from .config import make_converter
    from .plugin_manager import get_registry

    return _drop_none(make_converter(get_registry(recipe.plugins)).unstructure(recipe))


def dump_recipe(recipe: Recipe) -> str:
    """The fully resolved recipe as TOML text; loading it gives back an equal recipe."""
    import tomli_w

    return tomli_w.dumps(recipe_to_dict(recipe))
