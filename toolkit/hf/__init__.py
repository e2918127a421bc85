"""Hugging Face checkpoint folders in and out, from local files only (nothing is downloaded).

``load_gpt2(dir)`` / ``save_gpt2(model, dir)`` for GPT-2 (GPT2LMHeadModel layout), and
``load_llama(dir)`` for Llama (LlamaForCausalLM layout, into rmsnorm + rope + swiglu + gqa).
"""
from .common import HFFormatError, read_config, read_state_dict
from .gpt2 import gpt2_config_from_hf, hf_config_from_gpt2, load_gpt2, save_gpt2
from .llama import llama_config_from_hf, load_llama

__all__ = [
    "HFFormatError", "gpt2_config_from_hf", "hf_config_from_gpt2", "llama_config_from_hf", "load_gpt2",
    "load_llama", "read_config", "read_state_dict", "save_gpt2",
]
