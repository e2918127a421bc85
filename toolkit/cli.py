"""The `playattention` command line (also `python -m toolkit`).

Each subcommand is a small function here that parses arguments and calls into the module that
owns the work. Problems a user can fix (bad recipe, missing file) print one line per problem to
stderr and exit 2; nothing is lost and no traceback is shown.
"""
from __future__ import annotations

import argparse
import os
import sys

from .config import ConfigError
from .plugin_manager import PluginLoadError
from .registry import RegistryError


class UsageError(Exception):
    """A problem with the command line or the files it names; printed as one line, exit 2."""


def cmd_plugins(args) -> int:
    from .plugin_manager import get_plugin_manager

    pm = get_plugin_manager()
    for spec in args.plugin:
        pm.add(spec)
    print(render_plugins(pm))
    return 1 if pm.failures and args.strict else 0


def render_plugins(pm) -> str:
    from .registry import FAMILIES

    reg = pm.registry
    lines = []
    for family in FAMILIES:
        lines.append(f"{family}:")
        for name in reg.names(family):
            comp = reg.get(family, name)
            lines.append(f"  {name:<16} {comp.doc}")
            lines.append(f"  {'':<16} from {comp.source}")
            for opt, typ, default in comp.option_fields():
                lines.append(f"  {'':<16}   {opt}: {typ} = {default!r}")
        lines.append("")
    if pm.failures:
        lines.append("failed plugins:")
        lines.extend(f"  {f}" for f in pm.failures)
    return "\n".join(lines).rstrip()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="playattention", description=__doc__.splitlines()[0])
    parser.add_argument("--trace", action="store_true", help="show which plugin registered what")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("plugins", help="list every registered component with its options and source")
    p.add_argument("--plugin", action="append", default=[], help="also load this plugin file or module")
    p.add_argument("--strict", action="store_true", help="exit 1 if any plugin failed to load")
    p.set_defaults(func=cmd_plugins)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.trace:
        os.environ["PLAYATTENTION_TRACE"] = "1"
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        for line in exc.lines:
            print(f"error: {line}", file=sys.stderr)
        return 2
    except (UsageError, PluginLoadError, RegistryError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
