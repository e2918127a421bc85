"""The `playattention` command line (also `python -m toolkit`).

Each subcommand is a module of :mod:`toolkit.commands`, named in :data:`COMMANDS` with its one-line
summary and imported only when that command runs (as pip does): `playattention --help` and the light
commands never import torch or DeepSpeed for the heavy ones. Installed plugin packages add commands
through ``register_commands``. Problems a user can fix (bad recipe, missing file) print one line per
problem to stderr and exit 2; nothing is lost and no traceback is shown.
"""
from __future__ import annotations

import time

STARTED = time.perf_counter()  # before the imports: `train --verbose` reports how long they take
IMPORTED = None  # when the command's module was imported (main() imports it)

import argparse
import errno
import importlib
import os
import sys

from .commands import MAX_ERROR_LINES, print_errors  # noqa: F401 - MAX_ERROR_LINES: part of the CLI's interface
from .errors import ConfigError, UserError
from .plugin_manager import PluginManager, forget_loaded, trust
from .registry import Registry

#: every built-in command: its module (``add_arguments(parser)`` sets what runs it) and its one-line summary
COMMANDS = {
    "plugins": ("toolkit.commands.plugins", "list every registered component with its options and source"),
    "recipe": ("toolkit.commands.recipe", "work with recipes (see docs/recipes.md)"),
    "inspect": ("toolkit.commands.inspect",
                "parameters, FLOPs, batch arithmetic, DeepSpeed config and memory of a recipe"),
    "diff": ("toolkit.commands.diff", "key-by-key differences of two resolved recipes or run folders"),
    "prepare": ("toolkit.commands.prepare", "tokenize a recipe's [data] (or --input files) into token shards"),
    "train": ("toolkit.commands.train", "train a recipe through DeepSpeed into a run folder"),
    "convert": ("toolkit.commands.convert",
                "a Hugging Face folder into a run folder, or a run into a Hugging Face folder"),
    "generate": ("toolkit.commands.generate",
                 "sample text from a run, a checkpoint or a Hugging Face folder, streamed"),
    "eval": ("toolkit.commands.eval",
             "run evaluators (hellaswag, perplexity, ...) on a run, a checkpoint or a HF folder"),
    "attention": ("toolkit.commands.attention",
                  "what each attention head attends to: heatmaps, a page to explore, statistics"),
    "ablate": ("toolkit.commands.ablate", "train a grid of component swaps and write a comparison report"),
    "coordcheck": ("toolkit.commands.coordcheck", "mean activation per layer kind across widths after a few steps, "
                   "standard vs mup (docs/mup.md)"),
    "runs": ("toolkit.commands.runs", "a table of run folders: recipe, steps, best val loss, state, age"),
    "completion": ("toolkit.commands.completion", "print a shell completion script (bash or zsh)"),
}


def build_parser(commands=None) -> argparse.ArgumentParser:
    """The parser with every command; the arguments of those in ``commands`` (default all: imports every module)."""
    parser = argparse.ArgumentParser(prog="playattention", description=__doc__.splitlines()[0])
    parser.add_argument("--trace", action="store_true", help="show which plugin registered what")
    # the deepspeed launcher runs `playattention --local_rank=N train ...` (LOCAL_RANK is also in the env)
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, summary) in COMMANDS.items():
        p = sub.add_parser(name, help=summary)
        if commands is None or name in commands:
            importlib.import_module(module).add_arguments(p)
    return parser


def command_of(argv: list[str]) -> str | None:
    """The command word of ``argv``: the first word that is not a top-level option or its value."""
    words = iter(argv)
    for word in words:
        if word == "--":
            return next(words, None)
        if len(word) > 2 and ("--local_rank".startswith(word) or "--local-rank".startswith(word)):  # or a prefix
            next(words, None)  # its value
        elif not word.startswith("-"):
            return word
    return None


def add_plugin_commands(sub, registry: Registry) -> None:
    """A subcommand for every registered ``command``: ``factory(parser)`` adds its arguments and returns its run(args)."""
    for name in registry.names("command"):
        comp = registry.get("command", name)
        if name in sub.choices:
            print(f"warning: command {name!r} from {comp.source} is not added: a built-in command has that name",
                  file=sys.stderr)
            continue
        p = sub.add_parser(name, help=f"{comp.doc} (from {comp.source})", description=comp.doc)
        p.set_defaults(func=comp.factory(p))


NAME_MAX = 255  # Linux and macOS


def main(argv: list[str] | None = None) -> int:
    global IMPORTED
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--trace" in argv[: argv.index("--") if "--" in argv else len(argv)]:
        os.environ["PLAYATTENTION_TRACE"] = "1"
        forget_loaded()  # load again, so the built-ins' registrations are traced too
    command = command_of(argv)
    parser = build_parser({command})  # imports only the module of the command that runs
    IMPORTED = IMPORTED or time.perf_counter()  # the first call: the command's imports are done
    try:
        if command not in COMMANDS:  # --help, a typo or a plugin's command: installed packages' commands too
            add_plugin_commands(parser._subparsers._group_actions[0], PluginManager(builtins=False).registry)
        args = parser.parse_args(argv)
        # plugin files run only with consent: those the user names on this command line, or all with --trust-plugins
        trust(everything=getattr(args, "trust_plugins", False), files=getattr(args, "plugin", None) or ())
        func = args.func
        if isinstance(func, str):  # "module:function": an action whose imports its command's others need not pay
            module, _, name = func.partition(":")
            func = getattr(importlib.import_module(module), name)
        return int(func(args) or 0)
    except ConfigError as exc:
        print_errors(exc.lines)
        return 2
    except (UserError, FileNotFoundError) as exc:
        print_errors([str(exc)])
        return 2
    except OSError as exc:  # a path the OS refuses whole: a name too long; anything else is a bug to see
        if exc.errno != errno.ENAMETOOLONG:
            raise
        name = os.fsdecode(exc.filename or "")
        print_errors([f"{name[:60]}{'...' if len(name) > 60 else ''}: {exc.strerror} ({len(name):,} characters; "
                      f"each name in a path may have {NAME_MAX} bytes at most)"])
        return 2
    except ValueError as exc:  # os functions on a path with a NUL byte
        if "null byte" not in str(exc):
            raise
        print_errors([f"a path contains a NUL byte, which no file name can ({exc})"])
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `playattention inspect ... | head`: the reader left; leave quietly too
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
