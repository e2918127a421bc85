"""The code of toolkit.plugins.shortcuts's parts, imported when one is built (their options and docs are there)."""
from __future__ import annotations

import torch
from torch import nn

from toolkit.contracts import Dims
from toolkit.errors import ConfigError
from toolkit.plugins.shortcuts import ShortcutOptions, ValueResidualOptions

from .attention import SlidingWindowAttention
from .block import PreNorm


class ShortcutBlock(PreNorm):
    """Pre-norm block with modded-nanogpt's learned x0 shortcut and U-net skips (state between layers)."""

    Options = ShortcutOptions
    reads_state = True  # x0 and the U-net skips: what earlier layers wrote

    def __init__(self, opts: ShortcutOptions, dims: Dims):
        super().__init__(opts, dims)
        half, i = dims.n_layer // 2, dims.layer or 0
        # a 1-dim tensor each: DeepSpeed cannot flatten 0-dim parameters
        self.lambdas = nn.Parameter(torch.tensor([1.0, 0.0])) if opts.x0 else None
        self.save = f"unet{i}" if opts.unet and i < half else None  # the encoder half saves its outputs
        self.skip_from = f"unet{2 * half - 1 - i}" if opts.unet and half <= i < 2 * half else None
        self.skip_weight = nn.Parameter(torch.ones(1)) if self.skip_from else None

    def forward(self, x, position, pos, cache=None, state=None):
        # a layer whose partner is not a shortcut block (a recipe that uses it in some layers) gets no skip
        if self.skip_from is not None and self.skip_from in state:
            x = x + self.skip_weight * state[self.skip_from]
        if self.lambdas is not None:
            x = self.lambdas[0] * x + self.lambdas[1] * state["x0"]
        x = super().forward(x, position, pos, cache, state)
        if self.save is not None:
            state[self.save] = x  # a new entry: later layers read it, nothing changes it in place
        return x


class ValueResidualAttention(SlidingWindowAttention):
    """Multi-head attention whose values mix with the first layer's (value residual, ResFormer; Zhou et al. 2024)."""

    Options = ValueResidualOptions

    def __init__(self, opts: ValueResidualOptions, dims: Dims):
        if opts.window is None and opts.window_start is not None:
            raise ConfigError(["model.attention.window_start needs a window to grow to"])
        super().__init__(opts, dims)
        # the first layer's values are its own: it has nothing to mix
        self.lam = nn.Parameter(torch.full((1,), opts.init_lambda)) if dims.layer else None
        n, i, L = opts.value_embeds, dims.layer or 0, dims.n_layer
        if 2 * n > L:
            raise ConfigError([f"model.attention.value_embeds ({n}) must be at most half of n_layer ({L}): "
                               "the first and the last value_embeds layers use the tables"])
        # layer i < n owns table i; layer L - n + j reads table j from the state (shared, as modded-nanogpt)
        self.embed_key = f"ve{i}" if i < n else f"ve{i - (L - n)}" if n and i >= L - n else None
        self.value_embed = nn.Embedding(dims.vocab_size, self.n_kv_head * self.head_dim) if i < n else None
        self.ve_lambdas = nn.Parameter(torch.tensor([0.5, 0.5])) if self.embed_key else None

    def forward(self, x, position, pos, cache=None, state=None):
        return self.resid_dropout(self.c_proj(self.heads(x, position, pos, cache, state)))

    def mix_values(self, v, state):
        # this step's tokens only (before the cache): the first layer that runs writes its values
        v1 = state.setdefault("v1", v)
        if self.lam is not None:
            v = self.lam * v + (1 - self.lam) * v1
        if self.value_embed is not None:
            B, nkv, T, hs = v.shape
            state[self.embed_key] = self.value_embed(state["idx"]).view(B, T, nkv, hs).transpose(1, 2)
        # a partner layer that is not this attention (another kind in some layers) leaves no table
        if self.embed_key is not None and self.embed_key in state:
            v = self.ve_lambdas[0] * v + self.ve_lambdas[1] * state[self.embed_key]
        return v
