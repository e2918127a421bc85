"""Built-in Hugging Face architectures (toolkit.hf): each an adapter registered under its config.json
``model_type``, as a plugin registers its own (see toolkit/hf/adapter.py). They are registered by name,
so listing them imports neither toolkit.hf nor torch."""
from toolkit.hookspecs import hookimpl
from toolkit.registry import NoOptions

#: (model_type, adapter, its description): each adapter's model_type and the first line of its docstring
ADAPTERS = (
    ("gpt2", "toolkit.hf.gpt2:GPT2Adapter",
     "GPT-2 (Radford et al. 2019): mha + layernorm + learned positions + a GELU MLP, pre-norm, with biases."),
    ("llama", "toolkit.hf.llama:LlamaAdapter",
     "Llama (Touvron et al. 2023): rmsnorm + rope (plain or scaled) + swiglu + gqa, pre-norm, no biases."),
    ("mistral", "toolkit.hf.llama:MistralAdapter",
     "Mistral (Jiang et al. 2023): Llama with a sliding window over the last `sliding_window` keys in every layer."),
    ("mixtral", "toolkit.hf.llama:MixtralAdapter",
     "Mixtral (Jiang et al. 2024): Mistral with a sparse MoE MLP of SwiGLU experts in every layer."),
    ("qwen3", "toolkit.hf.llama:Qwen3Adapter",
     "Qwen 3 (Qwen Team 2025): Llama with a per-head RMSNorm on queries and keys before RoPE, head_dim its own."),
    ("gemma2", "toolkit.hf.gemma2:Gemma2Adapter",
     "Gemma 2 (Gemma Team 2024): sandwich norms, GeGLU, soft-capped logits, local and global attention in turn."),
    ("olmo2", "toolkit.hf.olmo2:Olmo2Adapter",
     "OLMo 2 (OLMo et al. 2024): norms after each sublayer, QK-norm over all heads, SwiGLU, RoPE, no biases."),
    ("gpt_neox", "toolkit.hf.gpt_neox:GPTNeoXAdapter",
     "GPT-NeoX and Pythia (Black et al. 2022): partial rotary, LayerNorm and biases, a parallel residual."),
)


@hookimpl
def register_architectures(register):
    for model_type, adapter, doc in ADAPTERS:
        register(model_type, adapter, NoOptions, doc=doc)
