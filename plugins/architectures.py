"""Built-in Hugging Face architectures (toolkit.hf): each an adapter registered under its config.json
``model_type``, as a plugin registers its own (see toolkit/hf/adapter.py)."""
from toolkit.hf.gemma2 import Gemma2Adapter
from toolkit.hf.gpt2 import GPT2Adapter
from toolkit.hf.gpt_neox import GPTNeoXAdapter
from toolkit.hf.llama import LlamaAdapter, MistralAdapter, MixtralAdapter, Qwen3Adapter
from toolkit.hf.olmo2 import Olmo2Adapter
from toolkit.hookspecs import hookimpl


@hookimpl
def register_architectures(register):
    for adapter in (GPT2Adapter, LlamaAdapter, MistralAdapter, MixtralAdapter, Qwen3Adapter, Gemma2Adapter,
                    Olmo2Adapter, GPTNeoXAdapter):
        register(adapter.model_type, adapter)
