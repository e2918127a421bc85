"""Mixture-of-experts MLP: a router sends every token to its top-k experts, each a registered MLP.

Sparse MoE layers (Shazeer et al. 2017) as in Switch (Fedus et al. 2022) and Mixtral (Jiang et al.
2024): softmax router probabilities, the top k renormalised to weights (Mixtral), and dropless
routing: every token is computed by each of its k experts, with no capacity limit and no dropped
tokens (as Mixtral and MegaBlocks, Gale et al. 2023). Experts are any registered MLP (``expert``).

Two auxiliary losses, added to the training objective through the contract (``aux_losses``):

    load_balance  alpha * E * sum_e f_e * P_e   (Switch, eq. 4; f_e: share of the N*k assignments that
                  went to expert e, P_e: mean router probability of e; 1 when balanced)
    router_z      beta * mean_n logsumexp(logits_n)^2   (ST-MoE, Zoph et al. 2022: keeps logits small)
"""
from __future__ import annotations

import attrs
from attrs import validators as v

from toolkit.families import SPEC_TYPES
from toolkit.hookspecs import hookimpl


#: the most experts of one MoE layer (DeepSeek-V3 has 256 routed experts; 100k would take minutes to
#: build, even on the meta device recipe validation uses)
MAX_EXPERTS = 512


@attrs.frozen
class MoEOptions:
    # experts per layer, at most MAX_EXPERTS: each expert is its own module, built and looped over one by one
    experts: int = attrs.field(default=8, validator=[v.ge(2), v.le(MAX_EXPERTS)])
    top_k: int = attrs.field(default=2, validator=v.ge(1))  # experts the router picks per token
    # each expert: a registered MLP, kind and options (GPT-2's by default: give multiplier = 2.0 to make
    # top-2 routing cost what one dense MLP does)
    expert: SPEC_TYPES["mlp"] = attrs.field(factory=lambda: SPEC_TYPES["mlp"]("gelu"))
    load_balance: float = attrs.field(default=0.01, validator=v.ge(0.0))  # Switch's alpha
    router_z: float = attrs.field(default=0.001, validator=v.ge(0.0))  # ST-MoE's beta


@hookimpl
def register_components(register):
    register("mlp", "moe", "toolkit.plugins.impl.moe:MoE", MoEOptions,
             doc="Top-k mixture of experts (Switch, Mixtral): a router picks k experts per token; dropless, load-balanced.")
