"""`playattention completion`: a shell completion script."""
from __future__ import annotations

import argparse

from .. import completion
from ..cli import add_plugin_commands, build_parser
from ..plugin_manager import default_registry


def cmd_completion(args) -> int:
    parser, registry = build_parser(), default_registry()
    add_plugin_commands(parser._subparsers._group_actions[0], registry)  # installed plugins' commands too
    print(completion.script(args.shell, parser, registry), end="")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Print a completion script for commands, recipe files and --set keys. "
                     "Load it with `source <(playattention completion bash)` (or zsh) in your shell's rc file.")
    p.add_argument("shell", choices=completion.SHELLS)
    p.set_defaults(func=cmd_completion)
