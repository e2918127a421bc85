"""Tokenizers: characters (nanoGPT's shakespeare_char) and GPT-2 BPE (tiktoken, built offline).

A tokenizer is saved as ``tokenizer.json`` next to the prepared data and in every run, so a run
can be decoded without the corpus: ``{"type": "char", "chars": "..."}`` or ``{"type": "gpt2"}``.
The GPT-2 encoding is built from the BPE files shipped in ``toolkit/assets/gpt2`` and never
touches the network.
"""
from __future__ import annotations

import abc
import functools
import hashlib
import json
import os
import threading
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
GPT2_FILES = {  # the hashes tiktoken's own "gpt2" encoding expects (see assets/README.md)
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
TOKENIZERS = ("char", "gpt2")
# the char tokenizer has no end-of-text token: documents are joined with a blank line instead
CHAR_DOC_SEPARATOR = "\n\n"


class Tokenizer(abc.ABC):
    """Text <-> token ids; ``eot`` is the end-of-text id that separates documents, or None."""

    name: str
    vocab_size: int
    eot: int | None

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``."""

    @abc.abstractmethod
    def decode(self, ids) -> str:
        """The text of token ids ``ids``."""

    @abc.abstractmethod
    def to_dict(self) -> dict:
        """What ``tokenizer.json`` holds."""

    def save(self, directory: str | Path) -> Path:
        """Write ``tokenizer.json`` into ``directory`` (created if needed); returns its path."""
        path = Path(directory) / "tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return path

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, eot={self.eot})"


class CharTokenizer(Tokenizer):
    """One token per character; the vocabulary is the sorted set of the corpus's characters."""

    name = "char"
    eot = None

    def __init__(self, chars: str):
        if len(set(chars)) != len(chars):
            raise ValueError("char tokenizer: the vocabulary has repeated characters")
        self.chars = "".join(sorted(chars))
        self.vocab_size = len(self.chars)
        self._stoi = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls("".join(sorted(set(text))))

    def encode(self, text: str) -> list[int]:
        try:
            return [self._stoi[c] for c in text]
        except KeyError as exc:
            raise ValueError(
                f"character {exc.args[0]!r} is not in the char tokenizer's vocabulary "
                f"({self.vocab_size} characters of the training corpus)"
            ) from None

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def to_dict(self) -> dict:
        return {"type": "char", "chars": self.chars}


class GPT2Tokenizer(Tokenizer):
    """OpenAI's GPT-2 BPE (50257 tokens, ``<|endoftext|>`` = 50256) through tiktoken, offline."""

    name = "gpt2"
    vocab_size = 50257
    eot = 50256

    def __init__(self):
        self.encoding = gpt2_encoding()

    def encode(self, text: str) -> list[int]:
        # ordinary: a literal "<|endoftext|>" in user text is text, not the document separator
        return self.encoding.encode_ordinary(text)

    def decode(self, ids) -> str:
        return self.encoding.decode([int(i) for i in ids])

    def to_dict(self) -> dict:
        return {"type": "gpt2"}


_no_cache_lock = threading.Lock()


@functools.lru_cache(maxsize=None)
def gpt2_encoding():
    """tiktoken's GPT-2 encoding, built from the shipped BPE files after checking their hashes."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str  # a constant; importing fetches nothing

    paths = {}
    for name, expected in GPT2_FILES.items():
        path = ASSETS / "gpt2" / name
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != expected:
            raise ValueError(f"{path}: sha256 {digest}, expected {expected} (a damaged install?)")
        paths[name] = str(path)
    # tiktoken copies even local files into a temp-dir cache keyed by path unless its cache dir is
    # "" (then it just reads them); the hashes were checked above, so switch the cache off
    with _no_cache_lock:
        saved = os.environ.get("TIKTOKEN_CACHE_DIR")
        os.environ["TIKTOKEN_CACHE_DIR"] = ""
        try:
            ranks = data_gym_to_mergeable_bpe_ranks(
                vocab_bpe_file=paths["vocab.bpe"], encoder_json_file=paths["encoder.json"]
            )
        finally:
            if saved is None:
                del os.environ["TIKTOKEN_CACHE_DIR"]
            else:
                os.environ["TIKTOKEN_CACHE_DIR"] = saved
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": GPT2Tokenizer.eot},
        explicit_n_vocab=GPT2Tokenizer.vocab_size,
    )


def build_tokenizer(name: str, corpus_text: str | None = None) -> Tokenizer:
    """A tokenizer by name; ``char`` builds its vocabulary from ``corpus_text``."""
    if name == "gpt2":
        return GPT2Tokenizer()
    if name == "char":
        if corpus_text is None:
            raise ValueError("the char tokenizer needs corpus_text to build its vocabulary")
        return CharTokenizer.from_text(corpus_text)
    raise ValueError(f"unknown tokenizer {name!r} (known: {', '.join(TOKENIZERS)})")


def tokenizer_from_dict(d: dict) -> Tokenizer:
    """The tokenizer a ``tokenizer.json`` describes."""
    kind = d.get("type") if isinstance(d, dict) else None
    if kind == "gpt2":
        return GPT2Tokenizer()
    if kind == "char":
        chars = d.get("chars")
        if not isinstance(chars, str) or not chars:
            raise ValueError('a char tokenizer needs a non-empty "chars" string')
        return CharTokenizer(chars)
    raise ValueError(f"unknown tokenizer type {kind!r} (known: {', '.join(TOKENIZERS)})")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Read ``tokenizer.json`` from a directory (a prepared dataset or a run), or that file itself."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such tokenizer file")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
        return tokenizer_from_dict(d)
    except (json.JSONDecodeError, ValueError) as exc:
        raise ValueError(f"{path}: {exc}") from None
