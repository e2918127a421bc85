"""Hugging Face checkpoint folders in and out, from local files only (nothing is downloaded).

``load_gpt2(dir)`` / ``save_gpt2(model, dir)`` for GPT-2 (GPT2LMHeadModel layout),
``load_llama(dir)`` for Llama (LlamaForCausalLM layout, into rmsnorm + rope + swiglu + gqa), and
``load_gemma2`` / ``save_gemma2``, ``load_olmo2`` / ``save_olmo2``, ``load_gpt_neox`` / ``save_gpt_neox``
for Gemma 2, OLMo 2 and GPT-NeoX / Pythia (docs/hf.md says which parts each becomes).
"""
from .common import HFFormatError, read_config, read_state_dict
from .gemma2 import gemma2_config_from_hf, hf_config_from_gemma2, load_gemma2, save_gemma2
from .gpt2 import gpt2_config_from_hf, hf_config_from_gpt2, load_gpt2, save_gpt2
from .gpt_neox import gpt_neox_config_from_hf, hf_config_from_gpt_neox, load_gpt_neox, save_gpt_neox
from .llama import llama_config_from_hf, load_llama
from .olmo2 import hf_config_from_olmo2, load_olmo2, olmo2_config_from_hf, save_olmo2

__all__ = [
    "HFFormatError", "gemma2_config_from_hf", "gpt2_config_from_hf", "gpt_neox_config_from_hf",
    "hf_config_from_gemma2", "hf_config_from_gpt2", "hf_config_from_gpt_neox", "hf_config_from_olmo2",
    "llama_config_from_hf", "load_gemma2", "load_gpt2", "load_gpt_neox", "load_llama", "load_olmo2",
    "olmo2_config_from_hf", "read_config", "read_state_dict", "save_gemma2", "save_gpt2", "save_gpt_neox", "save_olmo2",
]
