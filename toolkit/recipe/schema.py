"""The recipe's schema: the frozen attrs classes a recipe's TOML is structured into (no torch).

Each section is a class with its fields spelled out; a component field (``model.attention``,
``train.optimizer``, ...) is added by :func:`toolkit.families.components` from the FAMILIES table, and
its options are the registered component's own class (:mod:`toolkit.converter` structures them).
The model itself is built from :class:`ModelConfig` by :mod:`toolkit.model`.
"""
from __future__ import annotations

from typing import Any, Literal

import attrs
from attrs import validators as v

from ..errors import InvalidValue
from ..families import SPEC_TYPES, Spec, component, components, layer_component, layer_components


def _positive(_, attribute, value):
    if value <= 0:
        raise InvalidValue(f"must be > 0, got {value}", attribute.name)


def select_layers(at, n_layer: int) -> list[int]:
    """The layers ``at`` names: a slice as text ("1::2", "0:4", "-1") or a list of indices; ValueError if out of range."""
    if isinstance(at, str):
        parts = at.split(":")
        try:
            numbers = [int(p) if p.strip() else None for p in parts]
        except ValueError:
            raise ValueError(f'expected a slice such as "1::2" or a list of layer indices, got "{at}"') from None
        if len(parts) == 1:
            at = [numbers[0]]
        elif len(parts) > 3 or numbers[-1] == 0 and len(parts) == 3:
            raise ValueError(f'expected a slice such as "1::2" or a list of layer indices, got "{at}"')
        else:
            return list(range(n_layer))[slice(*numbers)]
    out = []
    for i in at:
        if not -n_layer <= i < n_layer:
            raise ValueError(f"layer {i} is out of range for n_layer {n_layer}")
        out.append(i % n_layer)
    return out


def _layer_selection(_, attribute, value):
    if isinstance(value, str) or (isinstance(value, list) and all(type(i) is int for i in value)):
        return
    raise InvalidValue(f'expected a slice such as "1::2" or a list of layer indices, got {value!r}')


@attrs.frozen
@layer_components  # checks there is a field for each per-layer family (toolkit.families) and types it
class LayerGroup:
    """Some layers' own components: ``[model.layers.<name>]`` with ``at`` and any of the per-layer families."""

    at: Any = attrs.field(validator=_layer_selection)  # "1::2", "5::6", "-1", or [0, 11]
    # each None (the model's choice) or these layers' own
    attention: Spec | None = layer_component("attention")
    norm: Spec | None = layer_component("norm")
    position: Spec | None = layer_component("position")
    mlp: Spec | None = layer_component("mlp")
    block: Spec | None = layer_component("block")


def _layer_groups(value):
    if isinstance(value, dict):
        return {k: LayerGroup(**g) if isinstance(g, dict) else g for k, g in value.items()}
    return value


@attrs.frozen
@components("model")  # checks there is a field for each family FAMILIES places in [model] and types it
class ModelConfig:
    """The model's shape and its components. Defaults are GPT-2 124M (vocab padded to 50304)."""

    vocab_size: int = attrs.field(default=50304, validator=[v.instance_of(int), _positive])
    block_size: int = attrs.field(default=1024, validator=[v.instance_of(int), _positive])
    n_layer: int = attrs.field(default=12, validator=[v.instance_of(int), _positive])
    n_head: int = attrs.field(default=12, validator=[v.instance_of(int), _positive])
    n_embd: int = attrs.field(default=768, validator=[v.instance_of(int), _positive])
    dropout: float = attrs.field(default=0.0, converter=float, validator=[v.ge(0.0), v.lt(1.0)])
    bias: bool = attrs.field(default=True, validator=v.instance_of(bool))
    tie_embeddings: bool = attrs.field(default=True, validator=v.instance_of(bool))
    # one attention head's width; None: n_embd / n_head (Gemma and Qwen 3 make heads wider or narrower)
    head_dim: int | None = attrs.field(default=None, validator=v.optional([v.instance_of(int), _positive]))
    # token embeddings times this before the first block (Gemma: sqrt(n_embd)); None: 1
    embedding_multiplier: float | None = attrs.field(default=None, validator=v.optional(v.gt(0.0)))
    # cap the output logits smoothly at +-logit_softcap (Gemma 2: 30); None: no cap
    logit_softcap: float | None = attrs.field(default=None, validator=v.optional(v.gt(0.0)))
    # projections into the residual stream (every c_proj) start at zero, so each block starts as the
    # identity (modded-nanogpt); false: GPT-2's normal init scaled by 1/sqrt(2 * n_layer)
    zero_init_proj: bool = attrs.field(default=False, validator=v.instance_of(bool))
    # the older spelling of block: "post" is block = "post_norm" ("pre", the default block, changes nothing)
    layout: Literal["pre", "post"] | None = attrs.field(default=None, validator=v.optional(v.in_(("pre", "post"))))
    # layers with components of their own, applied in order (a later group wins where two name a layer)
    layers: dict[str, LayerGroup] = attrs.field(factory=dict, converter=_layer_groups)
    # the components (toolkit.families): a registered kind and its options each
    attention: Spec = component("attention")
    norm: Spec = component("norm")
    position: Spec = component("position")
    mlp: Spec = component("mlp")
    block: Spec = component("block")
    parametrization: Spec = component("parametrization")

    def __attrs_post_init__(self):
        if self.head_dim is None and self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}), or give head_dim")
        if self.layout is not None:  # fold the old spelling into block, so both spellings are one config
            if self.layout == "post" and self.block.kind not in ("pre_norm", "post_norm"):
                raise ValueError(f"layout = \"post\" and block = \"{self.block.kind}\" disagree; give only block")
            if self.layout == "post":
                object.__setattr__(self, "block", SPEC_TYPES["block"]("post_norm"))
            object.__setattr__(self, "layout", None)
        for name, group in self.layers.items():
            if not select_layers(group.at, self.n_layer):  # ValueError: out of range
                raise ValueError(f"layers.{name}.at: {group.at!r} selects none of the {self.n_layer} layers")

    def spec_at(self, family: str, layer: int | None):
        """The Spec of ``family`` at ``layer`` (None: the model-wide choice)."""
        spec = getattr(self, family)
        if layer is not None:
            for group in self.layers.values():
                if getattr(group, family) is not None and layer in select_layers(group.at, self.n_layer):
                    spec = getattr(group, family)
        return spec


def _betas(_, attribute, value):
    if not all(0.0 <= b < 1.0 for b in value):
        raise InvalidValue(f"must be two numbers in [0, 1), got [{', '.join(repr(b) for b in value)}]")


@attrs.frozen
@components("data")  # checks there is a field for each family FAMILIES places in [data] and types it
class DataConfig:
    """Where tokens come from: a dataset of text files, a tokenizer and a validation split."""

    # a registered dataset ("tinyshakespeare" ships with the package) or a name of your own for `paths`
    dataset: str = "tinyshakespeare"
    # input files (.txt, .jsonl, .parquet) or folders of them, or a datasets save_to_disk folder; empty: the dataset
    paths: list[str] = attrs.Factory(list)
    # prepared token shards; default data/<dataset>-<tokenizer> under the working directory
    prepared_dir: str | None = None
    val_fraction: float = attrs.field(default=0.1, validator=[v.gt(0.0), v.lt(1.0)])
    # the column of .parquet files and datasets folders, and the JSONL field, that holds the text
    text_column: str = "text"
    tokenizer: Spec = component("tokenizer")


@attrs.frozen
class WandbConfig:
    """A Weights & Biases run of the training run (the run folder's name, under ``project``)."""

    project: str = "playattention"
    # "offline" writes the run under <run folder>/wandb and needs no network (`wandb sync` uploads it later)
    mode: Literal["offline", "online", "disabled"] = "offline"
    entity: str | None = None
    tags: list[str] = attrs.Factory(list)


@attrs.frozen
class TrackersConfig:
    """Experiment trackers that get every metrics.jsonl line too (rank 0; toolkit/trackers.py)."""

    tensorboard: bool = False  # event files in <run folder>/tensorboard (pip install 'playattention[tensorboard]')
    wandb: WandbConfig | None = None  # a table turns it on (pip install 'playattention[wandb]')
    csv: bool = False  # <run folder>/metrics.csv, one column per metric


@attrs.frozen
@components("train")  # checks there is a field for each family FAMILIES places in [train] and types it
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
    # steps over which lr decays to min_lr; default max_steps
    decay_steps: int | None = attrs.field(default=None, validator=v.optional(v.gt(0)))
    weight_decay: float = attrs.field(default=0.1, validator=v.ge(0.0))
    betas: tuple[float, float] = attrs.field(default=(0.9, 0.95), validator=_betas)
    grad_clip: float = attrs.field(default=1.0, validator=v.ge(0.0))  # 0 disables clipping
    eval_interval: int = attrs.field(default=250, validator=v.gt(0))
    eval_batches: int = attrs.field(default=20, validator=v.gt(0))
    sample_interval: int = attrs.field(default=0, validator=v.ge(0))  # 0: sample at the end only
    checkpoint_interval: int = attrs.field(default=0, validator=v.ge(0))  # 0: at the end only
    keep_checkpoints: int = attrs.field(default=3, validator=v.gt(0))
    # also keep the checkpoint with the lowest val loss (RUN@best), saved at each evaluation that improves it
    keep_best: bool = False
    log_interval: int = attrs.field(default=10, validator=v.gt(0))
    seed: int = 1337
    compile: bool = False
    activation_checkpointing: bool = False
    out_dir: str = "runs"
    trackers: TrackersConfig = attrs.Factory(TrackersConfig)  # [train.trackers]: TensorBoard, W&B, CSV
    optimizer: Spec = component("optimizer")
    schedule: Spec = component("schedule")


@attrs.frozen
class DeepSpeedConfig:
    """ZeRO data parallelism. ``config`` is merged last, verbatim, into the DeepSpeed config."""

    zero_stage: int = attrs.field(default=0, validator=v.in_((0, 1, 2, 3)))
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    offload: Literal["none", "cpu"] = "none"  # "cpu": optimizer states and step on the host (stages 2, 3)
    config: dict[str, Any] = attrs.Factory(dict)


#: the lowest temperature above 0 (greedy). Sampling divides the fp32 logits by it: at 1e-4 logits
#: up to 3e34 stay finite (1e-308 or 1e-40 turn any logit into inf, and the softmax into NaN), and two
#: logits 0.01 apart already differ e^100-fold in probability, so a lower one could only be greedy
MIN_TEMPERATURE = 1e-4


def _temperature(_, attribute, value):
    if not (value == 0 or value >= MIN_TEMPERATURE):
        raise InvalidValue(f"must be 0 (greedy) or at least {MIN_TEMPERATURE} (logits / temperature must stay "
                         f"finite in fp32), got {value!r}")


@attrs.frozen
class GenerateConfig:
    """Sampling for periodic and final samples (and the default of `playattention generate`)."""

    prompts: list[str] = attrs.Factory(lambda: ["\n"])
    max_new_tokens: int = attrs.field(default=500, validator=v.gt(0))
    temperature: float = attrs.field(default=0.8, validator=_temperature)
    # 0 disables top-k (TOML has no null to unset it)
    top_k: int | None = attrs.field(default=200, validator=v.optional(v.ge(0)))
    top_p: float | None = attrs.field(default=None, validator=v.optional([v.gt(0.0), v.le(1.0)]))
    seed: int = 1337


@attrs.frozen
@components("")  # checks there is a field for each family FAMILIES places at the top level and types it
class Recipe:
    name: str = "recipe"
    description: str = ""
    plugins: list[str] = attrs.Factory(list)
    model: ModelConfig = attrs.Factory(ModelConfig)
    data: DataConfig = attrs.Factory(DataConfig)
    train: TrainConfig = attrs.Factory(TrainConfig)
    deepspeed: DeepSpeedConfig = attrs.Factory(DeepSpeedConfig)
    generate: GenerateConfig = attrs.Factory(GenerateConfig)
    eval: list[Spec] = component("evaluator")  # [[eval]]: the evaluators run at every evaluation

