"""Qwen 3 (Qwen Team 2025) in Hugging Face layout: Llama with QK-norm, an RMSNorm over each head's
queries and keys (weights ``self_attn.q_norm`` / ``k_norm``, eps ``rms_norm_eps``) applied before
RoPE, and ``head_dim`` set on its own (128 by default, whatever hidden_size / heads is). Layers that
``layer_types`` marks ``sliding_attention`` (only with ``use_sliding_window``) become a layer group
with a sliding-window attention. See :mod:`toolkit.hf.llama`.
"""
from __future__ import annotations

from .llama import _COMMON, Family

# transformers' Qwen3Config defaults
QWEN3 = Family("qwen3", "Qwen3ForCausalLM",
               {**_COMMON, "attention_bias": False, "num_key_value_heads": 32, "head_dim": 128, "max_position_embeddings": 32768,
                "use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 28, "layer_types": None},
               qk_norm=True)
