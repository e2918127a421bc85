"""Tokenizers: characters (nanoGPT's shakespeare_char) and GPT-2 BPE (tiktoken, built offline).

Tokenizers are a registered family (``register_tokenizers``; the built-ins register in
``plugins/tokenizers.py``): a recipe's ``data.tokenizer`` names one, and its factory is called as
``factory(options, corpus)``, with the training text as ``corpus`` when the class sets
``needs_corpus`` (a character vocabulary is the corpus's characters) and None otherwise.

A tokenizer is saved as ``tokenizer.json`` next to the prepared data and in every run, so a run
can be decoded without the corpus: ``{"type": "char", "chars": "..."}`` or ``{"type": "gpt2"}``,
``type`` being its registered name; :func:`tokenizer_from_dict` finds the class in a registry and
calls its ``from_dict``. The GPT-2 encoding is built from the BPE files shipped in
``toolkit/assets/gpt2`` and never touches the network.
"""
from __future__ import annotations

import abc
import functools
import hashlib
import json
import os
import threading
from pathlib import Path
from typing import ClassVar

import attrs
import numpy as np

from . import safeio
from .errors import UnknownComponentError
from .registry import NoOptions

ASSETS = Path(__file__).resolve().parent / "assets"
GPT2_FILES = {  # the hashes tiktoken's own "gpt2" encoding expects (see assets/README.md)
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
# the char tokenizer has no end-of-text token: documents are joined with a blank line instead
CHAR_DOC_SEPARATOR = "\n\n"


class Tokenizer(abc.ABC):
    """Text <-> token ids; ``eot`` is the end-of-text id that separates documents, or None."""

    name: str  # its registered name: the "type" of tokenizer.json
    vocab_size: int
    eot: int | None
    #: built from the training text (factory(opts, corpus) gets it), which is then encoded whole
    needs_corpus: ClassVar[bool] = False
    #: the vocabulary size when it does not depend on the data (checked against model.vocab_size)
    fixed_vocab_size: ClassVar[int | None] = None

    @classmethod
    @abc.abstractmethod
    def from_dict(cls, d: dict) -> Tokenizer:
        """The tokenizer ``to_dict`` describes (ValueError if it cannot be)."""

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``."""

    @abc.abstractmethod
    def decode(self, ids) -> str:
        """The text of token ids ``ids``."""

    @abc.abstractmethod
    def to_dict(self) -> dict:
        """What ``tokenizer.json`` holds."""

    def encode_corpus(self, text: str) -> np.ndarray:
        """All of ``text`` as uint16 ids (a tokenizer with ``needs_corpus`` may do it faster)."""
        return np.array(self.encode(text), dtype=np.uint16)

    @classmethod
    def check_recipe(cls, opts, recipe) -> list[str]:
        """A vocabulary that does not depend on the data must fit the model's."""
        vocab = cls.fixed_vocab_size
        if vocab is not None and recipe.model.vocab_size < vocab:
            return [f"$.model.vocab_size: the {recipe.data.tokenizer.kind} tokenizer has {vocab} tokens, got vocab_size "
                    f"{recipe.model.vocab_size}" + (" (GPT-2 pads it to 50304)" if vocab == 50257 else "")]
        return []

    def save(self, directory: str | Path) -> Path:
        """Write ``tokenizer.json`` into ``directory`` (created if needed); returns its path."""
        path = Path(directory) / "tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        return safeio.write_atomically(path, json.dumps(self.to_dict(), ensure_ascii=False) + "\n")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, eot={self.eot})"


class CharTokenizer(Tokenizer):
    """One token per character; the vocabulary is the sorted set of the corpus's characters."""

    Options = NoOptions
    name = "char"
    eot = None
    needs_corpus = True

    def __init__(self, opts: NoOptions, corpus: str | None):
        if corpus is None:
            raise ValueError("the char tokenizer needs the corpus to build its vocabulary")
        self._set_chars("".join(sorted(set(corpus))))

    def _set_chars(self, chars: str) -> None:
        if len(set(chars)) != len(chars):
            raise ValueError("char tokenizer: the vocabulary has repeated characters")
        self.chars = "".join(sorted(chars))
        self.vocab_size = len(self.chars)
        self._stoi = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls(NoOptions(), text)

    @classmethod
    def from_chars(cls, chars: str) -> CharTokenizer:
        tok = cls.__new__(cls)
        tok._set_chars(chars)
        return tok

    @classmethod
    def from_dict(cls, d: dict) -> CharTokenizer:
        chars = d.get("chars")
        if not isinstance(chars, str) or not chars:
            raise ValueError('a char tokenizer needs a non-empty "chars" string')
        return cls.from_chars(chars)

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

    def encode_corpus(self, text: str) -> np.ndarray:
        """The whole text as ids, vectorised (the vocabulary is sorted by code point)."""
        if self.vocab_size > 65536:
            raise ValueError(f"the char vocabulary has {self.vocab_size} characters; uint16 shards hold at most 65536")
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        table = np.array([ord(c) for c in self.chars], dtype=np.uint32)
        return np.searchsorted(table, codes).astype(np.uint16)

    def to_dict(self) -> dict:
        return {"type": "char", "chars": self.chars}


class GPT2Tokenizer(Tokenizer):
    """OpenAI's GPT-2 BPE (50257 tokens, ``<|endoftext|>`` = 50256) through tiktoken, offline."""

    Options = NoOptions
    name = "gpt2"
    vocab_size = fixed_vocab_size = 50257  # 50,000 merges + 256 byte tokens + <|endoftext|>
    eot = 50256

    def __init__(self, opts: NoOptions | None = None, corpus: str | None = None):
        self.encoding = gpt2_encoding()

    @classmethod
    def from_dict(cls, d: dict) -> GPT2Tokenizer:
        return cls()

    @classmethod
    def from_files(cls, encoder_json: str | Path, vocab_bpe: str | Path) -> GPT2Tokenizer:
        """GPT-2's BPE from a pair of files of its format: OpenAI's encoder.json and vocab.bpe, or a
        Hugging Face GPT-2 folder's vocab.json and merges.txt (ValueError if they are not GPT-2 BPE)."""
        tok = cls.__new__(cls)
        tok.encoding = _bpe_encoding(str(encoder_json), str(vocab_bpe))
        return tok

    def encode(self, text: str) -> list[int]:
        # ordinary: a literal "<|endoftext|>" in user text is text, not the document separator
        return self.encoding.encode_ordinary(text)

    def decode(self, ids) -> str:
        return self.encoding.decode([int(i) for i in ids])

    def to_dict(self) -> dict:
        return {"type": "gpt2"}


@attrs.frozen
class HFTokenizerOptions:
    # a Hugging Face tokenizer.json (as the `tokenizers` library and save_pretrained write it), a folder
    # holding one, or a run's tokenizer.json of type "hf"; relative to the working directory
    path: str = attrs.field(default="", validator=attrs.validators.instance_of(str))
    # the token that separates documents, by its text (e.g. "</s>", "<|endoftext|>"); "": the eos_token of
    # a tokenizer_config.json beside the file, else none
    eot: str = ""


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer.json through the `tokenizers` library (pip install 'playattention[hf]')."""

    Options = HFTokenizerOptions
    name = "hf"

    def __init__(self, opts: HFTokenizerOptions, corpus: str | None = None):
        if not opts.path:
            raise ValueError('the hf tokenizer needs a path (data.tokenizer = {kind = "hf", path = "tokenizer.json"})')
        path = Path(opts.path)
        if path.is_file() and path.name == "tokenizer.json":
            d = _read_json_file(path)
            if isinstance(d, dict) and d.get("type") == "hf":  # a run's tokenizer.json: ids as recorded
                self._setup(d.get("tokenizer"), eot=d.get("eot"))
                self.bos = d.get("bos", self.bos)
                if opts.eot:
                    self.eot = self._token_id(opts.eot, path)
                return
        d = read_hf_tokenizer(path)
        if d is None:
            raise FileNotFoundError(f"{path}: no tokenizer.json (nor vocab.json + merges.txt) there")
        self._setup(d, eot=None)
        eot = opts.eot or _eos_beside(path if path.is_dir() else path.parent)
        if eot:
            self.eot = self._token_id(eot, path)

    def _setup(self, tokenizer_json, eot: int | None) -> None:
        try:
            from tokenizers import Tokenizer as Fast
        except ImportError:
            raise ValueError("the hf tokenizer needs the `tokenizers` package: pip install 'playattention[hf]'") from None
        if not isinstance(tokenizer_json, dict):
            raise ValueError("an hf tokenizer needs the tokenizer.json object of the `tokenizers` library")
        self.json = tokenizer_json
        try:
            self.fast = Fast.from_str(json.dumps(tokenizer_json))
        except Exception as exc:  # noqa: BLE001 - the tokenizers library's own parse errors
            raise ValueError(f"not a tokenizers tokenizer.json ({str(exc).splitlines()[0]})") from None
        self.vocab_size = self.fast.get_vocab_size(with_added_tokens=True)
        self.eot = eot
        # what the tokenizer puts before a text by itself (Llama's <s>): prompts start with it, as transformers'
        self.bos = self._prefix()

    def _prefix(self) -> int | None:
        plain = self.fast.encode("a", add_special_tokens=False).ids
        full = self.fast.encode("a", add_special_tokens=True).ids
        for start in range(len(full) - len(plain) + 1):
            if full[start:start + len(plain)] == plain:
                return full[start - 1] if start >= 1 else None
        return None

    def _token_id(self, token: str, where) -> int:
        found = self.fast.token_to_id(token)
        if found is None:
            raise ValueError(f"{where}: eot token {token!r} is not in the vocabulary")
        return found

    @classmethod
    def from_dict(cls, d: dict) -> HFTokenizer:
        tok = cls.__new__(cls)
        tok._setup(d.get("tokenizer"), eot=d.get("eot"))
        if "bos" in d:  # as recorded (null: none)
            tok.bos = d["bos"]
        return tok

    @classmethod
    def from_json(cls, tokenizer_json: dict, eot: int | None = None) -> HFTokenizer:
        """The tokenizer of a tokenizer.json object, with the end-of-text id ``eot``."""
        tok = cls.__new__(cls)
        tok._setup(tokenizer_json, eot=eot)
        return tok

    def encode(self, text: str) -> list[int]:
        # the text alone, no special tokens: documents are joined with eot, prompts get bos (generate)
        return self.fast.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.fast.decode([int(i) for i in ids], skip_special_tokens=False)

    def to_dict(self) -> dict:
        return {"type": "hf", "eot": self.eot, "bos": self.bos, "tokenizer": self.json}


def read_hf_tokenizer(path: str | Path) -> dict | None:
    """The tokenizer.json object of a Hugging Face folder (or that file), or None if there is none.

    A folder with only GPT-2-style ``vocab.json`` + ``merges.txt`` gets the byte-level BPE that
    transformers' GPT2TokenizerFast builds from them.
    """
    path = Path(path)
    if path.is_file():
        return _read_json_file(path)
    if (path / "tokenizer.json").exists() or (path / "tokenizer.json").is_symlink():  # a FIFO too: refused by name
        return _read_json_file(path / "tokenizer.json")
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        for name in ("vocab.json", "merges.txt"):  # read by the tokenizers library: regular files only
            safeio.open_regular(path / name).close()
        try:
            from tokenizers import ByteLevelBPETokenizer
        except ImportError:
            raise ValueError("reading vocab.json + merges.txt needs the `tokenizers` package: "
                             "pip install 'playattention[hf]'") from None
        bpe = ByteLevelBPETokenizer(str(path / "vocab.json"), str(path / "merges.txt"))
        return json.loads(bpe._tokenizer.to_str())
    return None


def is_gpt2_bpe(folder: str | Path) -> bool:
    """Whether a folder's vocab.json + merges.txt are GPT-2's own (then the tiktoken ``gpt2`` tokenizer reads it)."""
    folder = Path(folder)
    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    if not (vocab.is_file() and merges.is_file()):
        return False
    try:
        same_vocab = safeio.read_json(vocab, limit=None) == json.loads(
            (ASSETS / "gpt2" / "encoder.json").read_text(encoding="utf-8"))
        theirs = safeio.read_text(merges, limit=None).split("\n")
    except safeio.BadContent:
        return False
    ours = (ASSETS / "gpt2" / "vocab.bpe").read_text(encoding="utf-8").split("\n")
    return same_vocab and [ln for ln in theirs if ln.strip()] == [ln for ln in ours if ln.strip()]


def _read_json_file(path: Path):
    return safeio.read_json(path, limit=None)  # a tokenizer has no natural bound (Gemma's is 33 MB)


def _eos_beside(folder: Path) -> str:
    """The eos_token of a folder's tokenizer_config.json (save_pretrained's layout), or ""."""
    config = folder / "tokenizer_config.json"
    try:
        eos = safeio.read_json(config).get("eos_token") if config.exists() else None
    except (safeio.BadContent, AttributeError):
        return ""
    if isinstance(eos, dict):  # an AddedToken written out
        eos = eos.get("content")
    return eos if isinstance(eos, str) else ""


_no_cache_lock = threading.Lock()


@functools.lru_cache(maxsize=None)
def gpt2_encoding():
    """tiktoken's GPT-2 encoding, built from the shipped BPE files after checking their hashes."""
    paths = {}
    for name, expected in GPT2_FILES.items():
        path = ASSETS / "gpt2" / name
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != expected:
            raise ValueError(f"{path}: sha256 {digest}, expected {expected} (a damaged install?)")
        paths[name] = str(path)
    return _bpe_encoding(paths["encoder.json"], paths["vocab.bpe"])


def _bpe_encoding(encoder_json: str, vocab_bpe: str):
    """A GPT-2 BPE tiktoken encoding from its two files, read from disk and nowhere else."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str  # a constant; importing fetches nothing

    # tiktoken copies even local files into a temp-dir cache keyed by path unless its cache dir is
    # "" (then it just reads them): they are local files, so switch the cache off
    with _no_cache_lock:
        saved = os.environ.get("TIKTOKEN_CACHE_DIR")
        os.environ["TIKTOKEN_CACHE_DIR"] = ""
        try:
            ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=vocab_bpe, encoder_json_file=encoder_json)
        except (AssertionError, ValueError, KeyError, OSError) as exc:
            raise ValueError(f"{encoder_json}, {vocab_bpe}: not a GPT-2 BPE vocabulary and merges pair "
                             f"({type(exc).__name__}: {exc})") from None
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


def tokenizer_from_dict(d: dict, registry) -> Tokenizer:
    """The tokenizer a ``tokenizer.json`` describes, by its registered ``type``."""
    kind = d.get("type") if isinstance(d, dict) else None
    try:
        cls = registry.get("tokenizer", kind).factory
    except UnknownComponentError as exc:
        raise ValueError(f"unknown tokenizer type {kind!r} (registered: {', '.join(exc.known)})") from None
    return cls.from_dict(d)


def load_tokenizer(path: str | Path, registry) -> Tokenizer:
    """Read ``tokenizer.json`` from a directory (a prepared dataset or a run), or that file itself."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.exists() and not path.is_symlink():
        raise FileNotFoundError(f"{path}: no such tokenizer file")
    d = safeio.read_json(path, limit=None)
    try:
        return tokenizer_from_dict(d, registry)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
