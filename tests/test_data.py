"""prepare (text -> uint16 token shards) and TokenLoader (per-rank batches, exact resume)."""
import fcntl
import json
import os
import queue
import shutil
import subprocess
import sys
import threading

import attrs
import numpy as np
import pytest
import torch

from toolkit.cli import main
from toolkit.data import TokenLoader, pipeline, prepare, prepared_dir, read_meta, read_split, tokenize, tokens_in
from toolkit.data.shards import FORMAT_VERSION, _Folder, _ShardWriter, shard_name
from toolkit.data.sources import is_val_document
from toolkit.errors import DataError
from toolkit.plugin_manager import default_registry
from toolkit.recipe import DataConfig
from toolkit.tokenizer import ASSETS, GPT2Tokenizer
from toolkit.tokenizer import load_tokenizer as _load_tokenizer


def load_tokenizer(path):
    return _load_tokenizer(path, default_registry())

SHAKESPEARE = (ASSETS / "tinyshakespeare.txt").read_text(encoding="utf-8")
WORDS = np.array(SHAKESPEARE[:100_000].split())


def split_tokens(out, split):
    meta = read_meta(out)
    parts = [np.fromfile(out / s["file"], dtype="<u2") for s in meta["splits"][split]["shards"]]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)


def shard_bytes(out):
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.bin"))}


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def documents(n, seed=0):
    rng = np.random.default_rng(seed)
    return [f"doc {i}: " + " ".join(rng.choice(WORDS, size=int(rng.integers(5, 60)))) for i in range(n)]


# ----------------------------------------------------------------------------- prepare


def test_shipped_shakespeare_is_prepared_by_default_with_nanogpts_char_split(tmp_path):
    out = prepare(DataConfig(prepared_dir=str(tmp_path / "ts")), progress=False)
    meta = read_meta(out)
    assert meta["vocab_size"] == 65 and meta["tokenizer_name"] == "char"
    # nanoGPT's shakespeare_char: 1,003,854 train and 111,540 val characters
    assert tokens_in(out, "train") == 1_003_854 and tokens_in(out, "val") == 111_540
    tok = load_tokenizer(out)
    assert tok.decode(split_tokens(out, "train")) + tok.decode(split_tokens(out, "val")) == SHAKESPEARE


def test_default_prepared_dir_is_data_dataset_tokenizer():
    assert str(prepared_dir(DataConfig())) == os.path.join("data", "tinyshakespeare-char")
    assert str(prepared_dir(DataConfig(dataset="web", tokenizer="gpt2", paths=["x"]))) == os.path.join("data", "web-gpt2")
    assert str(prepared_dir(DataConfig(prepared_dir="elsewhere"))) == "elsewhere"


def test_second_prepare_skips_everything_and_touches_nothing(tmp_path, capsys):
    data = DataConfig(prepared_dir=str(tmp_path / "ts"))
    out = prepare(data, progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert prepare(data, progress=True) == out
    assert "already prepared (char, 1,003,854 train and 111,540 val tokens in 2 shards)" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_changed_inputs_are_reported_and_prepared_again(tmp_path, capsys):
    src = tmp_path / "a.txt"
    src.write_text("hello there, general kenobi\n" * 50)
    data = DataConfig(dataset="k", paths=[str(src)], prepared_dir=str(tmp_path / "p"))
    out = prepare(data, progress=False)
    n = tokens_in(out, "train") + tokens_in(out, "val")
    src.write_text("hello there\n" * 50)
    prepare(data, progress=True)
    assert f"{src.resolve()} changed (size 1400 -> 600 bytes); preparing again" in capsys.readouterr().err
    assert tokens_in(out, "train") + tokens_in(out, "val") == 600 != n
    (tmp_path / "b.txt").write_text("zzz\n" * 50)
    prepare(DataConfig(dataset="k", paths=[str(tmp_path)], prepared_dir=str(out)), progress=True)
    assert "the input files changed (+b.txt)" in capsys.readouterr().err
    assert "z" in load_tokenizer(out).chars
    prepare(DataConfig(dataset="k", tokenizer="gpt2", paths=[str(tmp_path)], prepared_dir=str(out)), progress=True)
    assert "the tokenizer changed (char -> gpt2)" in capsys.readouterr().err
    assert read_meta(out)["vocab_size"] == 50257


def test_missing_shard_is_noticed_and_prepared_again(tmp_path, capsys):
    data = DataConfig(prepared_dir=str(tmp_path / "ts"))
    out = prepare(data, progress=False)
    (out / "val_000000.bin").unlink()
    prepare(data, progress=True)
    assert "val_000000.bin is missing; preparing again" in capsys.readouterr().err
    assert tokens_in(out, "val") == 111_540 and (out / "val_000000.bin").is_file()


def test_gpt2_jsonl_documents_each_start_with_endoftext(tmp_path):
    texts = ["Hello world", "Second document.", "", "Third, with\nlines"]
    write_jsonl(tmp_path / "docs.jsonl", texts)
    out = prepare(DataConfig(dataset="d", tokenizer="gpt2", paths=[str(tmp_path / "docs.jsonl")],
                             prepared_dir=str(tmp_path / "p"), val_fraction=0.25), progress=False)
    tok = GPT2Tokenizer()
    expected = [i for t in texts for i in [50256, *tok.encode(t)]]
    assert expected[:3] == [50256, 15496, 995]
    stream = np.concatenate([split_tokens(out, "train"), split_tokens(out, "val")]).tolist()
    assert stream == expected
    # few documents: the stream's last quarter validates
    assert tokens_in(out, "val") == len(expected) - int(len(expected) * 0.75)
    assert read_meta(out)["split"] == "tail" and read_meta(out)["documents"] == 4


def test_many_documents_split_every_kth_document_into_val(tmp_path):
    texts = documents(120)
    write_jsonl(tmp_path / "docs.jsonl", texts)
    out = prepare(DataConfig(dataset="d", tokenizer="gpt2", paths=[str(tmp_path)],
                             prepared_dir=str(tmp_path / "p"), val_fraction=0.1), progress=False)
    tok = GPT2Tokenizer()
    val_docs = [i for i in range(120) if is_val_document(i, 0.1)]
    assert val_docs == list(range(9, 120, 10))
    meta = read_meta(out)
    assert meta["split"] == "documents"
    assert (meta["splits"]["train"]["documents"], meta["splits"]["val"]["documents"]) == (108, 12)
    enc = lambda ids: [t for i in ids for t in [50256, *tok.encode(texts[i])]]  # noqa: E731
    assert split_tokens(out, "val").tolist() == enc(val_docs)
    assert split_tokens(out, "train").tolist() == enc([i for i in range(120) if i not in val_docs])


def test_big_documents_are_cut_where_gpt2_encodes_the_pieces_exactly():
    tok = GPT2Tokenizer()
    text = SHAKESPEARE[:300_000]
    pieces = tokenize._pieces(text, size=2000)
    assert len(pieces) > 100 and "".join(pieces) == text
    assert [t for p in pieces for t in tok.encode(p)] == tok.encode(text)


def test_worker_processes_write_the_same_shards_as_one_process(tmp_path, monkeypatch):
    monkeypatch.setattr(tokenize, "TASK_CHARS", 30_000)  # many small tasks, finishing out of order
    monkeypatch.setattr(tokenize, "CHUNK_CHARS", 10_000)
    (tmp_path / "in").mkdir()
    write_jsonl(tmp_path / "in" / "a.jsonl", documents(150))
    (tmp_path / "in" / "b.txt").write_text(SHAKESPEARE[:600_000])  # one big document, cut in pieces
    outs = []
    for workers in (1, 2):
        outs.append(prepare(DataConfig(dataset="d", tokenizer="gpt2", paths=[str(tmp_path / "in")],
                                       prepared_dir=str(tmp_path / f"w{workers}")),
                            progress=False, workers=workers, shard_size=20_000))
    assert len(list(outs[0].glob("train_*.bin"))) > 5
    assert shard_bytes(outs[0]) == shard_bytes(outs[1])


def test_interrupted_prepare_resumes_without_retokenizing_finished_documents(tmp_path, monkeypatch):
    texts = documents(300, seed=1)
    write_jsonl(tmp_path / "docs.jsonl", texts)
    data = DataConfig(dataset="d", tokenizer="gpt2", paths=[str(tmp_path / "docs.jsonl")],
                      prepared_dir=str(tmp_path / "p"))
    reference = shard_bytes(prepare(attrs.evolve(data, prepared_dir=str(tmp_path / "ref")),
                                    progress=False, workers=1, shard_size=1000))

    write = _ShardWriter._write
    calls = {"n": 0}

    def crash_after_five(self, ids, next_pos):
        write(self, ids, next_pos)
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(_ShardWriter, "_write", crash_after_five)
    with pytest.raises(KeyboardInterrupt):
        prepare(data, progress=False, workers=1, shard_size=1000)
    out = tmp_path / "p"
    assert not (out / "meta.json").exists() and (out / "progress.json").exists()
    monkeypatch.setattr(_ShardWriter, "_write", write)

    encoded = []
    encode = tokenize._TaskEncoder.__call__
    monkeypatch.setattr(tokenize._TaskEncoder, "__call__", lambda self, task: encoded.extend(t[0] for t in task) or encode(self, task))
    prepare(data, progress=False, workers=1, shard_size=1000)
    assert shard_bytes(out) == reference
    # the training documents of the five finished shards were not tokenized again, only the
    # validation documents among them (the val split had no finished shard yet)
    assert all(is_val_document(i, 0.1) for i in encoded if i < 50)
    assert len([i for i in encoded if i < 50]) == 5
    assert not (out / "progress.json").exists()


def test_bad_inputs_are_one_line_errors_naming_the_problem(tmp_path):
    with pytest.raises(DataError, match=r"data.paths\[0\]: nope.txt: no such file or folder"):
        prepare(DataConfig(paths=["nope.txt"], prepared_dir=str(tmp_path / "p")))
    with pytest.raises(DataError, match="data.paths is empty and unknown dataset 'mine'.*registered: tinyshakespeare"):
        prepare(DataConfig(dataset="mine", prepared_dir=str(tmp_path / "p")))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(DataError, match=r"expected a .txt, .jsonl or .parquet file \(or a folder of them, or one saved by datasets\), got .csv"):
        prepare(DataConfig(paths=[str(tmp_path / "x.csv")], prepared_dir=str(tmp_path / "p")))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    for workers in (1, 2):
        with pytest.raises(DataError, match=r"bad.jsonl:2: expected a JSON object with a \"text\" string"):
            prepare(DataConfig(tokenizer="gpt2", paths=[str(tmp_path / "bad.jsonl")],
                               prepared_dir=str(tmp_path / "p")), progress=False, workers=workers)


# ----------------------------------------------------------------------------- users' files


def foreign_files(folder):
    """Files a user keeps in ``folder``, some named as prepare once matched them (*.tmp, train_*.bin)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "tokenizer.json": b'{"mine": "a tokenizer of my own"}\n',
        "meta.json": b'{"format": 1, "note": "my own meta"}\n',
        "notes.tmp": b"half-written notes\n",
        "train_final.bin": bytes(range(256)),
        "train_000000.bin": b"\x00\x01" * 50,
        "progress.json": b"[]\n",
    }
    for name, content in files.items():
        (folder / name).write_bytes(content)
    return files


def contents(folder):
    """Every file under ``folder`` (names relative to it) with its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def small_web(tmp_path, n=40, seed=0):
    return write_jsonl(tmp_path / f"web{seed}.jsonl", documents(n, seed=seed))


def test_a_folder_that_prepare_did_not_write_is_refused_and_left_byte_for_byte(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "mine"
    foreign_files(folder)
    before = contents(folder)
    data = DataConfig(dataset="w", tokenizer="gpt2", paths=[str(small_web(tmp_path))], prepared_dir=str(folder))
    with pytest.raises(DataError) as exc:
        prepare(data, progress=False)
    assert str(exc.value) == (f"prepared folder {folder} is not empty and was not prepared by playattention (no "
                              "meta.json or progress.json of its own); set data.prepared_dir to a new or empty folder")
    assert contents(folder) == before and not (folder / ".lock").exists()
    # one file of someone else's is enough; the CLI says it in one line with exit status 2
    monkeypatch.chdir(tmp_path)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "README").write_text("keep me")
    assert main(["prepare", "--input", "web0.jsonl", "--out", "other", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: prepared folder other is not empty and was not prepared")
    assert contents(tmp_path / "other") == {"README": b"keep me"}


@pytest.mark.parametrize("target, what", [
    ("/", "a filesystem root"),
    ("home", "your home folder"),
    ("work", "the working directory"),
    ("work/..", "a folder that holds the working directory"),
])
def test_a_root_home_or_working_directory_is_refused_as_prepared_folder(tmp_path, monkeypatch, capsys, target, what):
    (tmp_path / "home").mkdir()  # empty: refused for what it is, not for what it holds
    (tmp_path / "work").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path / "work")
    web = small_web(tmp_path)
    given = target if target == "/" else str(tmp_path / target)

    def went_past_the_check(data):  # so that a broken check fails here instead of writing into "/"
        raise AssertionError("prepare went past the check of its folder")

    monkeypatch.setattr(pipeline, "resolve_sources", went_past_the_check)
    before = {p: os.listdir(p) for p in ("/", tmp_path, tmp_path / "home", tmp_path / "work")}
    with pytest.raises(DataError) as exc:
        prepare(DataConfig(dataset="w", tokenizer="gpt2", paths=[str(web)], prepared_dir=given), progress=False)
    assert str(exc.value) == (f"prepared folder {given} is {what}; set data.prepared_dir to a folder of its own "
                              "(e.g. data/NAME)")
    assert {p: os.listdir(p) for p in before} == before
    # the trainer prepares through the same function; the CLI refuses with exit status 2
    assert main(["prepare", "--input", str(web), "--out", given, "--quiet"]) == 2
    assert capsys.readouterr().err == f"error: {exc.value}\n"
    assert {p: os.listdir(p) for p in before} == before


def test_preparing_again_removes_only_prepares_own_files(tmp_path):
    folder = tmp_path / "p"
    data = DataConfig(dataset="w", tokenizer="gpt2", paths=[str(small_web(tmp_path, 40))], prepared_dir=str(folder))
    prepare(data, progress=False, shard_size=300)
    assert read_meta(folder)["files"] == sorted(p.name for p in folder.iterdir() if p.name != ".lock")
    # files a user puts beside the shards, named as the old clean-up globs matched them
    mine = {"notes.tmp": b"notes", "train_final.bin": b"\x07" * 9, "val_.bin": b"v", "README.md": b"# mine",
            "tokenizer.json.bak": b"old"}
    for name, content in mine.items():
        (folder / name).write_bytes(content)
    (folder / "sub").mkdir()
    (folder / "sub" / "train_000000.bin").write_bytes(b"nested")
    for new_data, kw in (
        (attrs.evolve(data, paths=[str(small_web(tmp_path, 20, seed=1))]), {"shard_size": 300}),  # other inputs
        (data, {"shard_size": 200}),  # other shard size, more shards
        (attrs.evolve(data, tokenizer="char"), {}),  # another tokenizer
    ):
        prepare(new_data, progress=False, **kw)
        assert {n: (folder / n).read_bytes() for n in mine} == mine
        assert (folder / "sub" / "train_000000.bin").read_bytes() == b"nested"
        ours = {p.name for p in folder.iterdir()} - set(mine) - {"sub", ".lock"}
        assert ours == set(read_meta(folder)["files"])  # nothing stale of its own is left either


def test_a_file_of_someone_elses_under_a_name_prepare_would_write_is_refused(tmp_path):
    folder = tmp_path / "p"
    data = DataConfig(dataset="w", tokenizer="gpt2", paths=[str(small_web(tmp_path, 40))], prepared_dir=str(folder))
    prepare(data, progress=False, shard_size=100_000)
    assert [p.name for p in sorted(folder.glob("*.bin"))] == ["train_000000.bin", "val_000000.bin"]
    for name in ("train_000003.bin", "val_000000.bin.tmp"):
        (folder / name).write_bytes(b"someone else's " + name.encode())
        before = contents(folder)
        with pytest.raises(DataError) as exc:
            prepare(data, progress=False, shard_size=300)  # would write train_000000..000009
        assert str(exc.value) == (f"{folder / name}: prepare did not write this file but would write one of that "
                                  "name; move it away or set data.prepared_dir to another folder")
        assert contents(folder) == before  # refused before anything was removed
        (folder / name).unlink()
    prepare(data, progress=False, shard_size=300)
    assert len(list(folder.glob("train_*.bin"))) > 3


def test_a_state_file_naming_other_files_cannot_make_prepare_remove_them(tmp_path):
    folder = tmp_path / "p"
    (tmp_path / "outside.txt").write_text("outside")
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    (folder / "train_000000.bin").write_bytes(b"\x01\x00")
    # looks like prepare's own meta.json but lists files that are not of prepare's kind
    (folder / "meta.json").write_text(json.dumps({
        "format": 1, "inputs": {"format": 1, "tokenizer": "gpt2"}, "splits": {"../outside": {"shards": [1]}},
        "files": ["notes.txt", "../outside.txt", "/etc/hostname", "train_000000.bin"],
    }))
    data = DataConfig(dataset="w", tokenizer="gpt2", paths=[str(small_web(tmp_path))], prepared_dir=str(folder))
    before = contents(folder)
    with pytest.raises(DataError, match=r"train_000000.bin: prepare cannot show it wrote this file"):
        prepare(data, progress=False)  # train_000000.bin is of prepare's kind, but not what prepare wrote
    assert contents(folder) == {**before, ".lock": b""} and (tmp_path / "outside.txt").read_text() == "outside"


def test_a_copied_meta_json_cannot_make_prepare_remove_or_replace_what_it_lists(tmp_path, capsys, monkeypatch):
    """A finished preparation's meta.json copied into a folder of the user's own files: prepare removes
    nothing it cannot show it wrote (same name, size and sha256 as recorded), and says so in one line."""
    data = DataConfig(dataset="w", tokenizer="gpt2", paths=[str(small_web(tmp_path))], prepared_dir=str(tmp_path / "x"))
    meta = read_meta(prepare(data, progress=False, shard_size=300))
    assert set(meta["hashes"]) == set(meta["files"]) - {"meta.json"}
    folder = tmp_path / "mine"
    folder.mkdir()
    (tmp_path / "outside").write_text("outside")
    for name in ("tokenizer.json", "train_000000.bin", "val_000000.bin"):  # the user's, under prepare's names
        (folder / name).write_text(f"my own {name}")
    meta["files"] += ["../outside", "/etc/hostname"]
    (folder / "meta.json").write_text(json.dumps(meta))
    before = contents(folder)
    monkeypatch.chdir(tmp_path)
    assert main(["prepare", "--input", str(small_web(tmp_path, 20, seed=1)), "--out", "mine", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: mine/") and "prepare cannot show it wrote this file" in err
    assert contents(folder) == {**before, ".lock": b""} and (tmp_path / "outside").read_text() == "outside"


def test_a_folder_prepared_before_files_were_listed_is_still_prepares_own(tmp_path, capsys):
    folder = tmp_path / "p"
    data = DataConfig(dataset="w", tokenizer="gpt2", paths=[str(small_web(tmp_path))], prepared_dir=str(folder))
    prepare(data, progress=False, shard_size=300)
    meta = read_meta(folder)
    del meta["files"]  # as the previous version wrote it
    (folder / "meta.json").write_text(json.dumps(meta))
    (folder / "notes.tmp").write_text("mine")
    prepare(data, progress=True, shard_size=300)
    assert "already prepared" in capsys.readouterr().err
    prepare(attrs.evolve(data, val_fraction=0.2), progress=False, shard_size=300)
    assert read_meta(folder)["val_fraction"] == 0.2 and (folder / "notes.tmp").read_text() == "mine"


def test_prepare_interrupted_between_recording_and_writing_a_file_resumes(tmp_path, monkeypatch):
    data = DataConfig(dataset="w", tokenizer="gpt2", paths=[str(small_web(tmp_path, 60))],
                      prepared_dir=str(tmp_path / "p"))
    reference = shard_bytes(prepare(attrs.evolve(data, prepared_dir=str(tmp_path / "ref")), progress=False,
                                    shard_size=300))
    claim = _Folder.claim
    for name in ("tokenizer.json", "train_000000.bin", "train_000002.bin", "meta.json"):
        def crash_once_recorded(self, n, name=name):
            claim(self, n)
            if n == name:
                (self.out / (n + ".tmp")).write_bytes(b"half")  # as if killed while writing it
                raise KeyboardInterrupt

        monkeypatch.setattr(_Folder, "claim", crash_once_recorded)
        with pytest.raises(KeyboardInterrupt):
            prepare(data, progress=False, shard_size=300)
        monkeypatch.setattr(_Folder, "claim", claim)
        prepare(data, progress=False, shard_size=300)
        assert shard_bytes(tmp_path / "p") == reference and not list((tmp_path / "p").glob("*.tmp")), name
        shutil.rmtree(tmp_path / "p")


# ----------------------------------------------------------------------------- loader


def make_prepared(path, shard_lengths, split="train"):
    """A prepared dataset whose tokens are their own positions, so a window shows where it starts."""
    path.mkdir(parents=True, exist_ok=True)
    shards, start = [], 0
    for i, n in enumerate(shard_lengths):
        np.arange(start, start + n, dtype="<u2").tofile(path / shard_name(split, i))
        shards.append({"file": shard_name(split, i), "tokens": n})
        start += n
    meta = {"format": FORMAT_VERSION, "splits": {split: {"tokens": start, "shards": shards}}}
    (path / "meta.json").write_text(json.dumps(meta))
    return path


def epoch_starts(loader):
    """The first token (= position) of every window a loader reads in one epoch."""
    return [int(t) for _ in range(loader.batches_per_epoch) for t in loader.next_batch()[0][:, 0]]


def test_batches_are_int64_windows_with_y_shifted_by_one(tmp_path):
    out = make_prepared(tmp_path, [5000, 3000])
    x, y = TokenLoader(out, "train", batch_size=4, block_size=16).next_batch()
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1)  # tokens are positions, so "next token" is +1
    assert torch.equal(x, x[:, :1] + torch.arange(16))  # contiguous, inside one shard


def test_same_seed_same_batches_and_another_seed_others(tmp_path):
    out = make_prepared(tmp_path, [4000])
    a, b, c = (TokenLoader(out, "train", 8, 32, seed=s) for s in (1, 1, 2))
    for _ in range(5):
        xa, xb, xc = a.next_batch()[0], b.next_batch()[0], c.next_batch()[0]
        assert torch.equal(xa, xb) and not torch.equal(xa, xc)


def test_ranks_read_disjoint_non_overlapping_windows_each_epoch(tmp_path):
    T = 16
    out = make_prepared(tmp_path, [3000, 2000, 700])
    loaders = [TokenLoader(out, "train", 5, T, rank=r, world_size=3, seed=7) for r in range(3)]
    assert {ld.batches_per_epoch for ld in loaders} == {(3000 // T - 1 + 2000 // T - 1 + 700 // T - 1) // 15}
    for _epoch in range(2):
        starts = sorted(s for ld in loaders for s in epoch_starts(ld))
        assert len(starts) == len(set(starts)) == 15 * loaders[0].batches_per_epoch
        assert all(b - a >= T for a, b in zip(starts, starts[1:]))  # x windows never overlap
    # the window edges move between epochs, as with random offsets
    first = set(epoch_starts(TokenLoader(out, "train", 5, T, seed=7)))
    assert len(first & set(s for ld in loaders for s in epoch_starts(ld))) < len(first)


def test_resuming_from_state_dict_reads_exactly_the_uninterrupted_batches(tmp_path):
    out = make_prepared(tmp_path, [2000, 1500])
    full = TokenLoader(out, "train", 4, 32, rank=1, world_size=2, seed=3)
    per_epoch = full.batches_per_epoch
    reference = [full.next_batch()[0] for _ in range(3 * per_epoch)]
    for stop in (per_epoch // 2, per_epoch, per_epoch + 1, 2 * per_epoch + 3):
        first = TokenLoader(out, "train", 4, 32, rank=1, world_size=2, seed=3)
        for _ in range(stop):
            first.next_batch()
        state = json.loads(json.dumps(first.state_dict()))
        resumed = TokenLoader(out, "train", 4, 32, rank=1, world_size=2, seed=3)
        resumed.load_state_dict(state)
        for k in range(stop, 3 * per_epoch):
            assert torch.equal(resumed.next_batch()[0], reference[k]), (stop, k)


def test_reset_gives_the_same_batches_again(tmp_path):
    out = make_prepared(tmp_path, [3000], split="val")
    val = TokenLoader(out, "val", 4, 32)
    first = [val.next_batch()[0] for _ in range(30)]  # more than one epoch
    val.reset()
    assert all(torch.equal(val.next_batch()[0], x) for x in first)


def test_loader_state_from_other_data_is_refused(tmp_path):
    out = make_prepared(tmp_path, [3000])
    state = TokenLoader(out, "train", 4, 32, seed=1).state_dict()
    with pytest.raises(DataError, match="loader state is for block_size 32, this loader has 16"):
        TokenLoader(out, "train", 4, 16, seed=1).load_state_dict(state)


def test_too_little_data_names_split_tokens_and_need(tmp_path):
    out = make_prepared(tmp_path, [1000], split="val")
    with pytest.raises(DataError, match=r"the val split of .* has 1,000 tokens: too few for one batch of 8 windows "
                                        r"of 65 tokens on each of 2 rank\(s\); that needs at least 1,088 tokens"):
        TokenLoader(out, "val", 8, 64, world_size=2)
    TokenLoader(out, "val", 7, 64, world_size=2)  # 1000 // 64 - 1 = 14 windows: one batch of 7 each
    with pytest.raises(DataError, match="not a prepared dataset"):
        TokenLoader(tmp_path / "nothing", "val", 1, 1)


def test_loader_reads_real_prepared_shakespeare(tmp_path):
    out = prepare(DataConfig(prepared_dir=str(tmp_path / "ts")), progress=False)
    x, y = TokenLoader(out, "val", 12, 64, seed=1337).next_batch()
    text = load_tokenizer(out).decode(x[0].tolist() + y[0, -1:].tolist())
    assert text in SHAKESPEARE[-111_540:]


# ----------------------------------------------------------------------------- CLI


def test_prepare_cli_with_inputs_and_with_a_recipe(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "web.jsonl", documents(20))
    assert main(["prepare", "--input", "web.jsonl", "--out", "p", "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == "p"
    assert read_meta(tmp_path / "p")["tokenizer_name"] == "gpt2"
    (tmp_path / "r.toml").write_text('[data]\ndataset = "w"\ntokenizer = "char"\npaths = ["web.jsonl"]\n')
    assert main(["prepare", "r.toml", "--set", "data.val_fraction=0.5", "--quiet"]) == 0
    assert read_meta(tmp_path / "data" / "w-char")["val_fraction"] == 0.5


@pytest.mark.parametrize("argv, message", [
    (["prepare", "--input", "missing.jsonl"], "error: --input missing.jsonl: no such file or folder"),
    (["prepare"], "error: give a RECIPE to prepare its [data], or --input FILE_OR_DIR... (see --help)"),
    (["prepare", "r.toml"], "error: data.paths[0]: gone.txt: no such file or folder"),
])
def test_prepare_cli_bad_input_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.toml").write_text('[data]\npaths = ["gone.txt"]\n')
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip() == message


def test_prepare_input_takes_a_text_column_and_an_hf_tokenizer_file(tmp_path, monkeypatch, capsys):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers

    monkeypatch.chdir(tmp_path)
    words = [f"w{i}" for i in range(20)]
    tok = tokenizers.Tokenizer(models.WordLevel({"</s>": 0, "[unk]": 1, **{w: i + 2 for i, w in enumerate(words)}},
                                                unk_token="[unk]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save("tok.json")
    with open("docs.jsonl", "w") as f:
        for i in range(40):
            f.write(json.dumps({"body": " ".join(words[i % 20:] + words[:i % 20])}) + "\n")
    assert main(["prepare", "--input", "docs.jsonl", "--text-column", "body", "--tokenizer", "hf",
                 "--tokenizer-file", "tok.json", "--out", "p", "--quiet"]) == 0
    assert read_meta(tmp_path / "p")["tokenizer_name"] == "hf"  # the "body" field read: no [unk] among the tokens
    assert tokens_in("p", "train") > 0 and 1 not in read_split("p", "train")[0]
    capsys.readouterr()
    assert main(["prepare", "--input", "docs.jsonl", "--tokenizer", "hf", "--out", "q", "--quiet"]) == 2
    assert capsys.readouterr().err == ("error: --tokenizer hf needs --tokenizer-file FILE (a Hugging Face "
                                       "tokenizer.json or a folder holding one)\n")
    assert main(["prepare", "--input", "docs.jsonl", "--tokenizer", "gtp2", "--quiet"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown tokenizer 'gtp2'; did you mean 'gpt2'?")


def test_preparing_off_a_terminal_writes_no_progress_bar_frames(tmp_path, capsys):
    """A training under `ablate` prepares with its stderr in a log file: no tqdm frames (carriage returns) there."""
    (tmp_path / "t.txt").write_text("hello world\n" * 2000)
    prepare(DataConfig(dataset="t", tokenizer="char", paths=[str(tmp_path / "t.txt")],
                       prepared_dir=str(tmp_path / "p")), progress=True)
    assert "\r" not in capsys.readouterr().err


PREPARE = "import sys; from toolkit.data import prepare; from toolkit.recipe import DataConfig; " \
          "prepare(DataConfig(prepared_dir=sys.argv[1]))"


def test_a_prepare_that_finds_another_preparing_the_folder_waits_for_it_saying_so(tmp_path):
    # two runs of an ablation (--parallel 2) preparing the same data: the second used to find the
    # first's half-written folder, call it someone else's and fail
    out = tmp_path / "ts"
    out.mkdir()
    (out / "tokenizer.json").write_text("{}")  # what a preparation writes before its first state file
    lines: queue.Queue = queue.Queue()
    with open(out / ".lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # the other prepare, under way
        proc = subprocess.Popen([sys.executable, "-c", PREPARE, str(out)], stderr=subprocess.PIPE, text=True)
        threading.Thread(target=lambda: [lines.put(ln) for ln in proc.stderr], daemon=True).start()
        first = lines.get(timeout=120)
        assert first.startswith(f"{out}: another process is preparing this folder; waiting for it to finish (")
        (out / "tokenizer.json").unlink()  # the other one stops (here: leaving the folder empty) ...
    assert proc.wait(timeout=300) == 0  # ... and this one, judging the folder under the lock, prepares it
    assert read_meta(out)["vocab_size"] == 65
