"""The code of toolkit.plugins.differential's parts, imported when one is built (their options and docs are there)."""
from __future__ import annotations

import math

import attrs
import torch
from torch import nn

from toolkit.contracts import Dims, attend, update_cache
from toolkit.errors import ConfigError
from toolkit.plugins.differential import DiffOptions


class DifferentialAttention(nn.Module):
    """Differential attention (Ye et al. 2024): the difference of two softmax maps, weighted by a learned lambda."""

    Options = DiffOptions
    conformance_skip = {"scale": "two softmaxes per head, each over half of the queries rotate sees: the kit's "
                                 "one-bias probe does not fit (attend scales each by 1/sqrt(head dim))"}

    def __init__(self, opts: DiffOptions, dims: Dims):
        super().__init__()
        if dims.n_head % 2:
            raise ConfigError([f"model.attention: differential attention pairs heads, so n_head must be even, "
                               f"got {dims.n_head}"])
        C, self.n_head, self.head_dim, self.backend = dims.n_embd, dims.n_head // 2, dims.head_dim, opts.backend
        self.width = 2 * self.n_head * self.head_dim  # = n_embd unless the model sets head_dim
        self.c_attn = nn.Linear(C, 3 * self.width, bias=dims.bias)  # rows: q (2 halves x nh x d), k (same), v (nh x 2d)
        self.c_proj = nn.Linear(self.width, C, bias=dims.bias)
        layer = dims.layer or 0  # the paper's l - 1
        self.lambda_init = opts.lambda_init if opts.lambda_init is not None else 0.8 - 0.6 * math.exp(-0.3 * layer)
        self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2 = (
            nn.Parameter(torch.empty(self.head_dim)) for _ in range(4))
        self.subln = dims.build("norm", "rmsnorm", attrs.evolve(dims, role="head"), 2 * self.head_dim)
        self.scale = dims.attention_scale(self.head_dim)  # None (1/sqrt(d)) unless muP (contracts)
        self.dropout = dims.dropout
        self.resid_dropout = nn.Dropout(dims.dropout)

    def reset_parameters(self):
        for p in (self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2):
            nn.init.normal_(p, mean=0.0, std=0.1)  # as the paper's code

    def lam(self) -> torch.Tensor:
        return (torch.exp((self.lambda_q1 * self.lambda_k1).sum()) - torch.exp((self.lambda_q2 * self.lambda_k2).sum())
                + self.lambda_init)

    def forward(self, x, position, pos, cache=None):
        B, T, C = x.shape
        nh, d = self.n_head, self.head_dim
        q, k, v = self.c_attn(x).split(self.width, dim=2)
        q = q.view(B, T, 2 * nh, d).transpose(1, 2)  # (B, 2nh, T, d): heads 2i and 2i+1 are head i's halves
        k = k.view(B, T, 2 * nh, d).transpose(1, 2)  # (B, 2nh, T, d)
        v = v.view(B, T, nh, 2 * d).transpose(1, 2)  # (B, nh, T, 2d)
        q, k = position.rotate(q, k, pos)
        k, v, k_pos = update_cache(cache, k, v, pos)
        drop = self.dropout if self.training else 0.0
        a1 = attend(q[:, 0::2], k[:, 0::2], v, pos, k_pos, position, dropout=drop, scale=self.scale,
                    backend=self.backend)  # (B, nh, T, 2d)
        a2 = attend(q[:, 1::2], k[:, 1::2], v, pos, k_pos, position, dropout=drop, scale=self.scale,
                    backend=self.backend)
        y = self.subln(a1 - self.lam().to(a1.dtype) * a2) * (1 - self.lambda_init)  # (B, nh, T, 2d)
        y = y.transpose(1, 2).reshape(B, T, self.width)  # (B, T, 2 nh d)
        return self.resid_dropout(self.c_proj(y))

    def attention_map(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """What eq. 1 applies to V: softmax1 - lambda softmax2, (B, n_head/2, Tq, Tk); rows sum to 1 - lambda."""
        s1, s2 = maps  # attend's two calls per forward, in order
        return s1 - self.lam().detach().to(s1.dtype) * s2

    def metrics(self) -> dict[str, torch.Tensor]:
        return {"lambda": self.lam().detach()}

    def flops_per_token(self, seq_len: int) -> int:
        proj = 2 * (self.c_attn.weight.numel() + self.c_proj.weight.numel())
        # per key: two q.k products over nh heads of width d, two weighted sums over values of width 2d
        return proj + seq_len * 2 * (2 * self.n_head * self.head_dim + 2 * self.n_head * 2 * self.head_dim)
