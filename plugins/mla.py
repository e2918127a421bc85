"""Multi-head latent attention (DeepSeek-AI 2024, DeepSeek-V2 section 2.1): keys and values are rebuilt
from a small latent, and the latent is all the KV cache keeps.

    c = norm(W_dkv x)                      (B, T, kv_rank): the compressed key-value latent (cached)
    k_rope = RoPE(W_kr x)                  (B, 1, T, rope_dim): one rotary key shared by all heads (cached)
    k_i = [W_uk,i c ; k_rope],  v_i = W_uv,i c            per head, rebuilt from the cache
    q_i = [q_nope,i ; RoPE(q_rope,i)]      from x (or from a low-rank latent, q_rank)

RoPE cannot act on keys rebuilt from a latent (it would have to be folded into W_uk), so it is
*decoupled*: only the rope_dim part of queries and keys is rotated, and the position's rotate hook
is handed just that part. The cache holds kv_rank + rope_dim numbers per token and layer, against
2 * n_head * head_dim for multi-head attention (``playattention inspect`` shows both).
"""
from __future__ import annotations

import attrs
import torch
from attrs import validators as v
from torch import nn

from toolkit.contracts import Dims, attend, update_cache
from toolkit.hookspecs import hookimpl


def _optional_positive(_, attribute, value):
    if value is not None and (isinstance(value, bool) or value <= 0):
        raise ValueError(f"must be > 0, got {value!r}")


def _optional_even(_, attribute, value):
    # RoPE rotates pairs of dimensions: an odd rotary part would leave one dimension unrotated (or fail)
    if value is not None and value % 2:
        raise ValueError(f"must be even (RoPE rotates pairs of dimensions), got {value!r}")


@attrs.frozen
class MLAOptions:
    kv_rank: int | None = attrs.field(default=None, validator=_optional_positive)  # default n_embd / 4
    q_rank: int | None = attrs.field(default=None, validator=_optional_positive)  # None: queries straight from x
    rope_dim: int | None = attrs.field(default=None, validator=[_optional_positive, _optional_even])  # default head_dim / 2
    nope_dim: int | None = attrs.field(default=None, validator=_optional_positive)  # default head_dim
    v_dim: int | None = attrs.field(default=None, validator=_optional_positive)  # default head_dim
    latent_norm: str = "rmsnorm"  # a registered norm over the latents (DeepSeek-V2: RMSNorm)
    # fused SDPA or spelled out: same outputs
    backend: str = attrs.field(default="sdpa", validator=v.in_(("sdpa", "math")))


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


@hookimpl
def register_components(register):
    register("attention", "mla", MultiHeadLatentAttention)
