"""`playattention convert`: a Hugging Face folder into a run folder, or a run into a Hugging Face folder."""
from __future__ import annotations

import argparse

from ..convert import hf_to_run, run_to_hf
from ..errors import UsageError
from . import ARCHITECTURE_PLUGINS, add_plugin_options
from .exports import add_no_verify, check_export


def cmd_convert(args) -> int:
    if args.to == "run":
        if args.arch:
            raise UsageError("--arch chooses what --to hf writes; a Hugging Face folder says its own architecture")
        s = hf_to_run(args.source, args.out, plugins=args.plugin)
        tok = f"tokenizer {s['tokenizer']}" if s["tokenizer"] else "no tokenizer (train with a recipe that names one)"
        print(f"converted {s['hf_class']} ({s['params']:,} parameters, {tok}) into {s['run_dir']}\n"
              f"  generate: playattention generate {s['run_dir']} --prompt 'The' --temperature 0\n"
              f"  train:    playattention train --init-from {s['run_dir']} --set model.block_size=256")
        return 0
    check_export(args.source, args.no_verify)
    s = run_to_hf(args.source, args.out, model_type=args.arch, plugins=args.plugin)
    print(f"wrote {s['hf_class']} into {s['out']} ({', '.join(s['files'])}); "
          f"load it with transformers.AutoModelForCausalLM.from_pretrained({s['out']!r})")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Convert HF_DIR (config.json + weights + tokenizer) into a run folder that "
                     "generate, train --init-from and ablations take; or with --to hf a finished run into a "
                     "folder transformers' from_pretrained loads. Architectures: `playattention plugins "
                     "architecture`. See docs/hf.md.")
    p.add_argument("source", metavar="HF_DIR_OR_RUN_DIR", help="with --to hf also a checkpoint of a run "
                   "(RUN@best, RUN@latest, RUN@step-N or its folder)")
    p.add_argument("out", metavar="OUT_DIR", help="a new or empty folder")
    p.add_argument("--to", choices=("run", "hf"), default="run", help="run: HF_DIR -> run folder (default); "
                   "hf: RUN_DIR -> Hugging Face folder")
    p.add_argument("--arch", help="with --to hf: the architecture (model_type) to write "
                   "(default: the first that can express the model)")
    add_no_verify(p)
    add_plugin_options(p, ARCHITECTURE_PLUGINS)
    p.set_defaults(func=cmd_convert)
