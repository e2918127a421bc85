"""`playattention runs`: a table of run folders."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UsageError
from ..runs import DEFAULT_DIR, find_runs, render_runs


def cmd_runs(args) -> int:
    root = Path(args.dir or DEFAULT_DIR)
    if not root.is_dir():
        raise UsageError(f"{root}: no such folder of runs" + ("" if args.dir else " (train puts runs here; give DIR)"))
    rows = find_runs(root)
    print(render_runs(rows) if rows else f"no run folders in {root}")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("One line per run folder under DIR: its recipe, steps done of its total, "
                     "best validation loss, state (finished, converted, resumable: has a complete checkpoint, "
                     "broken: neither, with the reason) and age. Reads the folders as data only: no plugin "
                     "code runs.")
    p.add_argument("dir", nargs="?", metavar="DIR", help=f"a folder of run folders (default {DEFAULT_DIR}/)")
    p.set_defaults(func=cmd_runs)
