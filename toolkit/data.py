"""Token data: ``prepare`` turns text into uint16 token shards; ``TokenLoader`` serves batches.

Prepared layout (``prepared_dir(data)``, default ``data/<dataset>-<tokenizer>``)::

    train_000000.bin ...   raw little-endian uint16 tokens, np.memmap-readable, shard_size each
    val_000000.bin ...     (the last shard of a split is shorter)
    tokenizer.json         the tokenizer, so a run can decode without the corpus
    meta.json              format, tokenizer, token/shard counts per split, the inputs' fingerprint

Documents. A ``.txt`` file is one document; a ``.jsonl`` file holds one per line (its ``text``
field); a ``.parquet`` file (FineWeb-Edu's shards as downloaded) one per row (its ``text``
column), read a row group at a time; a folder saved by Hugging Face ``datasets``
(``Dataset.save_to_disk``: ``state.json`` and Arrow stream files) one per row, its files in the
order ``state.json`` lists them, read a record batch at a time with pyarrow alone (the ``parquet``
extra); a ``DatasetDict`` folder is refused with its splits named (give one split's folder). Any
other folder means every ``.txt``/``.jsonl``/``.parquet`` file under it, in sorted order.
``data.text_column`` names the JSONL field and table column (default ``text``). With ``gpt2``
every document starts with ``<|endoftext|>`` (50256), as in build-nanogpt's fineweb.py, so the
model learns where documents begin. ``char`` has no such token: documents are joined with a blank
line (``"\\n\\n"``), which adds no character a text corpus lacks.

Validation split. ``char`` always uses nanoGPT's split: the first ``1 - val_fraction`` of the
tokens train, the rest validate. ``gpt2`` does the same when there are few documents (fewer than
``MIN_VAL_DOCS / val_fraction``, e.g. tiny Shakespeare is one); with many documents (JSONL web
text), whole documents are spread evenly over the corpus: document ``i`` validates when
``floor((i+1)*f) > floor(i*f)``, i.e. every ``1/f``-th one, so validation sees the whole corpus
(not only its first files) and never a document the model trained on.

Speed. Inputs over 8 MB are tokenized by a process pool (all cores by default; ``workers``) in
tasks of about 1 MB (raw JSONL lines, parsed in the workers, or pieces of big documents cut where
GPT-2 encodes them exactly); results come back in order, so the shards never depend on ``workers``.

Re-running. Shards are written under a temporary name and renamed when complete; ``progress.json``
then records where the next shard starts (document, offset), so an interrupted run resumes
without re-tokenizing the finished part; ``meta.json`` is written last. A finished preparation
whose inputs (file list, sizes, mtimes, tokenizer, text column, val_fraction, shard size) are
unchanged returns at once; changed inputs are reported and prepared again.

Users' files. ``prepare`` removes or replaces only files it recorded as its own: before it writes a
file it adds the name to ``progress.json`` (``files``; ``meta.json`` lists them at the end), and
only names of its own kind (shards, ``tokenizer.json``, ``meta.json``, ``progress.json``) count.
A name is not proof (a ``meta.json`` can be copied): each file's size and sha256 are recorded as it
is written (``hashes``) and checked again before the file is removed or replaced; a file that does
not match is refused in one line, and nothing is removed.
It writes into a new or empty folder or one it prepared before, refuses any other (and a file
there with a name it would write) in one line, and refuses a filesystem root, the home folder
and the working directory (or a folder above them) outright.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import stat
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

import attrs

from . import safeio
from .errors import DataError, UnknownComponentError
from .plugin_manager import default_registry
from .registry import Registry
from .tokenizer import CHAR_DOC_SEPARATOR, Tokenizer

FORMAT_VERSION = 1
DEFAULT_SHARD_SIZE = 100_000_000  # tokens per shard (200 MB), as in build-nanogpt
SPLITS = ("train", "val")
INPUT_SUFFIXES = (".txt", ".jsonl", ".parquet")
TABLE_SUFFIXES = (".parquet", ".arrow")  # read with pyarrow; .arrow only from a folder saved by datasets
PARQUET_EXTRA = "pip install playattention[parquet]"
MIN_VAL_DOCS = 10  # fewer documents than this would validate: split the token stream instead
CHUNK_CHARS = 1 << 18  # big documents are tokenized in pieces of about this many characters
TASK_CHARS = 1 << 20  # one task for a tokenizer process: pieces or documents of about this size
SMALL_INPUT_BYTES = 8 << 20  # below this, tokenizing in-process beats starting worker processes
# A piece boundary right after a newline that has non-space on both sides: GPT-2's pre-tokenizer
# makes that newline a pre-token of its own either way, so pieces encode exactly like the whole.
# (Python's \s is a superset of Unicode White_Space, so \S here is never whitespace to tiktoken.)
_SAFE_BREAK = re.compile(r"\S\n(?=\S)")
# The only names prepare writes in its folder (each also as NAME.tmp while it is being written):
# it removes or replaces no other file, and these only once its state files list them.
_OWN_NAME = re.compile(r"(?:train|val)_\d{6}\.bin|tokenizer\.json|meta\.json|progress\.json")
STATE_FILES = ("meta.json", "progress.json")


# ----------------------------------------------------------------------------- inputs


def prepared_dir(data) -> Path:
    """Where ``data`` (a DataConfig) is prepared: its ``prepared_dir`` or ``data/<dataset>-<tokenizer>``."""
    if data.prepared_dir:
        return Path(data.prepared_dir).expanduser()
    return Path("data") / f"{data.dataset}-{data.tokenizer.kind}"


def resolve_sources(data, registry: Registry | None = None) -> list[Path]:
    """The input files of ``data`` in reading order; raises DataError naming a bad path or column.

    With no ``paths``, ``dataset`` names a registered dataset (``register_datasets``), whose
    factory gives the files.
    """
    if not data.paths:
        registry = registry or default_registry()
        try:
            dataset = registry.get("dataset", data.dataset)
        except UnknownComponentError as exc:
            raise DataError(f"data.paths is empty and {exc}; give data.paths or a registered dataset") from None
        return [Path(p) for p in dataset.factory(dataset.options())]
    files: list[Path] = []
    for i, given in enumerate(data.paths):
        path = Path(given).expanduser()
        where = f"data.paths[{i}]: {given}"
        if path.is_dir() and (path / "dataset_dict.json").is_file():
            _refuse_dataset_dict(path, where)
        elif path.is_dir() and (path / "state.json").is_file():
            found = _saved_dataset_files(path, where)
        elif path.is_dir():
            found = sorted(
                (f for f in path.rglob("*") if f.is_file() and f.suffix in INPUT_SUFFIXES and not f.name.startswith(".")),
                key=lambda f: f.relative_to(path).as_posix(),
            )
            if not found:
                raise DataError(f"{where}: the folder has no .txt, .jsonl or .parquet files "
                                "and is no folder saved by datasets")
        elif path.is_file():
            if path.suffix not in INPUT_SUFFIXES:
                raise DataError(f"{where}: expected a .txt, .jsonl or .parquet file (or a folder of them, or one "
                                f"saved by datasets), got {path.suffix or 'no suffix'}")
            found = [path]
        else:
            raise DataError(f"{where}: no such file or folder")
        for f in found:
            if f.suffix in TABLE_SUFFIXES:
                _check_table(f, data.text_column, where)
        files.extend(found)
    seen: set[Path] = set()
    unique = []
    for f in files:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


def _refuse_dataset_dict(path: Path, where: str) -> None:
    """A DatasetDict folder holds several splits: the user picks one by giving its folder."""
    splits = (_read_json(path / "dataset_dict.json") or {}).get("splits") or []
    splits = [s for s in splits if isinstance(s, str)]
    example = f", e.g. {path / splits[0]}" if splits else ""
    raise DataError(f"{where}: a datasets DatasetDict with splits {', '.join(splits) or '(none)'}; "
                    f"give one split's folder in data.paths{example}")


def _saved_dataset_files(path: Path, where: str) -> list[Path]:
    """The Arrow files of a folder written by ``Dataset.save_to_disk``, in the order state.json lists them."""
    state = _read_json(path / "state.json")
    entries = state.get("_data_files") if isinstance(state, dict) else None
    if not isinstance(entries, list) or not entries:
        raise DataError(f"{where}: state.json lists no data files (expected a folder saved by datasets' "
                        "save_to_disk)")
    files = []
    for entry in entries:
        name = entry.get("filename") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not name.endswith(".arrow"):
            raise DataError(f"{where}: state.json lists {name!r}, expected an .arrow file name")
        if not (path / name).is_file():
            raise DataError(f"{where}: state.json lists {name}, which is missing")
        files.append(path / name)
    return files


def _pyarrow(where: str):
    """pyarrow, or a DataError naming the extra that installs it."""
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet
    except ImportError:
        raise DataError(f"{where}: reading parquet files and datasets folders needs pyarrow: "
                        f"{PARQUET_EXTRA}") from None
    return pyarrow, pyarrow.parquet


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _check_table(path: Path, column: str, where: str) -> None:
    """Refuse, before anything is written, a table file without a string column ``column``."""
    pa, pq = _pyarrow(where)
    try:
        if path.suffix == ".parquet":
            schema = pq.read_schema(path)  # the footer only
        else:
            with pa.memory_map(str(path)) as source:
                schema = pa.ipc.open_stream(source).schema  # the first message only
    except (pa.ArrowException, OSError) as exc:
        kind = "parquet" if path.suffix == ".parquet" else "Arrow stream"
        raise DataError(f"{path}: not a readable {kind} file ({_first_line(exc)})") from None
    if column not in schema.names:
        raise DataError(f"{path}: no column {column!r} (columns: {', '.join(schema.names)}); "
                        f"set data.text_column to the one holding the text")
    kind = schema.field(column).type
    value = kind.value_type if pa.types.is_dictionary(kind) else kind
    if not (pa.types.is_string(value) or pa.types.is_large_string(value)
            or getattr(pa.types, "is_string_view", lambda _: False)(value)):
        raise DataError(f"{path}: column {column!r} holds {kind}, expected strings; "
                        f"set data.text_column to the one holding the text")


def _table_batches(path: Path, column: str) -> Iterator[tuple[list, int]]:
    """The ``column`` of a table file as lists of values, a parquet row group or Arrow record batch
    at a time (never the whole file in memory), each with the file bytes it accounts for."""
    pa, pq = _pyarrow(str(path))
    size = path.stat().st_size
    try:
        if path.suffix == ".parquet":
            f = pq.ParquetFile(path)
            try:
                rows, done, counted = f.metadata.num_rows, 0, 0
                for i in range(f.num_row_groups):
                    values = f.read_row_group(i, columns=[column]).column(0).to_pylist()
                    done += len(values)
                    upto = size * done // rows if rows else size  # the file's bytes shared out by rows
                    yield values, upto - counted
                    counted = upto
            finally:
                f.close()
        else:
            with pa.memory_map(str(path)) as source:
                reader = pa.ipc.open_stream(source)
                index = reader.schema.get_field_index(column)
                counted, held = 0, None
                for batch in reader:  # one batch behind, so the last one takes the end-of-stream bytes
                    if held is not None:
                        yield held
                    end = source.tell()
                    held, counted = (batch.column(index).to_pylist(), end - counted), end
                if held is not None:
                    yield held[0], held[1] + size - counted
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: cannot be read ({_first_line(exc)})") from None


def _rows(path: Path, column: str) -> Iterator[tuple[Path, str, str, int]]:
    """Every row of a table file as a document (see _raw_documents); a null text is refused."""
    row, pending = 0, 0
    for values, nbytes in _table_batches(path, column):
        pending += nbytes
        for text in values:
            if not isinstance(text, str):
                raise DataError(f"{path}: row {row}: {column!r} is {text!r}, expected a string")
            yield path, f"{path}: row {row}", text, pending
            row, pending = row + 1, 0


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


def _jsonl_text(raw: bytes, where: str, column: str = "text") -> str:
    """The ``column`` field of one JSONL line; ``where`` (file:line) names it in errors."""
    try:
        obj = json.loads(raw)
    except RecursionError:
        raise DataError(f"{where}: not a JSON line we can read (arrays or objects nested too deep)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{where}: not a JSON line ({exc})") from None
    except ValueError:  # Python reads no integer of more than sys.get_int_max_str_digits() digits
        raise DataError(f"{where}: not a JSON line we can read (a number of more than "
                        f"{sys.get_int_max_str_digits()} digits)") from None
    text = obj.get(column) if isinstance(obj, dict) else None
    if not isinstance(text, str):
        raise DataError(f'{where}: expected a JSON object with a "{column}" string')
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # a JSON escape like "\ud800" of half a surrogate pair: no character at all
        raise DataError(f'{where}: the "{column}" string holds a lone surrogate {text[exc.start]!r} at '
                        f"character {exc.start}, not a Unicode character") from None
    return text


def _read_text(path: Path) -> str:
    try:
        return safeio.read_text(path, limit=None)  # a FIFO put there since it was listed: refused, not waited on
    except safeio.BadContent as exc:
        raise DataError(str(exc)) from None


def _raw_documents(sources: list[Path], column: str) -> Iterator[tuple[Path, str, bytes | str | None, int]]:
    """Every document as (file, where, payload, input bytes); ``where`` names it in errors.

    The payload is a raw JSONL line (bytes: the encoders parse it), a table row's text (str), or
    None for a whole .txt file (read when it is needed). Blank JSONL lines are no documents;
    their bytes are counted with the next one.
    """
    for path in sources:
        if path.suffix == ".jsonl":
            pending = 0
            with open(path, "rb") as f:
                for lineno, raw in enumerate(f, 1):
                    pending += len(raw)
                    if raw.strip():
                        yield path, f"{path}:{lineno}", raw, pending
                        pending = 0
        elif path.suffix in TABLE_SUFFIXES:
            yield from _rows(path, column)
        else:
            yield path, str(path), None, path.stat().st_size


def _documents(sources: list[Path], column: str) -> Iterator[tuple[str, int]]:
    """Every document's text with the number of input bytes it accounts for."""
    for path, where, payload, nbytes in _raw_documents(sources, column):
        if isinstance(payload, bytes):
            yield _jsonl_text(payload, where, column), nbytes
        else:
            yield (_read_text(path) if payload is None else payload), nbytes


def _count_documents(sources: list[Path], column: str, limit: int) -> int:
    """How many documents the inputs hold, counting no further than ``limit``."""
    n = 0
    for _ in _raw_documents(sources, column):
        n += 1
        if n >= limit:
            break
    return n


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


def is_val_document(i: int, val_fraction: float) -> bool:
    """Whether document ``i`` validates in the by-document split: every 1/f-th, evenly spread."""
    return math.floor((i + 1) * val_fraction) > math.floor(i * val_fraction)


# ----------------------------------------------------------------------------- tokenizing


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


# ----------------------------------------------------------------------------- shards


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.bin"


class _ShardWriter:
    """Cuts one split's token stream into shards, skipping tokens already in finished shards.

    Tokens arrive as (doc, offset, ids) where ``offset`` is the position of ids[0] in the document;
    a finished shard records the position of the next token, which is where a resumed run goes on.
    """

    def __init__(self, out: Path, split: str, shard_size: int, shards: list[int], next_pos, on_shard, claim,
                 record=lambda name, data: None):
        self.out, self.split, self.shard_size = out, split, shard_size
        self.shards = list(shards)  # token counts of the finished shards
        self.resume = tuple(next_pos)  # tokens before this (doc, offset) are already written
        self.done = tuple(next_pos)  # where the token after the last finished shard is
        self.end = tuple(next_pos)  # where the token after the last one received is
        self.on_shard, self.claim, self.record = on_shard, claim, record
        self.buf: list[np.ndarray] = []
        self.n = 0

    def add(self, doc: int, offset: int, ids: np.ndarray) -> None:
        rdoc, roff = self.resume
        if doc < rdoc:
            return
        if doc == rdoc and offset < roff:
            ids, offset = ids[roff - offset:], roff
        if len(ids) == 0:
            return
        self.buf.append(ids)
        self.n += len(ids)
        while self.n >= self.shard_size:
            flat = np.concatenate(self.buf)
            rest = flat[self.shard_size:]
            # the rest is a suffix of ids, since the buffer held less than a shard before them
            self._write(flat[: self.shard_size], (doc, offset + len(ids) - len(rest)))
            self.buf, self.n = ([rest] if len(rest) else []), len(rest)
        self.end = (doc, offset + len(ids))

    def finish(self) -> None:
        if self.n:
            self._write(np.concatenate(self.buf), self.end)
            self.buf, self.n = [], 0

    def _write(self, ids: np.ndarray, next_pos) -> None:
        name = shard_name(self.split, len(self.shards))
        self.claim(name)  # recorded as prepare's own before the file exists
        data = ids.astype("<u2", copy=False).tobytes()
        self.record(name, data)  # its size and sha256 recorded before it exists under its name
        _write_file(self.out / name, data)  # a shard exists under its name only when complete
        self.shards.append(len(ids))
        self.done = tuple(next_pos)
        self.on_shard(self)


def _write_file(path: Path, data: bytes | str) -> None:
    """Write ``path`` atomically; a full disk or another write error (the partial file removed) is one
    line (finished shards stay: prepare resumes from them)."""
    try:
        safeio.write_atomically(path, data)
    except OSError as exc:
        raise DataError(f"{path}: cannot write it ({exc.strerror or exc}); prepare resumes from the "
                        f"finished shards when run again") from None


def _write_json(path: Path, obj) -> None:
    _write_file(path, json.dumps(obj, indent=1) + "\n")


def _read_json(path: Path):
    try:
        return safeio.read_json(path)  # a FIFO, /dev/zero, garbage or a deep nest: None, as a missing file
    except (OSError, ValueError):
        return None


def _shards_ok(out: Path, split: str, sizes: list[int]) -> str | None:
    """None if every listed shard is on disk with its size, else what is wrong."""
    for i, n in enumerate(sizes):
        path = out / shard_name(split, i)
        if not path.is_file():
            return f"{path.name} is missing"
        if path.stat().st_size != 2 * n:
            return f"{path.name} has {path.stat().st_size} bytes, expected {2 * n}"
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def _locked(out: Path):
    """Serialise concurrent prepares of one directory (e.g. several ranks starting together)."""
    import fcntl

    with open(out / ".lock", "a") as f:  # "a": opening changes nothing, not even the mtime
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------- the prepared folder


def _refuse_target(out: Path) -> None:
    """Refuse a prepared folder that is obviously wrong: a filesystem root, home, the working directory."""
    where = out.resolve()
    cwd = Path.cwd().resolve()
    try:
        home = Path.home().resolve()
    except (RuntimeError, KeyError):  # no home folder known
        home = None
    if where.parent == where:
        what = "a filesystem root"
    elif where == home:
        what = "your home folder"
    elif where == cwd:
        what = "the working directory"
    elif where in cwd.parents:
        what = "a folder that holds the working directory"
    elif home is not None and where in home.parents:
        what = "a folder that holds your home folder"
    else:
        return
    raise DataError(f"prepared folder {out} is {what}; set data.prepared_dir to a folder of its own (e.g. data/NAME)")


def _recorded(path: Path) -> set[str] | None:
    """The files a state file of prepare's (meta.json, progress.json) records as prepare's own, or
    None if ``path`` is not one; only names of prepare's own kind count, whatever the file says."""
    state = _read_json(path)
    inputs = state.get("inputs") if isinstance(state, dict) else None
    if not (isinstance(inputs, dict) and "format" in inputs and "tokenizer" in inputs
            and isinstance(state.get("splits"), dict)):
        return None
    if "files" in state:
        names = state["files"] if isinstance(state["files"], list) else []
    else:  # written before prepare listed its files: its shards, the tokenizer and itself
        names = ["tokenizer.json"] + [shard_name(s, i) for s, sp in state["splits"].items()
                                      if isinstance(sp, dict) and isinstance(sp.get("shards"), list)
                                      for i in range(len(sp["shards"]))]
    return {n for n in names if isinstance(n, str) and _OWN_NAME.fullmatch(n)} | {path.name}


def _own_files(out: Path) -> tuple[set[str], set[str]]:
    """The files in ``out`` prepare recorded as its own, and those an unfinished preparation
    (progress.json) recorded, whose NAME.tmp is its own too; raises DataError if ``out`` is not a
    new or empty folder or one that prepare wrote."""
    if not out.exists():
        return set(), set()
    if not out.is_dir():
        raise DataError(f"prepared folder {out} is a file; set data.prepared_dir to a folder")
    if not any(p.name != ".lock" for p in out.iterdir()):
        return set(), set()
    done, writing = (_recorded(out / name) or set() for name in STATE_FILES)
    if not done | writing:
        raise DataError(f"prepared folder {out} is not empty and was not prepared by playattention (no meta.json or "
                        f"progress.json of its own); set data.prepared_dir to a new or empty folder")
    return done | writing, writing


def _recorded_hashes(path: Path) -> dict[str, dict]:
    """The size and sha256 of each file a state file of prepare's recorded when prepare wrote it."""
    state = _read_json(path)
    hashes = state.get("hashes") if isinstance(state, dict) else None
    return {n: h for n, h in hashes.items() if isinstance(h, dict)} if isinstance(hashes, dict) else {}


class _Folder:
    """The prepared folder and the names prepare recorded in it: the only files it removes or replaces,
    and only while each still has the size and sha256 recorded when prepare wrote it (a state file
    copied from elsewhere names files, but cannot make someone else's content prepare's)."""

    def __init__(self, out: Path):
        self.out = out
        self.owned, self.writing = _own_files(out)
        # an unfinished preparation's record is newer than a finished one's
        self.hashes = {**_recorded_hashes(out / "meta.json"), **_recorded_hashes(out / "progress.json")}
        self.state = lambda: {}  # the rest of progress.json (inputs, splits), set by _prepare

    def record(self, name: str, data: bytes) -> None:
        """Record the size and sha256 of what prepare writes as ``name`` (before it is renamed into place)."""
        self.hashes[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        self.save()

    def check_mine(self, name: str) -> None:
        """DataError unless ``out/name`` is missing, or a regular file with the size and sha256 recorded for it."""
        if name in STATE_FILES:  # the records themselves (what makes them prepare's: see _recorded)
            return
        path = self.out / name
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        entry = self.hashes.get(name, {})
        if not (stat.S_ISREG(st.st_mode) and st.st_size == entry.get("size") and _sha256(path) == entry.get("sha256")):
            raise DataError(f"{path}: prepare cannot show it wrote this file (not the size and sha256 it recorded "
                            f"when writing it), so it neither removes nor replaces it; move it away or set "
                            f"data.prepared_dir to another folder")

    def refuse_strays(self) -> None:
        """Refuse a file prepare did not record but would write under its name (or NAME.tmp)."""
        for p in self.out.iterdir():
            name = p.name.removesuffix(".tmp")
            if _OWN_NAME.fullmatch(name) and name not in (self.writing if p.name.endswith(".tmp") else self.owned):
                raise DataError(f"{p}: prepare did not write this file but would write one of that name; "
                                f"move it away or set data.prepared_dir to another folder")

    def claim(self, name: str) -> None:
        """Record ``name`` as prepare's own in progress.json before the file is written."""
        if name in self.owned:
            self.check_mine(name)  # it is about to be replaced
            return
        for p in (self.out / name, self.out / (name + ".tmp")):
            if p.exists() or p.is_symlink():
                raise DataError(f"{p}: prepare did not write this file but would write one of that name; "
                                f"move it away or set data.prepared_dir to another folder")
        self.owned.add(name)
        self.writing.add(name)
        self.save()

    def save(self) -> None:
        """Write progress.json: the state and every file prepare may have written."""
        self.owned.add("progress.json")
        self.writing.add("progress.json")
        _write_json(self.out / "progress.json", {**self.state(), "files": sorted(self.owned), "hashes": self.hashes})

    def finish(self, meta: dict) -> None:
        """Write meta.json (the preparation is complete) listing prepare's files, then drop progress.json."""
        self.claim("meta.json")
        self.owned.discard("progress.json")
        hashes = {n: h for n, h in self.hashes.items() if n in self.owned}
        _write_json(self.out / "meta.json", {**meta, "files": sorted(self.owned), "hashes": hashes})
        (self.out / "progress.json").unlink(missing_ok=True)

    def clear(self) -> None:
        """Remove the files prepare recorded (and their temporaries), the state files last; each one
        checked first (:meth:`check_mine`), so that a refusal leaves every file in place."""
        for name in self.owned:
            self.check_mine(name)
            tmp = self.out / (name + ".tmp")
            if name in self.writing and tmp.is_symlink():
                raise DataError(f"{tmp}: a symbolic link where prepare writes a temporary file; move it away")
        for name in sorted(self.owned, key=lambda n: n in STATE_FILES):
            (self.out / name).unlink(missing_ok=True)
            if name in self.writing:
                (self.out / (name + ".tmp")).unlink(missing_ok=True)
        self.owned, self.writing, self.hashes = set(), set(), {}


# ----------------------------------------------------------------------------- prepare


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
    _own_files(out)  # refuse someone else's folder before anything is created in it
    out.mkdir(parents=True, exist_ok=True)
    with _locked(out):
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


# ----------------------------------------------------------------------------- reading


def read_meta(prepared: str | Path) -> dict:
    """``meta.json`` of a prepared dataset; raises DataError if it is not one."""
    path = Path(prepared) / "meta.json"
    meta = _read_json(path)
    if meta is None:
        raise DataError(f"{prepared}: not a prepared dataset (no readable meta.json); run `playattention prepare`")
    if meta.get("format") != FORMAT_VERSION:
        raise DataError(f"{prepared}: prepared with data format {meta.get('format')}, this version reads "
                        f"{FORMAT_VERSION}; prepare it again")
    return meta


def tokens_in(prepared: str | Path, split: str) -> int:
    """How many tokens the ``split`` of a prepared dataset holds."""
    meta = read_meta(prepared)
    if split not in meta["splits"]:
        raise DataError(f"{prepared}: no split {split!r} (have: {', '.join(meta['splits'])})")
    return int(meta["splits"][split]["tokens"])


def read_split(prepared: str | Path, split: str) -> list[np.ndarray]:
    """The token shards of one split of a prepared dataset, memory-mapped, in order."""
    meta = read_meta(prepared)
    if split not in meta["splits"]:
        raise DataError(f"{prepared}: no split {split!r} (have: {', '.join(meta['splits'])})")
    entries = meta["splits"][split]["shards"]
    if err := _shards_ok(Path(prepared), split, [e["tokens"] for e in entries]):
        raise DataError(f"{prepared}: {err}; prepare it again")
    # plain ndarray views of the maps: slicing a np.memmap costs ~10x more per window
    return [np.asarray(np.memmap(Path(prepared) / e["file"], dtype="<u2", mode="r")) if e["tokens"]
            else np.zeros(0, dtype="<u2") for e in entries]  # numpy cannot map an empty file


class TokenLoader:
    """Batches of (x, y) token windows for one rank, read through np.memmap.

    Each shard of ``n`` tokens is cut into ``n // T - 1`` windows of ``T + 1`` tokens starting at
    ``phase + j*T`` (``T`` = block_size; x is the first T tokens, y the last T), so windows of an
    epoch never overlap. Every epoch draws, from (seed, epoch), a new phase in [0, T) per shard
    (window edges move, as with nanoGPT's random offsets) and a permutation of all windows (batches
    are well mixed). Batch k of the epoch takes permuted positions [k*B*W, (k+1)*B*W) and rank r
    every W-th of them (W = world_size), so ranks read disjoint windows and all ranks have the
    same number of batches per epoch; the few windows left over at an epoch's end are skipped.
    The state (epoch, cursor) is the same on every rank, so one rank's ``state_dict`` resumes all.
    """

    def __init__(self, prepared: str | Path, split: str, batch_size: int, block_size: int, *,
                 rank: int = 0, world_size: int = 1, seed: int = 0):
        if batch_size < 1 or block_size < 1:
            raise ValueError(f"batch_size and block_size must be positive, got {batch_size} and {block_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.prepared, self.split = Path(prepared), split
        self.batch_size, self.block_size = batch_size, block_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        shards = read_split(self.prepared, split)
        self.tokens = sum(len(s) for s in shards)
        T = block_size
        self._shards = [s for s in shards if len(s) // T - 1 > 0]
        counts = np.array([len(s) // T - 1 for s in self._shards], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(counts)])  # first window index of each shard
        self.n_windows = int(self._starts[-1])
        self.batches_per_epoch = self.n_windows // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            need = (batch_size * world_size + 1) * T
            raise DataError(
                f"the {split} split of {prepared} has {self.tokens:,} tokens: too few for one batch of "
                f"{batch_size} windows of {T + 1} tokens on each of {world_size} rank(s); that needs at "
                f"least {need:,} tokens in a shard (lower batch size or block size, or add data)"
            )
        self.epoch, self.cursor = 0, 0
        self._plan_epoch: int | None = None

    def _plan(self) -> None:
        """This epoch's window phases and order, drawn from (seed, epoch) only."""
        if self._plan_epoch == self.epoch:
            return
        rng = np.random.default_rng([self.seed % 2**63, self.epoch])
        self._phase = rng.integers(0, self.block_size, size=len(self._shards))
        self._order = rng.permutation(self.n_windows)
        self._plan_epoch = self.epoch

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (x, y), int64 CPU tensors of shape (batch_size, block_size); y is x shifted by one."""
        B, T, W = self.batch_size, self.block_size, self.world_size
        if self.cursor + B * W > self.n_windows:  # epoch done: the next one reorders the windows
            self.epoch, self.cursor = self.epoch + 1, 0
        self._plan()
        windows = self._order[self.cursor + self.rank : self.cursor + B * W : W]
        self.cursor += B * W
        shard = np.searchsorted(self._starts, windows, side="right") - 1
        rows = np.empty((B, T + 1), dtype=np.int64)
        for i, (w, s) in enumerate(zip(windows, shard)):
            start = int(self._phase[s]) + int(w - self._starts[s]) * T
            rows[i] = self._shards[s][start : start + T + 1]
        buf = torch.from_numpy(rows)  # (B, T+1)
        return buf[:, :-1].contiguous(), buf[:, 1:].contiguous()  # (B, T) each

    def reset(self) -> None:
        """Start again from the first batch of epoch 0 (e.g. the same val batches every evaluation)."""
        self.epoch, self.cursor = 0, 0

    def state_dict(self) -> dict:
        """JSON-serialisable position; ``load_state_dict`` of it continues with the very next batch."""
        return {"split": self.split, "epoch": self.epoch, "cursor": self.cursor, "seed": self.seed,
                "block_size": self.block_size, "batch_size": self.batch_size,
                "world_size": self.world_size, "tokens": self.tokens}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``; the data, seed and block size must be the ones it came from."""
        for key in ("split", "seed", "block_size", "tokens"):
            if state.get(key) != getattr(self, key):
                raise DataError(f"loader state is for {key} {state.get(key)!r}, this loader has "
                                f"{getattr(self, key)!r}; resuming would not read the same data")
        # the cursor counts windows of all ranks, so a changed batch size or world size goes on
        # from the same place in the epoch
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
