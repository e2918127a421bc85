"""Built-in MLP components. Contract: factory(opts, dims) -> module; forward (B, T, C) -> (B, T, C)."""
from __future__ import annotations

import attrs
import torch.nn.functional as F
from attrs import validators as v
from torch import nn

from toolkit.contracts import Dims
from toolkit.hookspecs import hookimpl


@attrs.frozen
class MLPOptions:
    # hidden width = multiplier * n_embd (4 in GPT-2), unless hidden_dim is given
    multiplier: float = attrs.field(default=4.0, validator=v.gt(0.0))
    hidden_dim: int | None = attrs.field(default=None, validator=v.optional([v.instance_of(int), v.gt(0)]))


@attrs.frozen
class GeluOptions(MLPOptions):
    # "tanh" is GPT-2's gelu_new approximation; "none" is the exact erf form (Hendrycks & Gimpel 2016)
    approximate: str = attrs.field(default="tanh", validator=v.in_(("none", "tanh")))


class MLP(nn.Module):
    """Position-wise feed-forward network: c_fc, activation, c_proj, dropout."""

    Options = MLPOptions

    def __init__(self, opts: MLPOptions, dims: Dims):
        super().__init__()
        hidden = opts.hidden_dim or int(opts.multiplier * dims.n_embd)
        self.c_fc = nn.Linear(dims.n_embd, hidden, bias=dims.bias)
        self.c_proj = nn.Linear(hidden, dims.n_embd, bias=dims.bias)
        self.dropout = nn.Dropout(dims.dropout)

    def act(self, x):
        return F.relu(x)

    def forward(self, x):
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class GeluMLP(MLP):
    """GPT-2's MLP: Linear, GELU, Linear."""

    Options = GeluOptions

    def __init__(self, opts: GeluOptions, dims: Dims):
        super().__init__(opts, dims)
        self.approximate = opts.approximate

    def act(self, x):
        return F.gelu(x, approximate=self.approximate)


class ReluMLP(MLP):
    """The original Transformer's MLP: Linear, ReLU, Linear."""


@hookimpl
def register_components(register):
    register("mlp", "gelu", GeluMLP)
    register("mlp", "relu", ReluMLP)
