"""``prepare``: the sources through the tokenizer into the shards of a prepared folder, resumable.

Validation split. ``char`` always uses nanoGPT's split: the first ``1 - val_fraction`` of the
tokens train, the rest validate. ``gpt2`` does the same when there are few documents (fewer than
``MIN_VAL_DOCS / val_fraction``, e.g. tiny Shakespeare is one); with many documents (JSONL web
text), whole documents are spread evenly over the corpus: document ``i`` validates when
``floor((i+1)*f) > floor(i*f)``, i.e. every ``1/f``-th one, so validation sees the whole corpus
(not only its first files) and never a document the model trained on.

Re-running. An interrupted preparation resumes from its finished shards (:mod:`toolkit.data.shards`).
A finished preparation whose inputs (file list, sizes, mtimes, tokenizer, text column, val_fraction,
shard size) are unchanged returns at once; changed inputs are reported and prepared again.
"""
from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import attrs

from ..errors import DataError
from ..plugin_manager import default_registry
from ..registry import Registry
from ..tokenizer import CHAR_DOC_SEPARATOR, Tokenizer
from .shards import (FORMAT_VERSION, SPLITS, _Folder, _ShardWriter, _locked, _own_files, _preparing_elsewhere,
                     _read_json, _refuse_target, _shards_ok, prepared_dir, shard_name)
from .sources import _count_documents, _documents, is_val_document, resolve_sources
from .tokenize import _Feed, _encoded

DEFAULT_SHARD_SIZE = 100_000_000  # tokens per shard (200 MB), as in build-nanogpt
MIN_VAL_DOCS = 10  # fewer documents than this would validate: split the token stream instead
SMALL_INPUT_BYTES = 8 << 20  # below this, tokenizing in-process beats starting worker processes


def _fingerprint(data, sources: list[Path], shard_size: int) -> dict:
    out = {
        "format": FORMAT_VERSION,
        "tokenizer": _tokenizer_key(data.tokenizer),
        "val_fraction": data.val_fraction,
        "shard_size": shard_size,
        "sources": [],
    }
    if any(f.suffix != ".txt" for f in sources):  # the column picks the documents
        out["text_column"] = data.text_column
    for f in sources:
        st = f.stat()
        out["sources"].append({"path": str(f.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def _tokenizer_key(spec) -> str | dict:
    """The tokenizer as it enters the fingerprint: its kind, and its options if it has any."""
    options = attrs.asdict(spec.options) if spec.options is not None else {}
    return {"kind": spec.kind, **options} if options else spec.kind


def _what_changed(old: dict, new: dict) -> str | None:
    """Why a preparation with fingerprint ``old`` is stale for ``new``, or None if it is not."""
    if "text_column" in new and "text_column" not in old:  # prepared before the column was configurable
        old = {**old, "text_column": "text"}
    if old == new:
        return None
    for key, what in (("format", "the prepared-data format"), ("tokenizer", "the tokenizer"),
                      ("text_column", "the text column"),
                      ("val_fraction", "val_fraction"), ("shard_size", "the shard size")):
        if old.get(key) != new.get(key):
            return f"{what} changed ({old.get(key)} -> {new.get(key)})"
    before = {s["path"]: s for s in old.get("sources", [])}
    after = {s["path"]: s for s in new["sources"]}
    added, removed = sorted(after.keys() - before.keys()), sorted(before.keys() - after.keys())
    if added or removed:
        names = [f"+{Path(p).name}" for p in added] + [f"-{Path(p).name}" for p in removed]
        more = f" and {len(names) - 3} more" if len(names) > 3 else ""
        return f"the input files changed ({', '.join(names[:3])}{more})"
    for path, s in after.items():
        if before[path]["size"] != s["size"]:
            return f"{path} changed (size {before[path]['size']} -> {s['size']} bytes)"
        if before[path]["mtime_ns"] != s["mtime_ns"]:
            return f"{path} changed (modified since it was prepared)"
    return "the order of the input files changed"


def prepare(data, *, registry: Registry | None = None, progress: bool = True, workers: int | None = None,
            shard_size: int = DEFAULT_SHARD_SIZE) -> Path:
    """Tokenize ``data`` (a DataConfig) into shards under ``prepared_dir(data)``; returns that dir.

    ``registry``: where the tokenizer and dataset come from (the recipe's; default the built-ins).

    ``workers``: tokenizer processes (default: all cores for inputs over 8 MB, else in-process).
    ``progress``: show a progress bar and say what is done on stderr.
    """
    if shard_size < 1:
        raise DataError(f"shard size must be at least 1 token, got {shard_size}")
    if workers is not None and workers < 1:
        raise DataError(f"workers must be at least 1, got {workers}")
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda msg: None)
    out = prepared_dir(data)
    _refuse_target(out)
    registry = registry or default_registry()
    sources = resolve_sources(data, registry)
    inputs = _fingerprint(data, sources, shard_size)
    if not _preparing_elsewhere(out):  # one another prepare is writing is judged under the lock, below
        _own_files(out)  # refuse someone else's folder before anything is created in it
    out.mkdir(parents=True, exist_ok=True)
    with _locked(out, say):
        folder = _Folder(out)  # again under the lock: another rank may have prepared it meanwhile
        why = None
        if "meta.json" in folder.owned and (out / "meta.json").exists():
            meta = _read_json(out / "meta.json")
            why = (_what_changed(meta.get("inputs", {}), inputs) if isinstance(meta, dict)
                   else "meta.json is unreadable")
            try:
                for split in SPLITS:
                    why = why or _shards_ok(out, split, [s["tokens"] for s in meta["splits"][split]["shards"]])
            except (KeyError, TypeError):
                why = "meta.json is incomplete"
            if why is None:
                _refuse_empty(out, meta)
                say(f"{out}: already prepared ({_summary(meta)})")
                return out
        folder.refuse_strays()  # before anything is removed
        if why is not None:
            say(f"{out}: {why}; preparing again")
            folder.clear()
        state = _read_json(out / "progress.json") if "progress.json" in folder.owned else None
        try:
            if state is not None and (
                state.get("inputs") != inputs
                or any(_shards_ok(out, s, state["splits"][s]["shards"]) for s in SPLITS)
            ):
                state = None
        except (KeyError, TypeError):
            state = None
        if state is None:
            folder.clear()
        else:
            done = sum(len(state["splits"][s]["shards"]) for s in SPLITS)
            say(f"{out}: resuming an interrupted preparation ({done} shards already written)")
        if workers is None:
            total = sum(s["size"] for s in inputs["sources"])
            workers = (os.cpu_count() or 1) if total > SMALL_INPUT_BYTES else 1
        t0 = time.time()
        meta = _prepare(data, registry, sources, inputs, folder, state, workers, shard_size, progress)
        _refuse_empty(out, meta)
        say(f"{out}: {_summary(meta)} in {time.time() - t0:.1f}s")
    return out


def _refuse_empty(out: Path, meta: dict) -> None:
    """DataError if the inputs gave no training tokens: training on them would fail later, less clearly."""
    if not meta["splits"]["train"]["tokens"]:
        raise DataError(f"{out}: the inputs hold no text ({_summary(meta)}); nothing to train on")


def _summary(meta: dict) -> str:
    sp = meta["splits"]
    n = len(sp["train"]["shards"]) + len(sp["val"]["shards"])
    return (f"{meta['tokenizer_name']}, {sp['train']['tokens']:,} train and {sp['val']['tokens']:,} val tokens "
            f"in {n} shard{'s' if n != 1 else ''}")


def _prepare(data, registry, sources, inputs, folder, state, workers, shard_size, progress) -> dict:
    from tqdm import tqdm

    out, f, column = folder.out, data.val_fraction, data.text_column
    total_bytes = sum(s["size"] for s in inputs["sources"])
    # disable=None: bar frames on a terminal only, never into a log file (a training's under ablate)
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"tokenizing ({data.tokenizer.kind})",
               disable=None if progress else True, leave=False, file=sys.stderr)

    writers = {
        s: _ShardWriter(out, s, shard_size,
                        state["splits"][s]["shards"] if state else [],
                        state["splits"][s]["next"] if state else (0, 0),
                        lambda _writer: folder.save(), folder.claim, folder.record)
        for s in SPLITS
    }
    folder.state = lambda: {
        "inputs": inputs,
        "splits": {s: {"shards": w.shards, "next": list(w.done)} for s, w in writers.items()},
    }
    docs = {"train": 0, "val": 0}

    tok_class = registry.get("tokenizer", data.tokenizer.kind).factory
    whole = tok_class.needs_corpus  # built from the corpus (characters): encode it whole, split its tail
    if whole:
        texts = []
        for text, nbytes in _documents(sources, column):
            texts.append(text)
            bar.update(nbytes)
        n_docs = len(texts)
        corpus = CHAR_DOC_SEPARATOR.join(texts)
        del texts
        tok: Tokenizer = registry.build(data.tokenizer, corpus)
        mode = "tail"
    else:
        tok = registry.build(data.tokenizer, None)
        limit = math.ceil(MIN_VAL_DOCS / f)
        mode = "documents" if _count_documents(sources, column, limit) >= limit else "tail"
    if tok.vocab_size > 1 << 16:  # ids past 65535 would wrap around silently in the uint16 shards
        raise DataError(f"the {tok.name} tokenizer has {tok.vocab_size} tokens; prepared shards hold uint16 ids, "
                        f"at most 65536 different tokens")
    folder.claim("tokenizer.json")
    folder.record("tokenizer.json", tok.save(out).read_bytes())

    if whole:
        try:
            ids = tok.encode_corpus(corpus)
        except ValueError as exc:  # e.g. more characters than uint16 ids
            raise DataError(str(exc)) from None
        del corpus
        cut = int(len(ids) * (1 - f))  # nanoGPT: first 90% train, last 10% val
        writers["train"].add(0, 0, ids[:cut])
        writers["val"].add(0, cut, ids[cut:])
        docs = None
    else:
        feed = _Feed(sources, column, mode, f, {s: w.resume[0] for s, w in writers.items()}, docs)
        with _encoded(tok, column, feed, workers) as encoded:
            if mode == "documents":
                offset = 0
                for doc, first, ids, nbytes in encoded:
                    if doc < 0:
                        bar.update(nbytes)
                        continue
                    offset = 0 if first else offset
                    writers["val" if is_val_document(doc, f) else "train"].add(doc, offset, ids)
                    offset += len(ids)
            else:  # few documents: keep the stream (it is small) and cut it at 1 - f
                stream, offset = [], 0
                for doc, first, ids, nbytes in encoded:
                    if doc < 0:
                        bar.update(nbytes)
                        continue
                    offset = 0 if first else offset
                    stream.append((doc, offset, ids))
                    offset += len(ids)
                cut = int(sum(len(ids) for _, _, ids in stream) * (1 - f))
                seen = 0
                for doc, offset, ids in stream:
                    k = min(max(cut - seen, 0), len(ids))
                    if k:
                        writers["train"].add(doc, offset, ids[:k])
                    if k < len(ids):
                        writers["val"].add(doc, offset + k, ids[k:])
                    seen += len(ids)
                docs = None
        bar.update(feed.skipped_bytes)
        n_docs = feed.n_docs
    bar.close()
    for w in writers.values():
        w.finish()
    if not any(sum(w.shards) for w in writers.values()):  # a zero-row table, empty files: would fail only in training
        raise DataError(f"{', '.join(str(s) for s in sources)}: no text in {'it' if len(sources) == 1 else 'them'} "
                        f"({n_docs} documents, 0 tokens); nothing to prepare")

    meta = {
        "format": FORMAT_VERSION,
        "tokenizer_name": tok.name,
        "tokenizer": tok.to_dict(),
        "vocab_size": tok.vocab_size,
        "eot": tok.eot,
        "dtype": "uint16",
        "split": mode,
        "val_fraction": f,
        "shard_size": shard_size,
        "documents": n_docs,
        "splits": {
            s: {
                "tokens": int(sum(w.shards)),
                "documents": docs[s] if docs is not None else None,
                "shards": [{"file": shard_name(s, i), "tokens": int(n)} for i, n in enumerate(w.shards)],
            }
            for s, w in writers.items()
        },
        "inputs": inputs,
    }
    folder.finish(meta)  # last: meta.json's presence means the preparation is complete
    return meta
