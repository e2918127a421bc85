"""`playattention generate`: sample text from a run, a checkpoint or a Hugging Face folder."""
from __future__ import annotations

import argparse
import math

import attrs

from ..checkpoint import CHECKPOINT_SELECTORS
from ..convert import load_model
from ..errors import UsageError
from ..generate import encode_prompt, stream_samples
from ..engine import on_cuda
from . import ARCHITECTURE_PLUGINS, add_plugin_options
from .exports import add_no_verify, check_export


def cmd_generate(args) -> int:
    check_export(args.run, args.no_verify)
    if args.num_samples < 1:
        raise UsageError(f"--num-samples must be at least 1, got {args.num_samples}")
    model, tokenizer, recipe, _ = load_model(args.run, args.device or ("cuda" if on_cuda() else "cpu"), args.plugin)
    given = {"prompts": args.prompt, "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
             "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed}
    for name, value in given.items():  # the recipe's own values were checked when it loaded
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"--{name.replace('_', '-')}: must be a finite number, got {value}")
        if isinstance(value, int) and not 0 <= value < 2**63:
            raise UsageError(f"--{name.replace('_', '-')}: must be between 0 and 2**63 - 1, got {value}")
    try:
        cfg = attrs.evolve(recipe.generate, **{k: v for k, v in given.items() if v is not None})
    except ValueError as exc:  # attrs validators: "'temperature' must be >= 0.0: -1.0"
        raise UsageError(f"bad sampling option: {exc}") from None
    for prompt in cfg.prompts:
        try:
            encode_prompt(tokenizer, prompt)
        except ValueError as exc:
            raise UsageError(f"--prompt {prompt!r}: {exc}") from None
    stream_samples(model, tokenizer, cfg.prompts, cfg, num_samples=args.num_samples)
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN_OR_HF_FOLDER", help=f"a finished run folder (or its model.safetensors), "
                   f"a checkpoint of a run (RUN@{'/RUN@'.join(CHECKPOINT_SELECTORS)}, or RUN/checkpoints/step-NNNNNNN), "
                   f"or a Hugging Face folder")
    p.add_argument("--prompt", action="append", help="text to continue (repeatable; default the run's prompts)")
    p.add_argument("--max-new-tokens", type=int, metavar="N")
    p.add_argument("--temperature", type=float, help="0 is greedy")
    p.add_argument("--top-k", type=int, metavar="K", help="keep the K most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling: keep tokens up to probability P")
    p.add_argument("--seed", type=int)
    p.add_argument("--num-samples", type=int, default=1, metavar="N",
                   help="samples per prompt (seeds seed, seed+1, ...)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default cuda if available)")
    add_no_verify(p)
    add_plugin_options(p, ARCHITECTURE_PLUGINS)
    p.set_defaults(func=cmd_generate)
