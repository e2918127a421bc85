"""`playattention prepare`: tokenize a recipe's [data] (or --input files) into token shards."""
from __future__ import annotations

import argparse
import os

from .. import families
from ..data import prepare
from ..errors import UsageError
from ..plugin_manager import default_registry
from ..probe import load_buildable
from ..recipe import DataConfig, registry_of
from ..registry import Registry
from . import add_recipe_options


def cmd_prepare(args) -> int:
    if args.recipe and args.input:
        raise UsageError("give a RECIPE or --input files, not both")
    if args.recipe:
        if args.tokenizer or args.tokenizer_file or args.text_column or args.out or args.val_fraction is not None:
            raise UsageError("--tokenizer, --tokenizer-file, --text-column, --out and --val-fraction go with --input; "
                             "with a recipe use --set data.KEY=VALUE")
        recipe = load_buildable(args.recipe, args.set, args.plugin)
        data, registry = recipe.data, registry_of(recipe)
    elif args.input:
        if args.set or args.plugin:
            raise UsageError("--set and --plugin go with a RECIPE, not with --input")
        for given in args.input:
            if not os.path.exists(given):
                raise UsageError(f"--input {given}: no such file or folder")
        registry = default_registry()
        tokenizer = input_tokenizer(args, registry)
        try:
            data = DataConfig(
                dataset=os.path.splitext(os.path.basename(os.path.normpath(args.input[0])))[0],
                tokenizer=tokenizer, paths=list(args.input), prepared_dir=args.out,
                val_fraction=0.1 if args.val_fraction is None else args.val_fraction,
                text_column=args.text_column or "text",
            )
        except ValueError as exc:
            raise UsageError(f"--val-fraction: {exc}") from None
    else:
        raise UsageError("give a RECIPE to prepare its [data], or --input FILE_OR_DIR... (see --help)")
    out = prepare(data, registry=registry, workers=args.workers, shard_size=args.shard_size, progress=not args.quiet)
    print(out)
    return 0


def input_tokenizer(args, registry: Registry):
    """``prepare --input``'s tokenizer: a registered kind (default gpt2); ``hf`` reads --tokenizer-file."""
    kind = args.tokenizer or "gpt2"
    comp = registry.get("tokenizer", kind)  # UnknownComponentError: the registered kinds, a did-you-mean
    if kind == "hf":
        if not args.tokenizer_file:
            raise UsageError("--tokenizer hf needs --tokenizer-file FILE (a Hugging Face tokenizer.json or a folder holding one)")
        if not os.path.exists(args.tokenizer_file):
            raise UsageError(f"--tokenizer-file {args.tokenizer_file}: no such file or folder")
        return families.SPEC_TYPES["tokenizer"]("hf", comp.options(path=args.tokenizer_file))
    if args.tokenizer_file:
        raise UsageError(f"--tokenizer-file goes with --tokenizer hf, not with {kind}")
    return kind


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Tokenize text into uint16 token shards plus a validation split. "
                     "Finished shards are kept, so re-running is instant and an interrupted run resumes.")
    p.add_argument("recipe", nargs="?", help="recipe TOML whose [data] to prepare")
    add_recipe_options(p)
    p.add_argument("--input", nargs="+", metavar="FILE_OR_DIR", help=".txt/.jsonl files or folders, without a recipe")
    p.add_argument("--tokenizer", metavar="KIND", help="with --input: a registered tokenizer, char, gpt2 (default) "
                   "or hf (with --tokenizer-file)")
    p.add_argument("--tokenizer-file", metavar="FILE", help="with --tokenizer hf: a Hugging Face tokenizer.json "
                   "(or a folder holding one)")
    p.add_argument("--text-column", metavar="NAME", help="with --input: the JSONL field or parquet/datasets column "
                   "that holds the text (default text)")
    p.add_argument("--out", metavar="DIR", help="with --input: where the shards go (default data/<name>-<tokenizer>)")
    p.add_argument("--val-fraction", type=float, help="with --input: share of tokens for validation (default 0.1)")
    p.add_argument("--shard-size", type=int, default=100_000_000, metavar="TOKENS", help="tokens per shard")
    p.add_argument("--workers", type=int, help="tokenizer processes (default: all cores for big inputs)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or messages on stderr")
    p.set_defaults(func=cmd_prepare)
