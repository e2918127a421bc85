"""Built-in attention components. Contract: toolkit.contracts (forward(x, position, pos, cache)).

All four share one module, :class:`GroupedQueryAttention`; they differ in how many key/value
heads they keep and in how far back a query may look:

    mha             n_kv_head = n_head             (Vaswani et al. 2017)
    gqa             n_kv_head divides n_head        (Ainslie et al. 2023)
    mqa             n_kv_head = 1                   (Shazeer 2019)
    sliding_window  causal band of `window` keys    (Child et al. 2019; Beltagy et al. 2020; Mistral 7B);
                    with window_start, a band that grows during training (modded-nanogpt)

Parameters: a fused ``c_attn`` whose output rows are [q (n_head*hs); k (n_kv_head*hs); v (n_kv_head*hs)]
and ``c_proj``. With n_kv_head = n_head this is exactly GPT-2's ``c_attn`` layout, and Llama's
separate q/k/v projections load by stacking them in that order.
"""
from __future__ import annotations

import attrs
from attrs import validators as v

from toolkit.families import BACKENDS
from toolkit.hookspecs import hookimpl
from toolkit.validators import positive_int


@attrs.frozen
class AttentionOptions:
    """Options every built-in attention takes."""

    # "sdpa": the fused kernel that fits (SDPA; FlexAttention where SDPA would need a mask and flex is
    # faster there, i.e. CUDA); "flex": FlexAttention wherever it runs (not for dropout, nor for training
    # on CPU); "math": softmax(QK^T/sqrt(d) + mask)V spelled out. All give the same outputs (up to float
    # rounding); toolkit.contracts.attend says which runs when.
    backend: str = attrs.field(default="sdpa", validator=v.in_(BACKENDS))
    # name of a registered norm applied per head to queries and keys over head_dim, before any rotation
    # (QK-norm: Henry et al. 2020; Dehghani et al. 2023 use it to keep attention logits from blowing up)
    qk_norm: str | None = attrs.field(default=None, validator=v.optional(v.instance_of(str)))
    # cap the scaled logits smoothly at +-softcap: softcap * tanh(logits / softcap) (Gemma 2 uses 50);
    # SDPA cannot, so FlexAttention runs where it can and the math path elsewhere
    softcap: float | None = attrs.field(default=None, validator=v.optional(v.gt(0.0)))
    # qk_norm over each head (Qwen 3, Gemma 3) or over all heads' queries and keys at once (OLMo 2)
    qk_norm_scope: str = attrs.field(default="head", validator=v.in_(("head", "all")))
    # the factor on q.k before the softmax; None: 1/sqrt(head_dim) (Vaswani et al. 2017). Gemma 2 27B
    # scales by query_pre_attn_scalar**-0.5 = 144**-0.5 with heads 128 wide
    scale: float | None = attrs.field(default=None, validator=v.optional(v.gt(0.0)))


@attrs.frozen
class GQAOptions(AttentionOptions):
    # key/value heads, each shared by n_head / n_kv_head query heads; None: n_head (plain multi-head)
    n_kv_head: int | None = attrs.field(default=None, validator=v.optional(positive_int))


@attrs.frozen
class SlidingWindowOptions(GQAOptions):
    # a query at position p attends to keys at positions p - window + 1 .. p
    window: int = attrs.field(default=256, validator=positive_int)
    # grow the window during training (modded-nanogpt: 128 -> 1792 tokens): window_start at step 0,
    # then linearly to `window` at window_growth * max_steps, in multiples of window_start (each size
    # compiles once). Derived from the step (set_progress), so a resume continues it; evaluation and
    # generation always use `window`. None: `window` throughout
    window_start: int | None = attrs.field(default=None, validator=v.optional(positive_int))
    # the fraction of training over which the window grows from window_start to window
    window_growth: float = attrs.field(default=1.0, validator=[v.gt(0.0), v.le(1.0)])


@hookimpl
def register_components(register):
    register("attention", "mha", "toolkit.plugins.impl.attention:MultiHeadAttention", AttentionOptions,
             doc="Causal multi-head self-attention (Vaswani et al. 2017) with GPT-2's fused qkv projection.")
    register("attention", "gqa", "toolkit.plugins.impl.attention:GroupedQueryAttention", GQAOptions,
             doc="Grouped-query attention (Ainslie et al. 2023): groups of query heads share a key/value head.")
    register("attention", "mqa", "toolkit.plugins.impl.attention:MultiQueryAttention", AttentionOptions,
             doc="Multi-query attention (Shazeer 2019): all query heads share one key/value head.")
    register("attention", "sliding_window", "toolkit.plugins.impl.attention:SlidingWindowAttention", SlidingWindowOptions,
             doc="Causal attention over the last `window` tokens only; its KV cache stays `window` long.")
