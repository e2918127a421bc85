"""`playattention diff`: key-by-key differences of two resolved recipes or run folders (no torch: the
models are not built, `recipe validate` does that)."""
from __future__ import annotations

import argparse
import sys

from ..errors import one_line
from ..recipe import diff_data, load_for_reading
from . import add_recipe_options


def cmd_diff(args) -> int:
    (_, a, held_a), (_, b, held_b) = (load_for_reading(r, args.set, args.plugin) for r in (args.a, args.b))
    for path, line in [*((args.a, ln) for ln in held_a), *((args.b, ln) for ln in held_b)]:
        print(f"warning: {path}: {one_line(line)}", file=sys.stderr)
    lines = diff_data(a, b)
    if lines:
        print("\n".join(lines))
    return 1 if lines else 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Print `key: a -> b` for every resolved key that differs. "
                     "Exit status as diff(1): 0 same, 1 different, 2 error.")
    p.add_argument("a", help="recipe TOML file or run folder")
    p.add_argument("b", help="recipe TOML file or run folder")
    add_recipe_options(p)
    p.set_defaults(func=cmd_diff)
