"""The `playattention` command line (also `python -m toolkit`).

Each subcommand is a small function here that parses arguments and calls into the module that
owns the work; plugins add commands of their own through ``register_commands``. Problems a user
can fix (bad recipe, missing file) print one line per problem to stderr and exit 2; nothing is
lost and no traceback is shown.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import attrs
import tomli_w

from . import families
from .ablate import run_ablation
from .ablation import dry_run_text, load_ablation
from .checkpoint import check_resumable, find_run
from .convert import hf_to_run, recipe_for_init, run_to_hf
from .data import prepare
from .errors import ConfigError, UsageError, UserError, one_line
from .evaluate import evaluate_target, render_results, write_results
from .generate import encode_prompt, load_run, resolve_run_dir, stream_samples
from .hf import ARCHITECTURES
from .engine import deepspeed_config
from .inspection import check_fits, inspect_recipe
from .launch import LAUNCHER_PID, PARENT_PID, die_with_parent
from .plugin_manager import PluginManager, default_registry, forget_loaded, trust
from .recipe import (DataConfig, diff_data, dump_recipe, load_for_reading, load_recipe, recipe_warnings,
                     registry_of)
from .registry import Registry
from .runfolder import default_run_dir
from .trainer import train


def cmd_plugins(args) -> int:
    pm = PluginManager()
    for spec in args.plugin:
        pm.add(spec)
    print(render_plugins(pm.registry, hooks=args.hooks))
    return 1 if pm.failures and args.strict else 0


def render_plugins(registry: Registry, hooks: bool = False) -> str:
    """Every family with its registered parts: one-line doc, source, options (name: type = default)."""
    lines = []
    if hooks:
        lines.append("hooks (implement any with @hookimpl; see toolkit/families.py):")
        lines += [f"  {hook}(register)  {doc}" for hook, doc in families.HOOKS.items()]
        lines.append("")
    for fam in families.FAMILIES:
        where = f"recipe: {fam.where}" + ("[]" if fam.many else "") if fam.where else "not in recipes"
        lines.append(f"{fam.name}:" if not hooks else f"{fam.name}:  ({fam.hook}; {where}; {fam.contract})")
        for name in registry.names(fam.name):
            comp = registry.get(fam.name, name)
            lines.append(f"  {name:<16} {comp.doc}")
            lines.append(f"  {'':<16} from {comp.source}")
            for opt, typ, default in comp.option_fields():
                lines.append(f"  {'':<16}   {opt}: {typ} " + ("(required)" if default is attrs.NOTHING else f"= {default!r}"))
        if not registry.names(fam.name):
            lines.append("  (none registered)")
        lines.append("")
    if registry.failures:
        lines.append("failed plugins:")
        lines.extend(f"  {f}" for f in registry.failures)
    return "\n".join(lines).rstrip()


def cmd_prepare(args) -> int:
    if args.recipe and args.input:
        raise UsageError("give a RECIPE or --input files, not both")
    if args.recipe:
        if args.tokenizer or args.out or args.val_fraction is not None:
            raise UsageError("--tokenizer, --out and --val-fraction go with --input; with a recipe use --set data.KEY=VALUE")
        recipe = load_recipe(args.recipe, args.set, args.plugin)
        data, registry = recipe.data, registry_of(recipe)
    elif args.input:
        if args.set or args.plugin:
            raise UsageError("--set and --plugin go with a RECIPE, not with --input")
        for given in args.input:
            if not os.path.exists(given):
                raise UsageError(f"--input {given}: no such file or folder")
        tokenizer = args.tokenizer or "gpt2"
        try:
            data = DataConfig(
                dataset=os.path.splitext(os.path.basename(os.path.normpath(args.input[0])))[0],
                tokenizer=tokenizer, paths=list(args.input), prepared_dir=args.out,
                val_fraction=0.1 if args.val_fraction is None else args.val_fraction,
            )
        except ValueError as exc:
            raise UsageError(f"--val-fraction: {exc}") from None
        registry = default_registry()
    else:
        raise UsageError("give a RECIPE to prepare its [data], or --input FILE_OR_DIR... (see --help)")
    out = prepare(data, registry=registry, workers=args.workers, shard_size=args.shard_size, progress=not args.quiet)
    print(out)
    return 0


def cmd_ablate(args) -> int:
    """Validate, then print the plan or run it: 0 when every run finished, 1 otherwise."""
    if args.parallel < 1:
        raise UsageError(f"--parallel must be at least 1, got {args.parallel}")
    ablation, resolved = load_ablation(args.file)
    if args.dry_run:
        print(dry_run_text(ablation, resolved))
        return 0
    out_dir = Path(args.out) if args.out else Path("ablations-out") / ablation.name
    runs = run_ablation(ablation, resolved, out_dir, parallel=args.parallel, progress=not args.quiet)
    failed = [r for r in runs if r.status != "finished"]
    print(f"report: {out_dir / 'report.md'}" + (f" ({len(failed)} of {len(runs)} runs failed)" if failed else ""))
    return 1 if failed else 0


def add_recipe_options(p: argparse.ArgumentParser) -> None:
    """``--set`` and ``--plugin``, for every command that takes a recipe."""
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, in TOML syntax or a bare word for a string "
                   "(e.g. --set train.lr=3e-4 --set model.attention.kind=gqa); repeatable")
    p.add_argument("--plugin", action="append", default=[], metavar="FILE",
                   help="also load this plugin file or module; repeatable")
    add_trust_option(p)


def add_trust_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-plugins", action="store_true",
                   help="run plugin files that a recipe or run folder names from outside the current project "
                   "(they are code; see docs/recipes.md)")


def cmd_recipe_show(args) -> int:
    recipe, data, held = load_for_reading(args.recipe, args.set, args.plugin)
    for line in held:
        print(f"warning: {args.recipe}: {one_line(line)}", file=sys.stderr)
    if recipe is not None:
        print_warnings(recipe, args.recipe)
    print(tomli_w.dumps(data), end="")
    return 0


def print_warnings(recipe, path) -> None:
    """``warning: <recipe>: <line>`` on stderr for each of :func:`recipe_warnings` (rank 0 only)."""
    if int(os.environ.get("RANK", "0")) == 0:
        for line in recipe_warnings(recipe):
            print(f"warning: {path}: {one_line(line)}", file=sys.stderr)


def cmd_inspect(args) -> int:
    if args.world_size < 1:
        raise UsageError(f"--world-size must be >= 1, got {args.world_size}")
    print(inspect_recipe(load_recipe(args.recipe, args.set, args.plugin), args.world_size, args.recipe))
    return 0


def cmd_diff(args) -> int:
    (_, a, held_a), (_, b, held_b) = (load_for_reading(r, args.set, args.plugin) for r in (args.a, args.b))
    for path, line in [*((args.a, ln) for ln in held_a), *((args.b, ln) for ln in held_b)]:
        print(f"warning: {path}: {one_line(line)}", file=sys.stderr)
    lines = diff_data(a, b)
    if lines:
        print("\n".join(lines))
    return 1 if lines else 0


def cmd_train(args) -> int:
    if args.nproc < 1:
        raise UsageError(f"--nproc must be at least 1, got {args.nproc}")
    if "WORLD_SIZE" in os.environ and LAUNCHER_PID in os.environ:  # a rank of launch_ranks: die with torchrun
        die_with_parent(int(os.environ[LAUNCHER_PID]) if os.environ[LAUNCHER_PID].isdigit() else None)
    if args.out:  # the folder the run folder goes in: train.out_dir, as ablate's --out
        args.set = [*args.set, f"train.out_dir={json.dumps(args.out)}"]
    recipe, resume = train_target(args)
    if "WORLD_SIZE" not in os.environ:  # before any rank starts: the DeepSpeed config, and that the model fits
        deepspeed_config(recipe, args.nproc)
        check_fits(recipe, args.nproc)
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return launch_ranks(args, recipe, resume)
    print_warnings(recipe, args.recipe or resume)
    summary = train(recipe, run_dir=resume or args.run_dir, resume=resume is not None, init_from=args.init_from)
    code = train_exit_status(summary)
    if int(os.environ.get("RANK", "0")) == 0:
        print(render_train_summary(summary), file=sys.stdout if code == 0 else sys.stderr)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # gloo's threads can abort the interpreter's shutdown ("terminate called without an
        # active exception"); everything is written and flushed, so leave without it
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def train_target(args):
    """(recipe, run folder to resume or None) for ``train``; UsageError/CheckpointError name what is wrong."""
    if args.init_from and args.resume:
        raise UsageError("--init-from starts a new run from other weights; --resume continues a run from its own")
    if not args.resume:
        if not args.recipe and args.init_from:  # the folder's own recipe (a run), or one made for it (HF)
            with tempfile.TemporaryDirectory() as tmp:
                made = Path(tmp) / "recipe.toml"
                made.write_text(dump_recipe(recipe_for_init(args.init_from)))
                return load_recipe(made, args.set, args.plugin), None
        if not args.recipe:
            raise UsageError("give a RECIPE to train, --init-from a folder to start from, or --resume RUN_DIR")
        return load_recipe(args.recipe, args.set, args.plugin), None
    if args.resume == "auto":
        if not args.recipe:
            raise UsageError("--resume auto needs the RECIPE whose newest run to continue")
        recipe = load_recipe(args.recipe, args.set, args.plugin)
        run_dir = find_run(recipe.train.out_dir, recipe.name)
    else:
        run_dir = check_resumable(args.resume)
        recipe = load_recipe(args.recipe or run_dir, args.set, args.plugin)  # default: the run's own recipe
    if args.run_dir and Path(args.run_dir).resolve() != run_dir.resolve():
        raise UsageError(f"--run-dir {args.run_dir} and --resume {run_dir} differ; a resumed run continues in its own folder")
    return recipe, str(run_dir)


def train_exit_status(summary: dict) -> int:
    """0 finished; 128 + the signal when stopped by one (130 SIGINT, 143 SIGTERM); 1 failed."""
    if summary["status"] == "finished":
        return 0
    if summary["status"] == "interrupted":
        return 128 + summary["signal"]
    return 1


def launch_ranks(args, recipe, resume: str | None = None) -> int:
    """Run this same command on ``--nproc`` local ranks through torchrun (rank 0 names the run folder).

    torchrun runs in its own session and gets each SIGINT/SIGTERM from here exactly once (a
    second one would make the ranks stop at once, unsaved); it passes it to every rank, which
    finish the step and save a checkpoint within --shutdown_timeout. It runs as
    :mod:`toolkit.launch`, which gets SIGTERM when this process dies (even by kill -9) and ends
    without torchrun's traceback; each rank gets SIGTERM when torchrun dies.
    """
    run_dir = resume or args.run_dir or str(default_run_dir(recipe))
    cmd = [sys.executable, "-m", "toolkit.launch", "--standalone", f"--nproc_per_node={args.nproc}",
           "--shutdown_timeout=300", "-m", "toolkit", "train", *([args.recipe] if args.recipe else []),
           "--run-dir", run_dir, *(["--resume", run_dir] if resume else []),
           *(["--init-from", args.init_from] if args.init_from else [])]
    for s in args.set:
        cmd += ["--set", s]
    for p in args.plugin:
        cmd += ["--plugin", p]
    if args.trust_plugins:
        cmd.append("--trust-plugins")
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc)))
    env[PARENT_PID] = str(os.getpid())  # torchrun (toolkit.launch) dies with this process, the ranks with it
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    got = []

    def forward(signum, _frame):
        got.append(signum)
        proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = proc.wait()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return 128 + got[0] if got else code


def render_train_summary(s: dict) -> str:
    run = Path(s["run_dir"])
    if s["status"] == "interrupted":
        return f"interrupted: {s.get('error')}"
    if s["status"] != "finished":
        return f"error: training failed at step {s['steps']}: {s.get('error')} (run folder {run})"

    def loss(x):
        return "n/a" if x is None else f"{x:.4f}"

    mins, secs = divmod(int(s["wall_s"]), 60)
    rate = f"{s['tokens_per_s']:,.0f} tokens/s" if s.get("tokens_per_s") else "n/a tokens/s"
    lines = [
        f"finished {s['steps']} steps ({s['tokens']:,} tokens) in {mins}m{secs:02d}s, {rate}: "
        f"val loss {loss(s['final_val_loss'])} (best {loss(s['best_val_loss'])})",
        f"  losses:   {run / 'losses.png'}",
        f"  samples:  {run / 'samples.txt'}",
        f"  weights:  {run / 'model.safetensors'}",
        f"  generate: playattention generate {run} --prompt 'ROMEO:'",
    ]
    return "\n".join(lines)


def cmd_convert(args) -> int:
    if args.to == "run":
        if args.arch:
            raise UsageError("--arch chooses what --to hf writes; a Hugging Face folder says its own architecture")
        s = hf_to_run(args.source, args.out)
        tok = f"tokenizer {s['tokenizer']}" if s["tokenizer"] else "no tokenizer (train with a recipe that names one)"
        print(f"converted {s['hf_class']} ({s['params']:,} parameters, {tok}) into {s['run_dir']}\n"
              f"  generate: playattention generate {s['run_dir']} --prompt 'The' --temperature 0\n"
              f"  train:    playattention train --init-from {s['run_dir']} --set model.block_size=256")
        return 0
    s = run_to_hf(args.source, args.out, model_type=args.arch)
    print(f"wrote {s['hf_class']} into {s['out']} ({', '.join(s['files'])}); "
          f"load it with transformers.AutoModelForCausalLM.from_pretrained({s['out']!r})")
    return 0


def cmd_generate(args) -> int:
    resolve_run_dir(args.run)  # FileNotFoundError (one line, exit 2) before anything loads
    if args.num_samples < 1:
        raise UsageError(f"--num-samples must be at least 1, got {args.num_samples}")
    model, tokenizer, recipe = load_run(args.run, device=args.device or ("cuda" if _cuda() else "cpu"))
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


def cmd_eval(args) -> int:
    if not Path(args.target).is_dir():
        raise UsageError(f"{args.target}: no such run folder or Hugging Face GPT-2 folder")
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    results = evaluate_target(args.target, args.task, device=args.device or ("cuda" if _cuda() else "cpu"),
                              batch_size=args.batch_size)
    if args.json != "-":
        print(render_results(results))
    if args.json:
        write_results(results, args.target, args.json)
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="playattention", description=__doc__.splitlines()[0])
    parser.add_argument("--trace", action="store_true", help="show which plugin registered what")
    # the deepspeed launcher runs `playattention --local_rank=N train ...` (LOCAL_RANK is also in the env)
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("plugins", help="list every registered component with its options and source")
    p.add_argument("--plugin", action="append", default=[], help="also load this plugin file or module")
    p.add_argument("--strict", action="store_true", help="exit 1 if any plugin failed to load")
    p.add_argument("--hooks", action="store_true", help="also list the hooks, and each family's place and contract")
    p.set_defaults(func=cmd_plugins)

    p = sub.add_parser("recipe", help="work with recipes (see docs/recipes.md)")
    recipe_sub = p.add_subparsers(dest="recipe_command", required=True, metavar="ACTION")
    q = recipe_sub.add_parser("show", help="print the fully resolved recipe as TOML (extends and --set applied)")
    q.add_argument("recipe", help="recipe TOML file or run folder")
    add_recipe_options(q)
    q.set_defaults(func=cmd_recipe_show)

    p = sub.add_parser("inspect", help="parameters, FLOPs, batch arithmetic, DeepSpeed config and memory of a recipe")
    p.add_argument("recipe", help="recipe TOML file or run folder")
    p.add_argument("--world-size", type=int, default=1, metavar="N", help="number of GPUs (default 1)")
    add_recipe_options(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("diff", help="key-by-key differences of two resolved recipes or run folders",
                       description="Print `key: a -> b` for every resolved key that differs. "
                       "Exit status as diff(1): 0 same, 1 different, 2 error.")
    p.add_argument("a", help="recipe TOML file or run folder")
    p.add_argument("b", help="recipe TOML file or run folder")
    add_recipe_options(p)
    p.set_defaults(func=cmd_diff)

    p = sub.add_parser("prepare", help="tokenize a recipe's [data] (or --input files) into token shards",
                       description="Tokenize text into uint16 token shards plus a validation split. "
                       "Finished shards are kept, so re-running is instant and an interrupted run resumes.")
    p.add_argument("recipe", nargs="?", help="recipe TOML whose [data] to prepare")
    add_recipe_options(p)
    p.add_argument("--input", nargs="+", metavar="FILE_OR_DIR", help=".txt/.jsonl files or folders, without a recipe")
    p.add_argument("--tokenizer", choices=("char", "gpt2"), help="with --input (default gpt2)")
    p.add_argument("--out", metavar="DIR", help="with --input: where the shards go (default data/<name>-<tokenizer>)")
    p.add_argument("--val-fraction", type=float, help="with --input: share of tokens for validation (default 0.1)")
    p.add_argument("--shard-size", type=int, default=100_000_000, metavar="TOKENS", help="tokens per shard")
    p.add_argument("--workers", type=int, help="tokenizer processes (default: all cores for big inputs)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or messages on stderr")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train a recipe through DeepSpeed into a run folder",
                       description="Train a recipe with DeepSpeed's ZeRO engine as one process, or on N local "
                       "ranks with --nproc N (or under `deepspeed`/`torchrun`), writing runs/<name>-<time>/.")
    p.add_argument("recipe", nargs="?", help="recipe TOML (with --resume RUN_DIR: default the run's recipe.toml)")
    add_recipe_options(p)
    p.add_argument("--out", metavar="DIR", help="put the run folder under DIR (train.out_dir; default runs/)")
    p.add_argument("--run-dir", metavar="DIR", help="write the run here (default <train.out_dir>/<name>-<time>)")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue RUN_DIR from its newest complete checkpoint, in that folder; 'auto': the newest "
                   "run of RECIPE under train.out_dir that has one (see docs/checkpoints.md)")
    p.add_argument("--init-from", metavar="RUN_OR_HF_DIR",
                   help="start from the weights of a finished run or a Hugging Face folder (fine-tuning); the recipe "
                   "must describe the same model (default recipe: the folder's own, or one made for it)")
    p.add_argument("--nproc", type=int, default=1, metavar="N", help="launch N local ranks through torchrun")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("convert", help="a Hugging Face folder into a run folder, or a run into a Hugging Face folder",
                       description="Convert HF_DIR (config.json + weights + tokenizer) into a run folder that "
                       "generate, train --init-from and ablations take; or with --to hf a finished run into a "
                       "folder transformers' from_pretrained loads. Architectures: "
                       + ", ".join(ARCHITECTURES) + ". See docs/hf.md.")
    p.add_argument("source", metavar="HF_DIR_OR_RUN_DIR")
    p.add_argument("out", metavar="OUT_DIR", help="a new or empty folder")
    p.add_argument("--to", choices=("run", "hf"), default="run", help="run: HF_DIR -> run folder (default); "
                   "hf: RUN_DIR -> Hugging Face folder")
    p.add_argument("--arch", choices=list(ARCHITECTURES), help="with --to hf: the architecture to write "
                   "(default: the first that can express the model)")
    add_trust_option(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("generate", help="sample text from a finished run, streamed as it is produced")
    p.add_argument("run", metavar="RUN_DIR_OR_WEIGHTS", help="a run folder (or its model.safetensors)")
    p.add_argument("--prompt", action="append", help="text to continue (repeatable; default the run's prompts)")
    p.add_argument("--max-new-tokens", type=int, metavar="N")
    p.add_argument("--temperature", type=float, help="0 is greedy")
    p.add_argument("--top-k", type=int, metavar="K", help="keep the K most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling: keep tokens up to probability P")
    p.add_argument("--seed", type=int)
    p.add_argument("--num-samples", type=int, default=1, metavar="N",
                   help="samples per prompt (seeds seed, seed+1, ...)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default cuda if available)")
    add_trust_option(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("eval", help="run evaluators (hellaswag, perplexity, ...) on a finished run or a GPT-2 folder",
                       description="Run evaluators on a finished run folder, or on a Hugging Face GPT-2 folder "
                       "(config.json + weights; its vocab.json/merges.txt if present, else the shipped GPT-2 BPE). "
                       "Each --task is KIND:KEY=VALUE,KEY=VALUE (values as in --set), e.g. "
                       "--task hellaswag:path=hellaswag_val.jsonl,limit=1000 --task perplexity:split=val. "
                       "Without --task: the run's own [[eval]] evaluators.")
    p.add_argument("target", metavar="RUN_OR_HF_FOLDER", help="a finished run folder or a Hugging Face GPT-2 folder")
    p.add_argument("--task", action="append", default=[], metavar="KIND:KEY=VALUE,...",
                   help="an evaluator and its options; repeatable (`playattention plugins` lists them)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE ('-': only JSON, to stdout)")
    p.add_argument("--batch-size", type=int, metavar="N", help="rows per forward (default the run's train.micro_batch)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default cuda if available)")
    add_trust_option(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("ablate", help="train a grid of component swaps and write a comparison report",
                       description="Train every variant of an ablation file (a base recipe plus component swaps) "
                       "with the same budget and seeds, then write report.md, results.csv, curves.png and "
                       "tradeoff.png. Finished runs are skipped when re-run. See docs/ablations.md.")
    p.add_argument("file", help="the ablation file (TOML)")
    p.add_argument("--dry-run", action="store_true",
                   help="validate, print every variant's differences, parameters and FLOPs per token; train nothing")
    p.add_argument("--parallel", type=int, default=1, metavar="N",
                   help="run N variants side by side (one GPU each, or the CPU cores divided between them)")
    p.add_argument("--out", metavar="DIR", help="the ablation folder (default ablations-out/<name>/)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-run lines")
    add_trust_option(p)
    p.set_defaults(func=cmd_ablate)
    return parser


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


#: the most problems printed for one command; the rest are counted ("... and N more")
MAX_ERROR_LINES = 50


def print_errors(lines: list[str]) -> None:
    """``error: <line>`` on stderr for each problem, each on one line, at most MAX_ERROR_LINES of them."""
    shown = lines[:MAX_ERROR_LINES]
    for line in shown:
        print(f"error: {one_line(line)}", file=sys.stderr)
    if len(lines) > len(shown):
        print(f"error: ... and {len(lines) - len(shown):,} more", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--trace" in argv[: argv.index("--") if "--" in argv else len(argv)]:
        os.environ["PLAYATTENTION_TRACE"] = "1"
        forget_loaded()  # load again, so the built-ins' registrations are traced too
    parser = build_parser()
    try:
        add_plugin_commands(parser._subparsers._group_actions[0], default_registry())
        args = parser.parse_args(argv)
        # plugin files run only with consent: those the user names on this command line, or all with --trust-plugins
        trust(everything=getattr(args, "trust_plugins", False), files=getattr(args, "plugin", None) or ())
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print_errors(exc.lines)
        return 2
    except (UserError, FileNotFoundError) as exc:
        print_errors([str(exc)])
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `playattention inspect ... | head`: the reader left; leave quietly too
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
