"""Tokenizers: GPT-2 BPE built offline from the shipped files, and the char vocabulary."""
import json
import socket

import pytest

from toolkit import tokenizer as tk
from toolkit.converter import resolve_specs
from toolkit.data import prepare
from toolkit.errors import DataError, UnknownComponentError
from toolkit.families import SPEC_TYPES
from toolkit.plugin_manager import default_registry
from toolkit.recipe import DataConfig
from toolkit.registry import NoOptions
from toolkit.tokenizer import ASSETS, CharTokenizer, GPT2Tokenizer, HFTokenizer, HFTokenizerOptions, load_tokenizer


def build_tokenizer(name, corpus=None):
    """A registered tokenizer by name, as a recipe's data.tokenizer builds it."""
    return default_registry().build(SPEC_TYPES["tokenizer"](name), corpus)

SHAKESPEARE = (ASSETS / "tinyshakespeare.txt").read_text(encoding="utf-8")
PARAGRAPH = SHAKESPEARE[:1500]  # "First Citizen:\nBefore we proceed any further, hear me speak. ..."


@pytest.fixture(scope="module")
def gpt2():
    return build_tokenizer("gpt2")


def test_gpt2_encodes_hello_world_like_openai(gpt2):
    assert gpt2.encode("Hello world") == [15496, 995]
    assert (gpt2.name, gpt2.vocab_size, gpt2.eot) == ("gpt2", 50257, 50256)
    assert gpt2.decode([50256]) == "<|endoftext|>"


def test_gpt2_treats_endoftext_in_user_text_as_text(gpt2):
    ids = gpt2.encode("a<|endoftext|>b")
    assert 50256 not in ids
    assert gpt2.decode(ids) == "a<|endoftext|>b"


def test_gpt2_round_trips_a_shakespeare_paragraph(gpt2):
    ids = gpt2.encode(PARAGRAPH)
    assert len(ids) < len(PARAGRAPH) / 3  # BPE merges, not bytes
    assert gpt2.decode(ids) == PARAGRAPH


def test_gpt2_matches_huggingface_bpe_on_shakespeare(gpt2):
    tokenizers = pytest.importorskip("tokenizers")
    # an independent implementation of the same files
    hf = tokenizers.ByteLevelBPETokenizer(str(ASSETS / "gpt2" / "encoder.json"), str(ASSETS / "gpt2" / "vocab.bpe"))
    text = SHAKESPEARE[:20000] + " naïve café — 1234 tokens\t\t  spaced\n\n\nout "
    assert gpt2.encode(text) == hf.encode(text).ids


def test_gpt2_is_tiktokens_own_gpt2_definition(monkeypatch, tmp_path, gpt2):
    """tiktoken's registered constructor (its URLs served from our files) gives the same encoding."""
    import tiktoken.load
    from tiktoken_ext import openai_public

    files = {"vocab.bpe": (ASSETS / "gpt2" / "vocab.bpe").read_bytes(),
             "encoder.json": (ASSETS / "gpt2" / "encoder.json").read_bytes()}
    monkeypatch.setattr(tiktoken.load, "read_file", lambda url: files[url.rsplit("/", 1)[1]])
    # a cache dir of its own: tiktoken checks the expected hashes on the way into its cache
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    ref = openai_public.gpt2()
    assert ref["pat_str"] == gpt2.encoding._pat_str
    assert ref["special_tokens"] == {"<|endoftext|>": gpt2.eot}
    assert ref["explicit_n_vocab"] == gpt2.vocab_size
    assert ref["mergeable_ranks"] == gpt2.encoding._mergeable_ranks


def test_gpt2_is_built_without_network_or_cache(monkeypatch, tmp_path):
    import tiktoken.load

    def no_network(*args, **kwargs):
        raise AssertionError("the GPT-2 tokenizer tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    read = tiktoken.load.read_file
    opened = []

    def local_only(path):
        assert "://" not in path, f"tiktoken asked to fetch {path}"
        opened.append(path)
        return read(path)

    monkeypatch.setattr(tiktoken.load, "read_file", local_only)
    cache = tmp_path / "cache"
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    tk.gpt2_encoding.cache_clear()
    try:
        tok = build_tokenizer("gpt2")
        assert tok.encode("Hello world") == [15496, 995]
    finally:
        tk.gpt2_encoding.cache_clear()
    assert sorted(opened) == sorted(str(ASSETS / "gpt2" / n) for n in ("encoder.json", "vocab.bpe"))
    assert not cache.exists()  # nothing copied into tiktoken's cache
    import os

    assert os.environ["TIKTOKEN_CACHE_DIR"] == str(cache)  # and the caller's setting is restored


def test_gpt2_refuses_damaged_bpe_files(monkeypatch, tmp_path):
    (tmp_path / "gpt2").mkdir()
    for name in ("vocab.bpe", "encoder.json"):
        (tmp_path / "gpt2" / name).write_bytes((ASSETS / "gpt2" / name).read_bytes())
    (tmp_path / "gpt2" / "vocab.bpe").write_text("#version: 0.2\n")
    monkeypatch.setattr(tk, "ASSETS", tmp_path)
    tk.gpt2_encoding.cache_clear()
    try:
        with pytest.raises(ValueError, match="vocab.bpe: sha256 .* expected 1ce16647"):
            tk.gpt2_encoding()
    finally:
        tk.gpt2_encoding.cache_clear()


def test_char_vocabulary_of_tiny_shakespeare_has_65_characters():
    tok = build_tokenizer("char", SHAKESPEARE)
    assert tok.vocab_size == 65 and tok.eot is None
    assert tok.chars[:2] == "\n " and tok.chars.endswith("xyz")
    ids = tok.encode(PARAGRAPH)
    assert len(ids) == len(PARAGRAPH) and max(ids) < 65
    assert tok.decode(ids) == PARAGRAPH


def test_char_refuses_characters_outside_its_vocabulary():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(ValueError, match="'z' is not in the char tokenizer's vocabulary"):
        tok.encode("abz")


def test_char_needs_a_corpus_and_unknown_names_are_refused():
    with pytest.raises(ValueError, match="needs the corpus"):
        CharTokenizer(NoOptions(), None)
    with pytest.raises(UnknownComponentError, match="unknown tokenizer 'bpe' \\(registered: char, gpt2, hf\\)"):
        build_tokenizer("bpe")
    assert GPT2Tokenizer.needs_corpus is False and CharTokenizer.needs_corpus is True


@pytest.mark.parametrize("name", ["char", "gpt2"])
def test_saved_tokenizer_loads_back_identical(tmp_path, name):
    tok = build_tokenizer(name, "To be, or not to be: ünïcode!")
    path = tok.save(tmp_path / "run")
    assert path == tmp_path / "run" / "tokenizer.json"
    assert json.loads(path.read_text(encoding="utf-8"))["type"] == name
    for where in (tmp_path / "run", path):
        back = load_tokenizer(where, default_registry())
        assert (back.name, back.vocab_size, back.eot) == (tok.name, tok.vocab_size, tok.eot)
        assert back.encode("not to be: ü") == tok.encode("not to be: ü")


def test_load_tokenizer_names_the_file_on_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such tokenizer file"):
        load_tokenizer(tmp_path, default_registry())
    (tmp_path / "tokenizer.json").write_text('{"type": "sentencepiece"}')
    with pytest.raises(ValueError, match="tokenizer.json: unknown tokenizer type 'sentencepiece'"):
        load_tokenizer(tmp_path, default_registry())


# -- Hugging Face tokenizer.json ("hf") ------------------------------------------------------------
def _word_level(tmp_path, n: int, eos: str = "</s>"):
    """A tokenizer.json with n whitespace-split words (and a tokenizer_config.json naming eos) in tmp_path."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {eos: 0, "[unk]": 1, **{f"w{i}": i + 2 for i in range(n - 2)}}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[unk]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()  # words back with spaces between
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": eos}))
    return tmp_path


def test_hf_tokenizer_reads_a_folder_and_reloads_from_its_own_json(tmp_path):
    folder = _word_level(tmp_path, 10)
    hf = HFTokenizer(HFTokenizerOptions(path=str(folder)))
    assert (hf.vocab_size, hf.eot, hf.bos) == (10, 0, None)  # eos_token of tokenizer_config.json
    assert hf.encode("w3 w1 nope") == [5, 3, 1] and hf.decode([5, 3]) == "w3 w1"
    hf.save(tmp_path / "run")
    again = load_tokenizer(tmp_path / "run", default_registry())
    assert (again.encode("w3 w1 nope"), again.eot, again.vocab_size) == ([5, 3, 1], 0, 10)
    named = HFTokenizer(HFTokenizerOptions(path=str(tmp_path / "run" / "tokenizer.json"), eot="w7"))
    assert named.eot == 9  # a run's tokenizer.json works as the path too, with its eot renamed
    with pytest.raises(ValueError, match="eot token 'w99' is not in the vocabulary"):
        HFTokenizer(HFTokenizerOptions(path=str(folder), eot="w99"))


def test_prepare_refuses_a_vocabulary_too_big_for_uint16_shards(tmp_path):
    folder = _word_level(tmp_path, 70_000)
    (tmp_path / "t.txt").write_text("w1 w2 w3\n" * 50)
    config = DataConfig(paths=[str(tmp_path / "t.txt")], prepared_dir=str(tmp_path / "data"),
                        tokenizer={"kind": "hf", "path": str(folder)})
    with pytest.raises(DataError, match="the hf tokenizer has 70000 tokens; prepared shards hold uint16 ids"):
        prepare(resolve_specs(default_registry(), config), progress=False)
