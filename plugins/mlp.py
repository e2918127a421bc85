"""Built-in MLP components. Contract: factory(opts, dims) -> module; forward (B, T, C) -> (B, T, C)."""
from __future__ import annotations

import math

import attrs
import torch.nn.functional as F
from attrs import validators as v
from torch import nn

from toolkit.contracts import Dims
from toolkit.errors import ConfigError
from toolkit.hookspecs import hookimpl


def check_hidden(hidden: int, opts, n_embd: int) -> int:
    """``hidden``, or ConfigError when a tiny multiplier leaves no hidden layer at all."""
    if hidden < 1:
        raise ConfigError([f"model.mlp.multiplier: {opts.multiplier!r} * n_embd {n_embd} leaves a hidden layer "
                           f"{hidden} wide; it must be at least 1 (or give hidden_dim)"])
    return hidden


@attrs.frozen
class MLPOptions:
    # hidden width = multiplier * n_embd (4 in GPT-2), unless hidden_dim is given
    multiplier: float = attrs.field(default=4.0, validator=v.gt(0.0))
    # the width itself
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
        hidden = opts.hidden_dim or check_hidden(int(opts.multiplier * dims.n_embd), opts, dims.n_embd)
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


class Relu2MLP(MLP):
    """Squared ReLU (So et al. 2021, Primer; the NanoGPT speedrun's MLP): Linear, relu(x)^2, Linear."""

    def act(self, x):
        return F.relu(x).square()


def _positive_int(_, attribute, value):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{attribute.name} must be a positive integer, got {value!r}")


@attrs.frozen
class GatedOptions:
    # hidden width = multiplier * n_embd rounded up to a multiple of `multiple_of`, unless hidden_dim is given.
    # 8/3 keeps the parameter count of a 4x ungated MLP with three matrices instead of two (Shazeer 2020).
    multiplier: float = attrs.field(default=8 / 3, validator=v.gt(0.0))
    multiple_of: int = attrs.field(default=64, validator=_positive_int)  # for tensor-core friendly shapes (Llama)
    hidden_dim: int | None = attrs.field(default=None, validator=v.optional(_positive_int))  # the width itself


@attrs.frozen
class GeGLUOptions(GatedOptions):
    # "none": the exact erf GELU of the paper; "tanh": the approximation (T5 v1.1's gelu_new)
    approximate: str = attrs.field(default="none", validator=v.in_(("none", "tanh")))


def gated_hidden_dim(opts: GatedOptions, n_embd: int) -> int:
    """The hidden width of a gated MLP: hidden_dim, or multiplier * n_embd rounded up to multiple_of."""
    if opts.hidden_dim is not None:
        return opts.hidden_dim
    width = round(opts.multiplier * n_embd, 6)  # 1.1 * 100 is 110.00000000000001 in floating point
    return check_hidden(opts.multiple_of * math.ceil(width / opts.multiple_of), opts, n_embd)


class GatedMLP(nn.Module):
    """Gated linear unit feed-forward network (Shazeer 2020): c_proj(act(gate) * up)."""

    Options = GatedOptions

    def __init__(self, opts: GatedOptions, dims: Dims):
        super().__init__()
        self.hidden = gated_hidden_dim(opts, dims.n_embd)
        # rows [gate; up]: both input projections in one matmul
        self.c_fc = nn.Linear(dims.n_embd, 2 * self.hidden, bias=dims.bias)
        self.c_proj = nn.Linear(self.hidden, dims.n_embd, bias=dims.bias)
        self.dropout = nn.Dropout(dims.dropout)

    def act(self, x):
        return F.silu(x)

    def forward(self, x):
        gate, up = self.c_fc(x).split(self.hidden, dim=-1)  # 2 x (B, T, hidden)
        return self.dropout(self.c_proj(self.act(gate) * up))

    # flops_per_token: the default 2 per Linear weight counts c_fc (2 * hidden * C) and c_proj (hidden * C),
    # i.e. 6 * hidden * C; the elementwise gate is negligible, as the activation is in the ungated MLP.


class SwiGLU(GatedMLP):
    """SwiGLU feed-forward (Shazeer 2020, as in PaLM and Llama): c_proj(silu(gate) * up)."""


class GeGLU(GatedMLP):
    """GEGLU feed-forward (Shazeer 2020, as in T5 v1.1 and Gemma): c_proj(gelu(gate) * up)."""

    Options = GeGLUOptions

    def __init__(self, opts: GeGLUOptions, dims: Dims):
        super().__init__(opts, dims)
        self.approximate = opts.approximate

    def act(self, x):
        return F.gelu(x, approximate=self.approximate)


@hookimpl
def register_components(register):
    register("mlp", "gelu", GeluMLP)
    register("mlp", "relu", ReluMLP)
    register("mlp", "relu2", Relu2MLP)
    register("mlp", "swiglu", SwiGLU)
    register("mlp", "geglu", GeGLU)
