"""Built-in components that pass state between layers (toolkit.contracts, "State between layers"):
the pieces of the NanoGPT speedrun (modded-nanogpt, Jordan et al. 2024) that need it.

    shortcut_block   a pre-norm block with modded-nanogpt's two shortcuts, each with learned weights:
                     x0 (x = a*x + b*x0 first, x0 the first block's input; a, b start at 1, 0) and
                     U-net skips (layer L//2 + d adds w * the output of layer L//2 - 1 - d; w starts at 1)
    value_residual   multi-head attention whose values mix with the first layer's (ResFormer, Zhou et al.
                     2024): v = l*v + (1-l)*v1 in every layer after the first, l learned per layer;
                     with value_embeds = n, modded-nanogpt's value embeddings: the first n layers each
                     own a token embedding table, and v = a*v + b*table[idx] there and in the last n
                     layers, which reuse the tables in the same order (a, b learned, start at 0.5);
                     with window (and window_start), sliding_window's band (growing in training)
"""
from __future__ import annotations

import attrs

from toolkit.hookspecs import hookimpl

from .attention import SlidingWindowOptions


@attrs.frozen
class ShortcutOptions:
    x0: bool = True  # mix the first block's input back in before the layer (learned a, b)
    unet: bool = True  # U-net skips from the first half's outputs to the second half's inputs (learned w)


@attrs.frozen
class ValueResidualOptions(SlidingWindowOptions):
    # each later layer's share of its own values at init; the rest is the first layer's (ResFormer: 0.5)
    init_lambda: float = attrs.field(default=0.5, validator=attrs.validators.and_(attrs.validators.ge(0.0),
                                                                                    attrs.validators.le(1.0)))
    # token embedding tables mixed into the values of the first and the last value_embeds layers (modded-nanogpt: 3)
    value_embeds: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    # sliding_window's band; None: full causal attention
    window: int | None = attrs.field(default=None, validator=attrs.validators.optional(attrs.validators.gt(0)))


@hookimpl
def register_components(register):
    register("block", "shortcut_block", "toolkit.plugins.impl.shortcuts:ShortcutBlock", ShortcutOptions,
             doc="Pre-norm block with modded-nanogpt's learned x0 shortcut and U-net skips (state between layers).")
    register("attention", "value_residual", "toolkit.plugins.impl.shortcuts:ValueResidualAttention", ValueResidualOptions,
             doc="Multi-head attention whose values mix with the first layer's (value residual, ResFormer; Zhou et al. 2024).")
