"""Built-in tokenizers (toolkit.tokenizer): characters, as nanoGPT's shakespeare_char, and GPT-2's BPE."""
from toolkit.hookspecs import hookimpl
from toolkit.tokenizer import CharTokenizer, GPT2Tokenizer


@hookimpl
def register_tokenizers(register):
    register("char", CharTokenizer)
    register("gpt2", GPT2Tokenizer)
