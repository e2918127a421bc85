"""Mistral (Jiang et al. 2023) in Hugging Face layout: Llama with a sliding window over the last
``sliding_window`` keys in every layer (its rolling KV cache stays that long). See :mod:`toolkit.hf.llama`."""
from __future__ import annotations

from .llama import _COMMON, Family

# transformers' MistralConfig defaults: note sliding_window 4096 when absent (null: full attention)
MISTRAL = Family("mistral", "MistralForCausalLM",
                 {**_COMMON, "num_key_value_heads": 8, "max_position_embeddings": 4096 * 32, "sliding_window": 4096},
                 window=True)
