"""The code of toolkit.plugins.gated's parts, imported when one is built (their options and docs are there)."""
from __future__ import annotations

import torch
from torch import nn

from toolkit.contracts import Dims
from toolkit.plugins.gated import GatedOptions

from .attention import GroupedQueryAttention


class GatedAttention(GroupedQueryAttention):
    """Output-gated attention (Qiu et al. 2025, G1): sigmoid(x W) times each head's output, before c_proj."""

    Options = GatedOptions

    def __init__(self, opts: GatedOptions, dims: Dims):
        super().__init__(opts, dims)
        self.headwise = opts.gate == "headwise"
        # the gate reads the same normed input x as q, k, v (the paper computes it from the query side)
        self.c_gate = nn.Linear(dims.n_embd, self.n_head * (1 if self.headwise else self.head_dim), bias=dims.bias)

    def forward(self, x, position, pos, cache=None):
        B, T, _ = x.shape
        y = self.heads(x, position, pos, cache).view(B, T, self.n_head, self.head_dim)  # (B, T, nh, hs)
        gate = torch.sigmoid(self.c_gate(x)).view(B, T, self.n_head, -1)  # (B, T, nh, hs or 1)
        y = (y * gate).view(B, T, self.n_head * self.head_dim)  # (B, T, nh*hs)
        return self.resid_dropout(self.c_proj(y))

    def flops_per_token(self, seq_len: int) -> int:
        return super().flops_per_token(seq_len) + 2 * self.c_gate.weight.numel()
