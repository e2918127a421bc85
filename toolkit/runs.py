"""`playattention runs`: one line per run folder under a directory, read without running anything.

A run folder is read as data only: recipe.toml with tomllib (its plugins are not loaded), summary.json
and the newest checkpoint's toolkit_state.json with json. A file that is not a regular file (a FIFO, a
device, a folder) is never opened, so nothing waits on it; whatever goes wrong in one folder makes
that folder "broken" with the reason, and the others are still listed.
"""
from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import attrs

from . import checkpoint, safeio
from .recipe import TrainConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

#: the folder `runs` lists by default: where `train` puts run folders (train.out_dir's default)
DEFAULT_DIR = attrs.fields(TrainConfig).out_dir.default


@attrs.frozen
class RunRow:
    name: str
    recipe: str = "?"
    steps: int | None = None
    max_steps: int | None = None
    best_val_loss: float | None = None
    state: str = "broken"  # finished, converted, resumable, broken
    age_s: float | None = None
    note: str = ""  # why it is broken, or the reason an unfinished run stopped


def read_regular(path: Path) -> bytes | None:
    """The bytes of ``path`` if it is a regular file of at most METADATA_LIMIT inside its run folder;
    None if it does not exist. Anything else (a FIFO, a device, a folder) is refused without blocking."""
    if not os.path.lexists(path):
        return None
    return safeio.read_bytes(path, safeio.METADATA_LIMIT, inside=path.parent)


def _json(path: Path) -> dict | None:
    raw = read_regular(path)
    if raw is None:
        return None
    d = safeio.loads_json(raw, path.name)
    if not isinstance(d, dict):
        raise ValueError(f"{path.name} is not a JSON object")
    return d


def _number(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def _newest_state(run: Path) -> dict | None:
    """toolkit_state.json of the newest complete checkpoint (:func:`toolkit.checkpoint.latest`), or None."""
    found = checkpoint.latest(run / "checkpoints")
    return None if found is None else _json(found / checkpoint.STATE_FILE)


def read_run(run: Path, now: float | None = None) -> RunRow:
    """One run folder's row; any problem reading it gives state "broken" and the reason."""
    row = RunRow(run.name)
    try:
        row = attrs.evolve(row, age_s=(now or time.time()) - max(
            os.stat(p).st_mtime for p in (run, run / "metrics.jsonl", run / "summary.json") if os.path.lexists(p)))
        raw = read_regular(run / "recipe.toml")
        if raw is None:
            return attrs.evolve(row, note="no recipe.toml")
        recipe = tomllib.loads(safeio.decode(raw, "recipe.toml"))
        train = recipe.get("train") if isinstance(recipe.get("train"), dict) else {}
        row = attrs.evolve(row, recipe=str(recipe.get("name", "?")),
                           max_steps=train.get("max_steps") if isinstance(train.get("max_steps"), int) else None)
        summary = _json(run / "summary.json")
        if summary is not None and summary.get("status") in ("finished", "converted"):
            steps = summary.get("steps")
            return attrs.evolve(row, state=summary["status"], steps=steps if isinstance(steps, int) else None,
                                best_val_loss=_number(summary.get("best_val_loss")))
        state = _newest_state(run)
        stopped = f"{summary['status']}" if summary is not None and isinstance(summary.get("status"), str) else ""
        if state is None:
            return attrs.evolve(row, note=", ".join(filter(None, [stopped, "no complete checkpoint"])))
        return attrs.evolve(row, state="resumable", steps=state.get("step"), note=stopped,
                            best_val_loss=_number(state.get("best_val_loss")))
    except (OSError, ValueError, tomllib.TOMLDecodeError) as exc:  # UnicodeDecodeError, JSONDecodeError
        said = str(exc).replace(f"{run}{os.sep}", "")  # the file's name within the run, not its whole path
        return attrs.evolve(row, state="broken", note=said.splitlines()[0][:120] if said else type(exc).__name__)


def find_runs(root: str | Path) -> list[RunRow]:
    """A row for every folder under ``root`` that holds a recipe.toml (a run folder), newest first."""
    root = Path(root)
    now = time.time()
    rows = []
    for child in sorted(root.iterdir()):
        try:
            if child.is_symlink() or not child.is_dir() or not os.path.lexists(child / "recipe.toml"):
                continue
        except OSError:
            continue
        rows.append(read_run(child, now))
    return sorted(rows, key=lambda r: (r.age_s is None, r.age_s or 0.0))


def age(seconds: float | None) -> str:
    """``42s``, ``5m``, ``3h``, ``2d``."""
    if seconds is None:
        return "?"
    s = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s // size}{unit}"
    return f"{s}s"


def render_runs(rows: list[RunRow]) -> str:
    """The table: run, recipe, steps done/total, best val loss, state, age (and a note)."""
    table = [("run", "recipe", "steps", "best val", "state", "age", "")]
    for r in rows:
        steps = f"{'?' if r.steps is None else r.steps}/{'?' if r.max_steps is None else r.max_steps}"
        loss = "-" if r.best_val_loss is None else f"{r.best_val_loss:.4f}"
        table.append((r.name, r.recipe, steps, loss, r.state, age(r.age_s), r.note))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table)
