"""Documents to token ids: tasks of about 1 MB, encoded in this process or by a pool of workers, in order.

Speed. Inputs over 8 MB are tokenized by a process pool (all cores by default; ``workers``) in
tasks of about 1 MB (raw JSONL lines, parsed in the workers, or pieces of big documents cut where
GPT-2 encodes them exactly); results come back in order, so the shards never depend on ``workers``.
"""
from __future__ import annotations

import contextlib
import re

import numpy as np

from ..tokenizer import Tokenizer
from .sources import _jsonl_text, _raw_documents, _read_text, is_val_document

CHUNK_CHARS = 1 << 18  # big documents are tokenized in pieces of about this many characters
TASK_CHARS = 1 << 20  # one task for a tokenizer process: pieces or documents of about this size
# A piece boundary right after a newline that has non-space on both sides: GPT-2's pre-tokenizer
# makes that newline a pre-token of its own either way, so pieces encode exactly like the whole.
# (Python's \s is a superset of Unicode White_Space, so \S here is never whitespace to tiktoken.)
_SAFE_BREAK = re.compile(r"\S\n(?=\S)")


def _pieces(text: str, size: int | None = None) -> list[str]:
    """``text`` cut at safe newlines into pieces of about ``size`` characters (see _SAFE_BREAK)."""
    size = size or CHUNK_CHARS
    if len(text) <= size:
        return [text]
    pieces, start = [], 0
    while len(text) - start > size:
        m = _SAFE_BREAK.search(text, start + size)
        if m is None:
            break
        pieces.append(text[start:m.end()])
        start = m.end()
    pieces.append(text[start:])
    return pieces


class _TaskEncoder:
    """Encodes a task: pieces of documents (text, or raw JSONL lines parsed here, in the worker).

    A task is a list of (doc, first, where, payload, nbytes); the first piece of a document starts
    with the tokenizer's eot. Returns (docs, firsts, lengths, all ids concatenated, nbytes) so one
    task crosses the process boundary as one array, however many small documents it holds.
    """

    def __init__(self, tok: Tokenizer, column: str = "text"):
        self.tok, self.column = tok, column

    def __call__(self, task):
        docs, firsts, lengths, ids, nbytes = [], [], [], [], 0
        for doc, first, where, payload, nb in task:
            text = payload if isinstance(payload, str) else _jsonl_text(payload, where, self.column)
            before = len(ids)
            if first and self.tok.eot is not None:
                ids.append(self.tok.eot)
            ids.extend(self.tok.encode(text))
            docs.append(doc)
            firsts.append(first)
            lengths.append(len(ids) - before)
            nbytes += nb
        return docs, firsts, lengths, np.array(ids, dtype=np.uint16), nbytes


_worker_encoder: _TaskEncoder | None = None


def _init_worker(tok_class: type[Tokenizer], tok_dict: dict, column: str) -> None:
    global _worker_encoder
    _worker_encoder = _TaskEncoder(tok_class.from_dict(tok_dict), column)


def _encode_in_worker(task):
    return _worker_encoder(task)


@contextlib.contextmanager
def _encoded(tok: Tokenizer, column: str, tasks, workers: int):
    """Each task's (doc, first, ids, nbytes) pieces in order, encoded by a process pool when workers > 1."""
    if workers <= 1:
        yield _unpack(map(_TaskEncoder(tok, column), tasks))
        return
    import multiprocessing

    # workers rebuild the tokenizer from its json: pickling a tiktoken Encoding may look it up by name
    with multiprocessing.Pool(workers, initializer=_init_worker, initargs=(type(tok), tok.to_dict(), column)) as pool:
        yield _unpack(pool.imap(_encode_in_worker, tasks))


def _unpack(results):
    for docs, firsts, lengths, ids, nbytes in results:
        pos = 0
        for doc, first, n in zip(docs, firsts, lengths):
            yield doc, first, ids[pos : pos + n], 0
            pos += n
        yield -1, False, ids[:0], nbytes  # progress marker: the task's input bytes are done


class _Feed:
    """Tasks of about TASK_CHARS characters for the encoders, leaving out finished documents.

    Split by document, a document is needed from its split's resume point on (so a resumed run
    does not tokenize again what finished shards hold); the stream split needs every document, to
    know where ``1 - f`` of the tokens is. JSONL lines travel raw: workers parse them; table rows
    travel as text, read here (the workers need no pyarrow).
    """

    def __init__(self, sources, column, mode, val_fraction, resume_docs, docs_per_split):
        self.sources, self.column, self.mode, self.f = sources, column, mode, val_fraction
        self.resume_docs = resume_docs
        self.docs = docs_per_split
        self.n_docs = 0
        self.skipped_bytes = 0  # bytes of skipped documents, reported with the next task

    def __iter__(self):
        task, size = [], 0
        for doc, (path, where, payload, nbytes) in enumerate(_raw_documents(self.sources, self.column)):
            self.n_docs += 1
            if self.mode == "documents":
                split = "val" if is_val_document(doc, self.f) else "train"
                self.docs[split] += 1
                if doc < self.resume_docs[split]:
                    self.skipped_bytes += nbytes
                    continue
            nbytes, self.skipped_bytes = nbytes + self.skipped_bytes, 0
            if isinstance(payload, bytes):
                task.append((doc, True, where, payload, nbytes))
                size += len(payload)
            else:
                pieces = _pieces(_read_text(path) if payload is None else payload)
                for k, piece in enumerate(pieces):
                    task.append((doc, k == 0, where, piece, nbytes if k == len(pieces) - 1 else 0))
                    size += len(piece)
                    if size >= TASK_CHARS:
                        yield task
                        task, size = [], 0
            if size >= TASK_CHARS:
                yield task
                task, size = [], 0
        if task:
            yield task
