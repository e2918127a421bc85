"""Built-in tokenizers (toolkit.tokenizer): characters, as nanoGPT's shakespeare_char, GPT-2's BPE, and any
Hugging Face tokenizer.json through the `tokenizers` library (the `hf` extra)."""
from toolkit.hookspecs import hookimpl
from toolkit.tokenizer import CharTokenizer, GPT2Tokenizer, HFTokenizer


@hookimpl
def register_tokenizers(register):
    register("char", CharTokenizer)
    register("gpt2", GPT2Tokenizer)
    register("hf", HFTokenizer)
