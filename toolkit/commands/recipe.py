"""`playattention recipe show|list|validate|copy`: work with recipes.

`show`, `list` and `copy` read files and the registry's options classes only, so they import no torch;
`validate` also builds the model on the meta device (:mod:`toolkit.commands.recipe_validate`,
imported when it runs)."""
from __future__ import annotations

import argparse
import os
import sys

import tomli_w

from .. import catalog
from ..errors import one_line
from ..recipe import load_for_reading, recipe_warnings
from . import add_recipe_options


def cmd_recipe_show(args) -> int:
    recipe, data, held = load_for_reading(args.recipe, args.set, args.plugin)
    for line in held:
        print(f"warning: {args.recipe}: {one_line(line)}", file=sys.stderr)
    if recipe is not None:
        print_warnings(recipe, args.recipe)
    print(tomli_w.dumps(data), end="")
    return 0


def cmd_recipe_list(args) -> int:
    print(catalog.render_list())
    return 0


def cmd_recipe_copy(args) -> int:
    written = catalog.copy_recipe(args.name, args.dest)
    bases = f" (with {', '.join(str(p) for p in written[1:])}, which it extends)" if written[1:] else ""
    print(f"wrote {written[0]}{bases}; train it with: playattention train {written[0]}")
    return 0


def print_warnings(recipe, path) -> None:
    """``warning: <recipe>: <line>`` on stderr for each of :func:`recipe_warnings` (rank 0 only)."""
    if int(os.environ.get("RANK", "0")) == 0:
        for line in recipe_warnings(recipe):
            print(f"warning: {path}: {one_line(line)}", file=sys.stderr)


def add_arguments(p: argparse.ArgumentParser) -> None:
    recipe_sub = p.add_subparsers(dest="recipe_command", required=True, metavar="ACTION")
    q = recipe_sub.add_parser("show", help="print the fully resolved recipe as TOML (extends and --set applied)")
    q.add_argument("recipe", help="recipe TOML file or run folder")
    add_recipe_options(q)
    q.set_defaults(func=cmd_recipe_show)
    q = recipe_sub.add_parser("list", help="the shipped recipes with their one-line descriptions")
    q.set_defaults(func=cmd_recipe_list)
    q = recipe_sub.add_parser("validate", help="check recipe files: exit 0 if all are valid, 2 otherwise",
                              description="Resolve and check each FILE as train would: `FILE: ok`, or one line "
                              "per problem. Exit status 0 if every file is valid, 2 otherwise.")
    q.add_argument("files", nargs="+", metavar="FILE", help="recipe TOML files or run folders")
    add_recipe_options(q)
    q.set_defaults(func="toolkit.commands.recipe_validate:cmd_recipe_validate")  # it imports torch
    q = recipe_sub.add_parser("copy", help="copy a shipped recipe to start from (never overwrites)")
    q.add_argument("name", metavar="NAME", help="a shipped recipe (`playattention recipe list`), e.g. gpt-cpu")
    q.add_argument("dest", metavar="DEST", help="the new file, or a folder to copy it into")
    q.set_defaults(func=cmd_recipe_copy)
