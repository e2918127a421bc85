"""`playattention eval`: run evaluators on a run, a checkpoint or a Hugging Face folder."""
from __future__ import annotations

import argparse

from ..errors import UsageError
from ..evaluate import evaluate_target, render_results, write_results
from ..engine import on_cuda
from . import ARCHITECTURE_PLUGINS, add_plugin_options
from .exports import add_no_verify, check_export


def cmd_eval(args) -> int:
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    check_export(args.target, args.no_verify)
    results = evaluate_target(args.target, args.task, device=args.device or ("cuda" if on_cuda() else "cpu"),
                              batch_size=args.batch_size, plugins=args.plugin)
    if args.json != "-":
        print(render_results(results))
    if args.json:
        write_results(results, args.target, args.json)
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Run evaluators on a finished run folder, a checkpoint of a run (RUN@best, "
                     "RUN@latest, RUN@step-N or its folder), or a Hugging Face folder of any architecture "
                     "convert reads, with the folder's own tokenizer (a GPT-2 folder without one: GPT-2 BPE). "
                     "Each --task is KIND:KEY=VALUE,KEY=VALUE (values as in --set), e.g. "
                     "--task hellaswag:path=hellaswag_val.jsonl,limit=1000 --task perplexity:split=val. "
                     "Without --task: the run's own [[eval]] evaluators.")
    p.add_argument("target", metavar="RUN_OR_HF_FOLDER", help="a finished run folder, RUN@best (any checkpoint), "
                   "or a Hugging Face folder")
    p.add_argument("--task", action="append", default=[], metavar="KIND:KEY=VALUE,...",
                   help="an evaluator and its options; repeatable (`playattention plugins` lists them)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE ('-': only JSON, to stdout)")
    p.add_argument("--batch-size", type=int, metavar="N", help="rows per forward (default the run's train.micro_batch)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default cuda if available)")
    add_no_verify(p)
    add_plugin_options(p, ARCHITECTURE_PLUGINS)
    p.set_defaults(func=cmd_eval)
