"""The input files ``data.paths`` means, and the documents in them.

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

Which documents validate when the split is by document: :func:`is_val_document` (see
:mod:`toolkit.data.pipeline`).
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Iterator

from .. import safeio
from ..errors import DataError, UnknownComponentError
from ..plugin_manager import default_registry
from ..registry import Registry
from .shards import _read_json

INPUT_SUFFIXES = (".txt", ".jsonl", ".parquet")
TABLE_SUFFIXES = (".parquet", ".arrow")  # read with pyarrow; .arrow only from a folder saved by datasets
PARQUET_EXTRA = "pip install playattention[parquet]"


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


def is_val_document(i: int, val_fraction: float) -> bool:
    """Whether document ``i`` validates in the by-document split: every 1/f-th, evenly spread."""
    return math.floor((i + 1) * val_fraction) > math.floor(i * val_fraction)
