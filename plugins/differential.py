"""Differential attention (Ye et al. 2024, "Differential Transformer"): the difference of two softmax
maps cancels the attention both give to irrelevant context.

Each of n_head / 2 heads has two query/key halves (q1, k1), (q2, k2) of the model's head dim d and a
value of width 2d, so the parameters are those of multi-head attention::

    DiffAttn(X) = (softmax(Q1 K1^T / sqrt(d)) - lambda softmax(Q2 K2^T / sqrt(d))) V      (eq. 1)
    lambda = exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init                              (eq. 2)
    lambda_init = 0.8 - 0.6 exp(-0.3 (l - 1)), l = 1 .. L the layer                      (eq. 5)

Each head's output is RMS-normalised (GroupNorm in the paper) and scaled by 1 - lambda_init. The
layer index is data (``dims.layer``); the position's hooks get the heads attention hands them:
rotate sees all 2 * n_head/2 query halves of width d, score_bias is asked for n_head / 2 heads.
"""
from __future__ import annotations

import attrs
from attrs import validators as v

from toolkit.hookspecs import hookimpl


@attrs.frozen
class DiffOptions:
    # fused SDPA or spelled out: same outputs
    backend: str = attrs.field(default="sdpa", validator=v.in_(("sdpa", "math")))
    # the same lambda_init in every layer instead of the paper's schedule over depth
    lambda_init: float | None = attrs.field(default=None, validator=v.optional([v.ge(0.0), v.lt(1.0)]))


@hookimpl
def register_components(register):
    register("attention", "diff", "toolkit.plugins.impl.differential:DifferentialAttention", DiffOptions,
             doc="Differential attention (Ye et al. 2024): the difference of two softmax maps, weighted by a learned lambda.")
