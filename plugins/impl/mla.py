"""The code of toolkit.plugins.mla's parts, imported when one is built (their options and docs are there)."""
from __future__ import annotations

import attrs
import torch
from torch import nn

from toolkit.contracts import Dims, attend, update_cache
from toolkit.plugins.mla import MLAOptions


class MultiHeadLatentAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2): a compressed key-value latent is all the cache keeps; decoupled RoPE."""

    Options = MLAOptions
    conformance_skip = {
        "scale": "rotate is handed only the rotary part of q and k (decoupled RoPE), so the kit's probe sees "
                 "part of the logits; attend scales by 1/sqrt(nope_dim + rope_dim)",
        "flops": "decoding rebuilds keys and values from every cached latent, so a decoded token's FLOPs grow "
                 "with the context; flops_per_token counts training, where each latent is expanded once",
    }

    def __init__(self, opts: MLAOptions, dims: Dims):
        super().__init__()
        C, nh, hs = dims.n_embd, dims.n_head, dims.head_dim
        self.n_head, self.backend, self.dropout = nh, opts.backend, dims.dropout
        self.kv_rank = opts.kv_rank or C // 4
        self.rope_dim = opts.rope_dim or max(2, hs // 2 // 2 * 2)
        self.nope_dim, self.v_dim = opts.nope_dim or hs, opts.v_dim or hs
        q_width = nh * (self.nope_dim + self.rope_dim)
        if opts.q_rank:
            self.q_down = nn.Linear(C, opts.q_rank, bias=False)
            self.q_norm = dims.build("norm", opts.latent_norm, attrs.evolve(dims, role="latent"), opts.q_rank)
            self.q_up = nn.Linear(opts.q_rank, q_width, bias=False)
        else:
            self.c_q = nn.Linear(C, q_width, bias=dims.bias)
        self.kv_down = nn.Linear(C, self.kv_rank + self.rope_dim, bias=False)  # [latent; the shared rotary key]
        self.kv_norm = dims.build("norm", opts.latent_norm, attrs.evolve(dims, role="latent"), self.kv_rank)
        self.kv_up = nn.Linear(self.kv_rank, nh * (self.nope_dim + self.v_dim), bias=False)
        self.c_proj = nn.Linear(nh * self.v_dim, C, bias=dims.bias)
        self.resid_dropout = nn.Dropout(dims.dropout)
        self.scale = dims.attention_scale(self.nope_dim + self.rope_dim)  # None unless muP (contracts)

    def forward(self, x, position, pos, cache=None):
        B, T, C = x.shape
        nh, nope, rope = self.n_head, self.nope_dim, self.rope_dim
        q = self.q_up(self.q_norm(self.q_down(x))) if hasattr(self, "q_up") else self.c_q(x)
        q = q.view(B, T, nh, nope + rope).transpose(1, 2)  # (B, nh, T, nope + rope)
        q_nope, q_rope = q.split([nope, rope], dim=-1)
        latent, k_rope = self.kv_down(x).split([self.kv_rank, rope], dim=-1)  # (B, T, kv_rank), (B, T, rope)
        q_rope, k_rope = position.rotate(q_rope, k_rope.unsqueeze(1), pos)  # decoupled: only these dims turn
        # the cache holds the latent and the rotary key: (B, 1, T_all, kv_rank) and (B, 1, T_all, rope)
        latent, k_rope, k_pos = update_cache(cache, latent.unsqueeze(1), k_rope, pos)
        Tk = latent.size(2)
        kv = self.kv_up(self.kv_norm(latent.squeeze(1))).view(B, Tk, nh, nope + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([nope, self.v_dim], dim=-1)  # (B, nh, Tk, nope), (B, nh, Tk, v_dim)
        k = torch.cat([k_nope, k_rope.expand(B, nh, Tk, rope)], dim=-1)  # (B, nh, Tk, nope + rope)
        y = attend(torch.cat([q_nope, q_rope], dim=-1), k, v, pos, k_pos, position,
                   dropout=self.dropout if self.training else 0.0, scale=self.scale, backend=self.backend)  # (B, nh, T, v_dim)
        y = y.transpose(1, 2).reshape(B, T, nh * self.v_dim)  # (B, T, nh * v_dim)
        return self.resid_dropout(self.c_proj(y))

    def flops_per_token(self, seq_len: int) -> int:
        proj = 2 * sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        return proj + seq_len * 2 * self.n_head * (self.nope_dim + self.rope_dim + self.v_dim)
