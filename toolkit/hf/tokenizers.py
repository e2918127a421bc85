"""A Hugging Face folder's tokenizer, both ways: what :class:`~toolkit.hf.Adapter` reads and writes by default.

Reading takes ``tokenizer.json`` (or GPT-2's own ``vocab.json`` + ``merges.txt``); writing gives what
transformers' ``AutoTokenizer`` loads, with the bos/eos ids config.json should carry.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from .. import safeio
from ..tokenizer import (ASSETS, CharTokenizer, GPT2Tokenizer, HFTokenizer, Tokenizer, is_gpt2_bpe,
                         read_hf_tokenizer)
from .common import CONFIG


def hf_tokenizer(folder: str | Path) -> Tokenizer | None:
    """The tokenizer of a Hugging Face folder (tiktoken's gpt2 for GPT-2's own files), or None if it has none.

    The end-of-text id (which separates documents) is the model's eos_token_id, from config.json or
    generation_config.json, else the tokenizer_config.json's eos_token.
    """
    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file() and is_gpt2_bpe(folder):
        return GPT2Tokenizer()
    d = read_hf_tokenizer(folder)
    if d is None:
        return None
    tok = HFTokenizer.from_json(d)
    tok.eot = _eos_id(folder, tok)
    return tok


def _eos_id(folder: Path, tok: HFTokenizer) -> int | None:
    for name in (CONFIG, "generation_config.json"):
        try:
            eos = safeio.read_json(folder / name).get("eos_token_id") if (folder / name).exists() else None
        except (safeio.BadContent, AttributeError):
            eos = None
        if isinstance(eos, list):  # Llama 3 instruct lists several; the first ends a document
            eos = eos[0] if eos else None
        if isinstance(eos, int) and 0 <= eos < tok.vocab_size:
            return eos
    if not (folder / "tokenizer_config.json").exists():
        return None
    try:
        config = safeio.read_json(folder / "tokenizer_config.json")
    except safeio.BadContent:
        return None
    eos = config.get("eos_token") if isinstance(config, dict) else None
    eos = eos.get("content") if isinstance(eos, dict) else eos
    return tok.fast.token_to_id(eos) if isinstance(eos, str) else None


def write_tokenizer_files(tokenizer: Tokenizer, out: Path, max_len: int) -> dict:
    """Write the tokenizer as transformers reads it; returns the config.json keys it sets (bos/eos ids)."""
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(tokenizer, GPT2Tokenizer):
        shutil.copyfile(ASSETS / "gpt2" / "encoder.json", out / "vocab.json")
        shutil.copyfile(ASSETS / "gpt2" / "vocab.bpe", out / "merges.txt")
        eot = "<|endoftext|>"
        _write_json(out / "tokenizer_config.json", {"tokenizer_class": "GPT2Tokenizer", "bos_token": eot,
                                                    "eos_token": eot, "unk_token": eot, "model_max_length": max_len})
        return {"bos_token_id": tokenizer.eot, "eos_token_id": tokenizer.eot}
    if isinstance(tokenizer, CharTokenizer):
        tokenizer = HFTokenizer.from_json(char_tokenizer_json(tokenizer))
    if not isinstance(tokenizer, HFTokenizer):
        print(f"note: the {tokenizer.name} tokenizer has no Hugging Face form; {out} has no tokenizer files")
        return {}
    (out / "tokenizer.json").write_text(json.dumps(tokenizer.json, ensure_ascii=False) + "\n", encoding="utf-8")
    token = tokenizer.fast.id_to_token
    _write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len, "clean_up_tokenization_spaces": False,
        "bos_token": token(tokenizer.bos) if tokenizer.bos is not None else None,
        "eos_token": token(tokenizer.eot) if tokenizer.eot is not None else None})
    return {"bos_token_id": tokenizer.bos, "eos_token_id": tokenizer.eot}


def char_tokenizer_json(tokenizer: CharTokenizer) -> dict:
    """A character vocabulary as a `tokenizers` tokenizer.json: BPE with no merges (one token per character)."""
    from tokenizers import Tokenizer as Fast
    from tokenizers import decoders, models

    fast = Fast(models.BPE(vocab={c: i for i, c in enumerate(tokenizer.chars)}, merges=[]))
    fast.decoder = decoders.Fuse()  # characters back to back, not joined with spaces
    return json.loads(fast.to_str())


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
