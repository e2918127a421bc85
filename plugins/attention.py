"""Built-in attention components. Contract: toolkit.contracts (forward(x, position, pos, cache))."""
from __future__ import annotations

import attrs
import torch
from attrs import validators as v
from torch import nn

from toolkit.contracts import Dims, attend, update_cache
from toolkit.hookspecs import hookimpl


@attrs.frozen
class MHAOptions:
    backend: str = attrs.field(default="sdpa", validator=v.in_(("sdpa", "math")))


class CausalSelfAttention(nn.Module):
    """Causal multi-head self-attention (Vaswani et al. 2017) with a fused qkv projection, as in GPT-2."""

    Options = MHAOptions

    def __init__(self, opts: MHAOptions, dims: Dims):
        super().__init__()
        C = dims.n_embd
        self.n_head, self.head_dim, self.backend = dims.n_head, dims.head_dim, opts.backend
        self.c_attn = nn.Linear(C, 3 * C, bias=dims.bias)  # q, k, v for all heads in one matmul
        self.c_proj = nn.Linear(C, C, bias=dims.bias)
        self.dropout = dims.dropout
        self.resid_dropout = nn.Dropout(dims.dropout)

    def forward(self, x, position, pos, cache=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        q, k = position.rotate(q, k, pos)
        k, v, k_pos = update_cache(cache, k, v, pos)
        y = attend(q, k, v, pos, k_pos, position, dropout=self.dropout if self.training else 0.0,
                   backend=self.backend)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side again
        return self.resid_dropout(self.c_proj(y))

    def flops_per_token(self, seq_len: int) -> int:
        # projections, plus QK^T and AV over a context of seq_len (PaLM's 12*L*H*Q*T counts both, x3 for backward)
        return 2 * (self.c_attn.weight.numel() + self.c_proj.weight.numel()) + 4 * seq_len * self.n_head * self.head_dim


@hookimpl
def register_components(register):
    register("attention", "mha", CausalSelfAttention)
