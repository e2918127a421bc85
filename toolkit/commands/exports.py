"""``--no-verify`` and the check it skips: a run folder's exported files are the ones it exported."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..checkpoint import latest
from ..runfolder import EXPORT_RECORD, WEIGHTS, export_problem
from ..errors import CheckpointError


def add_no_verify(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-verify", action="store_true",
                   help=f"use a run folder's exported files even if they differ from its {EXPORT_RECORD}")


def check_export(target, no_verify: bool = False) -> None:
    """Refuse a run folder whose exported files changed since export (their sha256 is in export.json).

    A folder exported before exports were hashed has no export.json: used, with a warning.
    """
    folder = Path(target)
    folder = folder.parent if folder.is_file() else folder
    if no_verify or not (folder / "recipe.toml").is_file() or not (folder / WEIGHTS).exists():
        return  # not a run folder: an HF folder, a recipe, or a run that has not exported yet
    if not (folder / EXPORT_RECORD).exists() and not (folder / EXPORT_RECORD).is_symlink():
        print(f"warning: {folder}: no {EXPORT_RECORD} (exported before exports were hashed): {WEIGHTS} is used "
              f"unchecked", file=sys.stderr)
        return
    if why := export_problem(folder):
        how = (f"remove it and run playattention train --resume {folder}" if latest(folder / "checkpoints")
               else "convert it again from its source")
        raise CheckpointError(f"{why}; re-export it ({how}) or pass --no-verify")
