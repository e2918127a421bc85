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
from attrs import validators as v

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


@hookimpl
def register_components(register):
    register("attention", "mla", "toolkit.plugins.impl.mla:MultiHeadLatentAttention", MLAOptions,
             doc="Multi-head latent attention (DeepSeek-V2): a compressed key-value latent is all the cache keeps; decoupled RoPE.")
