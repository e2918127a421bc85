"""Built-in positional components. Contract: toolkit.contracts.Position (embed / rotate / score_bias).

    learned     added to embeddings, trained, limited to block_size   (GPT-2)
    sinusoidal  added to embeddings, fixed, no limit                  (Vaswani et al. 2017)
    rope        rotates queries and keys, no limit                   (Su et al. 2021)
    alibi       linear bias on attention scores, no limit            (Press et al. 2021)
    none        nothing: causal masking alone carries order (NoPE)   (Kazemnejad et al. 2023)

The fixed schemes compute their tables from ``pos`` on every call, in fp32: a few sin/cos per
token are nothing next to the projections, there is no length limit to extend and no host-side
bounds check (which would stall a GPU), and casting the model to bf16 cannot degrade them.
"""
from __future__ import annotations

import attrs
from attrs import validators as v

from toolkit.hookspecs import hookimpl
from toolkit.registry import NoOptions


@attrs.frozen
class SinusoidalOptions:
    # wavelengths form a geometric progression from 2*pi to base*2*pi (10000 in the paper)
    base: float = attrs.field(default=10000.0, validator=v.gt(1.0))
    # amplitude of the encodings. The paper multiplies token embeddings (init std d^-1/2) by sqrt(d)
    # (section 3.4), so tokens and positions both have unit scale. GPT-2's init gives token
    # embeddings std 0.02 instead, so the encodings are scaled to match, keeping the paper's balance;
    # at amplitude 1 they drown the tokens (val loss 3.3 vs 2.3 for learned after 500 CPU steps).
    scale: float = attrs.field(default=0.02, validator=v.gt(0.0))


#: RoPE context-extension schemes (``scaling``), computed as transformers' modeling_rope_utils does
ROPE_SCALINGS = ("none", "linear", "dynamic", "yarn", "llama3")


@attrs.frozen
class RopeOptions:
    # base of the rotation frequencies; Llama 1/2 use 10000, Llama 3 500000
    theta: float = attrs.field(default=10000.0, validator=v.gt(1.0))
    # the share of each head's dimensions that rotates, the rest passing through (partial rotary:
    # GPT-NeoX/Pythia rotate 0.25, Phi-2 0.4); the frequencies are over the rotated dimensions
    fraction: float = attrs.field(default=1.0, validator=[v.gt(0.0), v.le(1.0)])
    # context extension, stretching the frequencies by `factor`: "linear" (position interpolation, Chen et
    # al. 2023), "dynamic" (NTK-aware base growing with the sequence, bloc97/emozilla 2023), "yarn" (Peng et
    # al. 2023), "llama3" (Llama 3.1: low frequencies / factor, high ones kept, a smooth ramp between)
    scaling: str = attrs.field(default="none", validator=v.in_(ROPE_SCALINGS))
    factor: float = attrs.field(default=1.0, validator=v.gt(0.0))  # how many times longer a context than pretrained
    # the context the model was pretrained at (dynamic, yarn, llama3): dynamic grows the base only beyond it
    original_max_len: int | None = attrs.field(default=None, validator=v.optional([v.instance_of(int), v.gt(0)]))
    # llama3: wavelengths above original_max_len / low_freq_factor are divided by factor, those below
    # original_max_len / high_freq_factor kept
    low_freq_factor: float = attrs.field(default=1.0, validator=v.gt(0.0))
    high_freq_factor: float = attrs.field(default=4.0, validator=v.gt(0.0))  # llama3: see low_freq_factor
    # yarn: the ramp between interpolated and kept dimensions, in rotations over original_max_len (eq. 17-18)
    beta_fast: float = attrs.field(default=32.0, validator=v.gt(0.0))
    beta_slow: float = attrs.field(default=1.0, validator=v.gt(0.0))  # yarn: the ramp's other end (see beta_fast)
    # yarn: cos and sin times this (so attention logits times its square); None: 0.1 ln(factor) + 1 (eq. 22)
    attention_factor: float | None = attrs.field(default=None, validator=v.optional(v.gt(0.0)))
    # yarn: round the ramp's ends outwards to whole dimensions (transformers' default)
    truncate: bool = True


@hookimpl
def register_components(register):
    register("position", "learned", "toolkit.plugins.impl.position:LearnedPosition", NoOptions,
             doc="Learned absolute position embeddings added to token embeddings (GPT-2's `wpe`).")
    register("position", "sinusoidal", "toolkit.plugins.impl.position:SinusoidalPosition", SinusoidalOptions,
             doc="Fixed sinusoidal position encodings added to token embeddings (Vaswani et al. 2017); no length limit.")
    register("position", "rope", "toolkit.plugins.impl.position:RotaryPosition", RopeOptions,
             doc="Rotary position embeddings (Su et al. 2021): rotate queries and keys so q.k depends on distance only.")
    register("position", "alibi", "toolkit.plugins.impl.position:ALiBiPosition", NoOptions,
             doc="Attention with linear biases (Press et al. 2021): penalise scores by head slope times distance; no limit.")
    register("position", "none", "toolkit.plugins.impl.position:NoPosition", NoOptions,
             doc="No positional information (NoPE, Kazemnejad et al. 2023): causal masking alone reveals order.")
