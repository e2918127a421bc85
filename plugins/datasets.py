"""Built-in datasets: text that ships inside the package, chosen by ``data.dataset`` when ``data.paths`` is empty."""
from toolkit.hookspecs import hookimpl
from toolkit.tokenizer import ASSETS


def tinyshakespeare(opts):
    """Tiny Shakespeare: 1.1M characters, the corpus of nanoGPT's shakespeare_char (karpathy/char-rnn)."""
    return [ASSETS / "tinyshakespeare.txt"]


@hookimpl
def register_datasets(register):
    register("tinyshakespeare", tinyshakespeare)
