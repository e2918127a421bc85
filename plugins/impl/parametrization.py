"""The code of toolkit.plugins.parametrization's parts, imported when one is built (their options and docs are there)."""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from toolkit.contracts import Dims, Parametrization, hint
from toolkit.errors import ConfigError
from toolkit.plugins.parametrization import MupOptions
from toolkit.registry import NoOptions


class Standard(Parametrization):
    """Standard parametrization: GPT-2's init, one learning rate, attention 1/sqrt(d) (changes nothing)."""

    Options = NoOptions

    def __init__(self, opts: NoOptions, dims: Dims):
        pass


class Mup(Parametrization):
    """muP (Yang et al. 2021): hidden init and Adam lr scaled by width, attention 1/d, logits times base/width."""

    Options = MupOptions

    def __init__(self, opts: MupOptions, dims: Dims):
        if dims.head_size is None and opts.base_width % dims.n_head:
            raise ConfigError([f"base_width ({opts.base_width}) must be divisible by model.n_head ({dims.n_head}): "
                               f"the base model has the same heads, narrower"])
        self.base_width = opts.base_width
        self.width_mult = dims.n_embd / opts.base_width
        # heads widen with the model (n_head fixed) unless the recipe fixes head_dim
        self.head_mult = self.width_mult if dims.head_size is None else 1.0

    def attention_scale(self, head_dim: int, scale: float | None = None) -> float | None:
        # muP: q.k grows like d once q and k correlate in training, so divide by d, not sqrt(d);
        # written relative to the base so that it is 1/sqrt(d) at the base width
        return (1.0 / math.sqrt(head_dim) if scale is None else scale) / math.sqrt(self.head_mult)

    def output_multiplier(self) -> float | None:
        return 1.0 / self.width_mult  # MuReadout: logits / width_mult

    def apply(self, model: nn.Module, base_shapes: Callable[[int], dict[str, tuple[int, ...]]]) -> None:
        base = base_shapes(self.base_width)
        for name, p in model.named_parameters():  # a tied weight once
            grown = [i for i, (n, b) in enumerate(zip(p.shape, base[name])) if n != b]
            if len(grown) < 2:  # vector-like (embeddings, biases, gains, the readout): as in standard
                continue
            # matrix-like: fan-in is the last dim that grows (nn.Linear's in_features)
            mult = p.shape[grown[-1]] / base[name][grown[-1]]
            with torch.no_grad():
                p.mul_(mult ** -0.5)  # init variance 1/fan-in
            hint(p, lr_scale=getattr(p, "optim_hints", {}).get("lr_scale", 1.0) / mult)  # Adam lr 1/fan-in
