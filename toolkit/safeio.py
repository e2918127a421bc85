"""The one way the toolkit opens a file of a run folder, a Hugging Face folder, prepared data or an eval file.

Only a regular file is read: a FIFO would block the open (or the read) for ever, a device
(``/dev/zero``) never end, a folder or a dangling symlink raise a traceback deep in a parser. Every
open is ``O_NONBLOCK`` (opening a FIFO returns at once; ``fstat`` then refuses it) and, with
``inside``, the file's real path must stay in that folder (a run folder's symlink pointing out of
it is refused; a Hugging Face cache folder, whose files are symlinks to ``../../blobs``, is opened
without ``inside``). Files with a natural bound (JSON and TOML metadata) are read up to ``limit``
bytes; a deep JSON nest or a huge integer is one line, not a RecursionError.

Problems are :class:`UnsafeFile` (an OSError, so existing ``except OSError`` handlers catch it) and
:class:`BadContent` (a ValueError, as json's own errors are); both are UserErrors, one line each.

It is also the one way a file is written whole or not at all: :func:`write_atomically`.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Callable

from .errors import UserError

#: the most bytes read of a metadata file (config.json, toolkit_state.json, summary.json, ...)
METADATA_LIMIT = 64 << 20


class UnsafeFile(UserError, OSError):
    """A path that is not a readable regular file (a FIFO, device, folder, dangling symlink, a symlink out)."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.errno = code  # ENOENT: missing (callers that treat a missing file apart check it)

    def __str__(self) -> str:
        return self.args[0]


class BadContent(UserError, ValueError):
    """A file that opened but is not what it should be (not UTF-8, not JSON, too large, too deep)."""


def kind_of(mode: int) -> str:
    kinds = [(stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")]
    return next((name for test, name in kinds if test(mode)), "not a plain file")


def open_regular(path: str | Path, inside: str | Path | None = None):
    """``path`` opened for binary reading if it is a regular file (inside ``inside``, if given); else UnsafeFile."""
    path = Path(path)
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; fstat below refuses it
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except ValueError:  # a NUL byte in the path
        raise UnsafeFile(f"{path!r}: a file name cannot contain a NUL byte") from None
    except OSError as exc:
        if exc.errno == errno.ENOENT and path.is_symlink():
            raise UnsafeFile(f"{path}: a symlink to {os.readlink(path)}, which does not exist") from None
        raise UnsafeFile(f"{path}: cannot be read ({exc.strerror or exc})", exc.errno) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise UnsafeFile(f"{path}: is {kind_of(mode)}, not a regular file")
        if inside is not None:
            root, real = os.path.realpath(inside), os.path.realpath(path)
            if os.path.commonpath([root, real]) != root:
                raise UnsafeFile(f"{path}: a symlink to {real}, outside {inside}")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def problem(path: str | Path, inside: str | Path | None = None) -> str | None:
    """Why ``path`` would be refused by :func:`open_regular` (one line), or None; a missing file is not a problem."""
    try:
        open_regular(path, inside).close()
    except UnsafeFile as exc:
        if exc.errno == errno.ENOENT and not Path(path).is_symlink():
            return None
        return str(exc)
    return None


def read_bytes(path: str | Path, limit: int | None = None, inside: str | Path | None = None) -> bytes:
    """The bytes of a regular file; BadContent if it holds more than ``limit``."""
    with open_regular(path, inside) as f:
        try:
            data = f.read() if limit is None else f.read(limit + 1)
        except OSError as exc:
            raise UnsafeFile(f"{path}: cannot be read ({exc.strerror or exc})", exc.errno) from None
    if limit is not None and len(data) > limit:
        raise BadContent(f"{path}: larger than {limit:,} bytes, the limit for this file")
    return data


def read_text(path: str | Path, limit: int | None = METADATA_LIMIT, inside: str | Path | None = None) -> str:
    """The UTF-8 text of a regular file; BadContent if it is not UTF-8."""
    return decode(read_bytes(path, limit, inside), path)


def decode(data: bytes, where) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadContent(f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def loads_json(text: str | bytes, where) -> object:
    """Parse JSON; a problem (invalid, too deep, an integer too long) is BadContent naming ``where``."""
    if isinstance(text, bytes):
        text = decode(text, where)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadContent(f"{where}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except RecursionError:  # the C scanner counts its depth against the recursion limit
        raise BadContent(f"{where}: nested too deep (arrays and objects)") from None
    except ValueError as exc:  # an integer past Python's digit limit
        raise BadContent(f"{where}: not valid JSON ({(str(exc).splitlines() or [''])[0]})") from None


def read_json(path: str | Path, limit: int | None = METADATA_LIMIT, inside: str | Path | None = None) -> object:
    """A regular file's JSON (at most ``limit`` bytes); UnsafeFile or BadContent."""
    return loads_json(read_bytes(path, limit, inside), path)


def read_jsonl(path: str | Path, inside: str | Path | None = None) -> list[dict]:
    """The objects of a JSON-lines file such as metrics.jsonl, in order; a damaged line (a torn last
    line, not UTF-8 or not JSON, nested too deep, an integer too long, not an object) is skipped."""
    rows = []
    for line in read_bytes(path, inside=inside).decode("utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


# -- writing ---------------------------------------------------------------------------------------
def write_atomically(path: str | Path, data: bytes | str | Callable[[Path], object]) -> Path:
    """Write ``path`` whole or not at all: NAME.tmp beside it (``data``, or what ``data(tmp)`` writes
    there), fsynced, renamed over it, the folder fsynced; on any failure the temporary is removed
    and the error raised as it came (callers turn a full disk into their own one line)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        if callable(data):
            data(tmp)
        else:
            with open(tmp, "wb") as f:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
        fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync(path.parent)  # the rename itself survives a power cut only once the folder is on disk
    return path


def fsync(path: str | Path) -> None:
    """Flush a file or folder to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_of(path: str | Path, inside: str | Path | None = None) -> str:
    """The file's sha256 (hex), read in 8 MiB chunks; only a regular file (:func:`open_regular`)."""
    digest = hashlib.sha256()
    with open_regular(path, inside) as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()
