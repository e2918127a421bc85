"""Mixtral (Jiang et al. 2024) in Hugging Face layout: Mistral with a sparse MoE MLP in every layer.

The router (``block_sparse_moe.gate``, or ``mlp.gate`` as transformers 5 names it) becomes the moe
MLP's ``router``; expert e's w1 (gate), w3 (up) and w2 (down) become ``experts.{e}.c_fc`` = [w1; w3]
and ``experts.{e}.c_proj`` of a swiglu expert. Routing is Mixtral's: softmax over the experts in
fp32, the top ``num_experts_per_tok`` renormalised to sum to 1. ``router_aux_loss_coef`` becomes
``load_balance``; docs/hf.md says how the two losses' normalisations differ. See :mod:`toolkit.hf.llama`.
"""
from __future__ import annotations

from .llama import _COMMON, Family

# transformers' MixtralConfig defaults
MIXTRAL = Family("mixtral", "MixtralForCausalLM",
                 {**_COMMON, "num_key_value_heads": 8, "max_position_embeddings": 4096 * 32, "rms_norm_eps": 1e-5,
                  "rope_theta": 1e6, "sliding_window": None, "num_experts_per_tok": 2, "num_local_experts": 8,
                  "router_aux_loss_coef": 0.001, "router_jitter_noise": 0.0, "output_router_logits": False},
                 window=True, moe=True)
