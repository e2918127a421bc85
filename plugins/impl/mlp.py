"""The code of toolkit.plugins.mlp's parts, imported when one is built (their options and docs are there)."""
from __future__ import annotations

import math

import torch.nn.functional as F
from torch import nn

from toolkit.contracts import Dims
from toolkit.errors import ConfigError
from toolkit.plugins.mlp import GatedOptions, GeGLUOptions, GeluOptions, MLPOptions


def check_hidden(hidden: int, opts, n_embd: int) -> int:
    """``hidden``, or ConfigError when a tiny multiplier leaves no hidden layer at all."""
    if hidden < 1:
        raise ConfigError([f"model.mlp.multiplier: {opts.multiplier!r} * n_embd {n_embd} leaves a hidden layer "
                           f"{hidden} wide; it must be at least 1 (or give hidden_dim)"])
    return hidden


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
