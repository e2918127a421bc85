"""The commands of the `playattention` command line, one module each (:data:`toolkit.cli.COMMANDS`).

Each module has ``add_arguments(parser)``, which also sets the function that runs it (``func``); the
CLI imports a command's module only when that command runs, so a light command never pays for the
imports of a heavy one. What several commands share is here."""
from __future__ import annotations

import argparse
import sys

from ..errors import one_line


def add_recipe_options(p: argparse.ArgumentParser) -> None:
    """``--set`` and ``--plugin``, for every command that takes a recipe."""
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, in TOML syntax or a bare word for a string "
                   "(e.g. --set train.lr=3e-4 --set model.attention.kind=gqa); repeatable")
    add_plugin_options(p, "also load this plugin file or module; repeatable")


#: --plugin's help where a command reads or writes Hugging Face folders (convert, generate, eval)
ARCHITECTURE_PLUGINS = "a plugin file or module whose architectures (register_architectures) it may read or write; repeatable"


def add_plugin_options(p: argparse.ArgumentParser, help: str) -> None:
    """``--plugin`` (repeatable) and ``--trust-plugins``."""
    p.add_argument("--plugin", action="append", default=[], metavar="FILE", help=help)
    add_trust_option(p)


def add_trust_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-plugins", action="store_true",
                   help="run plugin files that a recipe or run folder names from outside the current project "
                   "(they are code; see docs/recipes.md)")


#: the most problems printed for one command; the rest are counted ("... and N more")
MAX_ERROR_LINES = 50


def print_errors(lines: list[str]) -> None:
    """``error: <line>`` on stderr for each problem, each on one line, at most MAX_ERROR_LINES of them."""
    shown = lines[:MAX_ERROR_LINES]
    for line in shown:
        print(f"error: {one_line(line)}", file=sys.stderr)
    if len(lines) > len(shown):
        print(f"error: ... and {len(lines) - len(shown):,} more", file=sys.stderr)
