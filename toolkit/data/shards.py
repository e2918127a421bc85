"""The prepared folder: its shards, meta.json and progress.json, and which files in it are prepare's own.

Shards are written under a temporary name and renamed when complete; ``progress.json`` then
records where the next shard starts (document, offset), so an interrupted run resumes without
re-tokenizing the finished part; ``meta.json`` is written last.

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
import os
import re
import stat
import time
from pathlib import Path

import numpy as np

from .. import safeio
from ..errors import DataError

FORMAT_VERSION = 1
SPLITS = ("train", "val")
# The only names prepare writes in its folder (each also as NAME.tmp while it is being written):
# it removes or replaces no other file, and these only once its state files list them.
_OWN_NAME = re.compile(r"(?:train|val)_\d{6}\.bin|tokenizer\.json|meta\.json|progress\.json")
STATE_FILES = ("meta.json", "progress.json")


def prepared_dir(data) -> Path:
    """Where ``data`` (a DataConfig) is prepared: its ``prepared_dir`` or ``data/<dataset>-<tokenizer>``."""
    if data.prepared_dir:
        return Path(data.prepared_dir).expanduser()
    return Path("data") / f"{data.dataset}-{data.tokenizer.kind}"


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


#: how often a prepare waiting for another one's lock says so
WAIT_NOTICE_S = 10.0


def _preparing_elsewhere(out: Path) -> bool:
    """Whether another process holds ``out``'s prepare lock now: its folder may look half written
    (a tokenizer.json before any state file), so it is judged once that prepare is done."""
    import fcntl

    lock = out / ".lock"
    if lock.is_symlink() or not lock.is_file():  # only prepare's own lock file, never created here
        return False
    with open(lock, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


@contextlib.contextmanager
def _locked(out: Path, say=lambda msg: None):
    """Serialise concurrent prepares of one directory (several ranks, or an ablation's parallel runs,
    starting together). One that must wait says on what, and for how long every WAIT_NOTICE_S."""
    import fcntl

    with open(out / ".lock", "a") as f:  # "a": opening changes nothing, not even the mtime
        start, told = time.monotonic(), None
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                now = time.monotonic()
                if told is None or now - told >= WAIT_NOTICE_S:
                    say(f"{out}: another process is preparing this folder; waiting for it to finish "
                        f"({now - start:.0f} s so far)")
                    told = now
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


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
        if not (stat.S_ISREG(st.st_mode) and st.st_size == entry.get("size") and safeio.sha256_of(path) == entry.get("sha256")):
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
