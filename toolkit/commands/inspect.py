"""`playattention inspect`: parameters, FLOPs, batch arithmetic, DeepSpeed config and memory of a recipe."""
from __future__ import annotations

import argparse

from ..errors import UsageError
from ..inspection import inspect_recipe
from ..probe import load_buildable
from . import add_recipe_options
from .exports import add_no_verify, check_export


def cmd_inspect(args) -> int:
    if args.world_size < 1:
        raise UsageError(f"--world-size must be >= 1, got {args.world_size}")
    check_export(args.recipe, args.no_verify)
    print(inspect_recipe(load_buildable(args.recipe, args.set, args.plugin), args.world_size, args.recipe))
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe TOML file or run folder")
    p.add_argument("--world-size", type=int, default=1, metavar="N", help="number of GPUs (default 1)")
    add_recipe_options(p)
    add_no_verify(p)
    p.set_defaults(func=cmd_inspect)
