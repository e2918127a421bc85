"""Output-gated attention (Qiu et al. 2025, "Gated Attention for Large Language Models: Non-linearity,
Sparsity, and Attention-Sink-Free"): a sigmoid gate from the layer's input scales each head's
attention output before the output projection, the paper's G1 position::

    Y' = Y * sigmoid(X W_theta)          Y: SDPA's output (B, T, nh*hs), X: the block's normed input

The gate is head-specific and, by default, elementwise (one gate per output channel of each head,
the variant the paper recommends; "headwise" gives one per head). It adds non-linearity between the
value and output projections (which are otherwise one low-rank linear map) and query-dependent
sparsity; the paper reports that it removes the attention sink (first-token share 46.7% -> 4.8%)
and loss spikes. Everything else is grouped-query attention, so the options are gqa's.
"""
from __future__ import annotations

import attrs
from attrs import validators as v

from toolkit.hookspecs import hookimpl

from .attention import GQAOptions


@attrs.frozen
class GatedOptions(GQAOptions):
    # "elementwise": a gate per channel of each head (the paper's best, G1); "headwise": one per head
    gate: str = attrs.field(default="elementwise", validator=v.in_(("elementwise", "headwise")))


@hookimpl
def register_components(register):
    register("attention", "gated", "toolkit.plugins.impl.gated:GatedAttention", GatedOptions,
             doc="Output-gated attention (Qiu et al. 2025, G1): sigmoid(x W) times each head's output, before c_proj.")
