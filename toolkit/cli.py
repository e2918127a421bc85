"""The `playattention` command line (also `python -m toolkit`).

Each subcommand is a small function here that parses arguments and calls into the module that
owns the work; plugins add commands of their own through ``register_commands``. Problems a user
can fix (bad recipe, missing file) print one line per problem to stderr and exit 2; nothing is
lost and no traceback is shown.
"""
from __future__ import annotations

import time

STARTED = time.perf_counter()  # before the imports below: `train --verbose` reports how long they take
IMPORTED = None  # when main() first ran

import argparse
import errno
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import attrs
import tomli_w

from . import catalog, completion, coordcheck, families
from .ablate import run_ablation
from .ablation import dry_run_text, load_ablation
from .checkpoint import CHECKPOINT_SELECTORS, latest, read_state
from .convert import hf_to_run, load_model, recipe_for_init, run_to_hf
from .data import prepare, prepared_dir, read_split
from .errors import CheckpointError, ConfigError, UsageError, UserError, one_line
from .engine import lr_at
from .evaluate import evaluate_target, render_results, write_results
from .generate import encode_prompt, stream_samples
from .engine import deepspeed_config
from .inspection import check_fits, inspect_recipe
from .launch import LAUNCHER_PID, PARENT_PID, die_with_parent
from .lookinside import look_inside
from .plugin_manager import PluginManager, default_registry, forget_loaded, is_path_spec, trust
from .probe import load_buildable, model_problems
from .recipe import (DataConfig, diff_data, diff_lines, dump_recipe, flatten, load_for_reading,
                     recipe_to_dict, recipe_warnings, registry_of)
from .registry import Registry
from .runfolder import (EXPORT_RECORD, LOCK_HOLDER_ENV, WEIGHTS, check_resumable, export_problem, find_run, lock_folder,
                        new_run_dir)
from .runs import DEFAULT_DIR, find_runs, render_runs
from .tokenizer import load_tokenizer
from .trainer import train


def cmd_plugins(args) -> int:
    pm = PluginManager()
    for spec in args.plugin:
        pm.add(spec)
    if args.family is not None:
        families.family(args.family)  # RegistryError: one line with "did you mean"
        if args.name is not None:
            pm.registry.get(args.family, args.name)  # UnknownComponentError: the registered names
    print(render_plugins(pm.registry, hooks=args.hooks, family=args.family, name=args.name))
    return 1 if pm.failures and args.strict else 0


def render_plugins(registry: Registry, hooks: bool = False, family: str | None = None, name: str | None = None) -> str:
    """Every family (or one) with its registered parts (or one): one-line doc, source, and each option
    as ``name: type = default  description``."""
    lines = []
    if hooks:
        lines.append("hooks (implement any with @hookimpl; see toolkit/families.py):")
        lines += [f"  {hook}(register)  {doc}" for hook, doc in families.HOOKS.items()]
        lines.append("")
    for fam in families.FAMILIES:
        if family is not None and fam.name != family:
            continue
        where = f"recipe: {fam.where}" + ("[]" if fam.many else "") if fam.where else "not in recipes"
        lines.append(f"{fam.name}:" if not hooks else f"{fam.name}:  ({fam.hook}; {where}; {fam.contract})")
        for part in registry.names(fam.name):
            if name is not None and part != name:
                continue
            comp = registry.get(fam.name, part)
            lines.append(f"  {part:<16} {comp.doc}")
            lines.append(f"  {'':<16} from {comp.source}")
            docs = comp.option_docs()
            for opt, typ, default in comp.option_fields():
                head = f"{opt}: {typ} " + ("(required)" if default is attrs.NOTHING else f"= {default!r}")
                doc = short_doc(docs.get(opt, ""))
                lines.append(f"  {'':<16}   {head:<36}  {doc}".rstrip() if doc else f"  {'':<16}   {head}")
        if not registry.names(fam.name):
            lines.append("  (none registered)")
        lines.append("")
    if registry.failures:
        lines.append("failed plugins:")
        lines.extend(f"  {f}" for f in registry.failures)
    return "\n".join(lines).rstrip()


def short_doc(text: str, width: int = 100) -> str:
    """The first sentence of an option's description, cut at a word before ``width`` characters."""
    first = re.split(r"(?<=[.!?])\s+(?=[A-Z])", text, maxsplit=1)[0]  # "et al. 2023" does not end one
    return first if len(first) <= width else first[:width].rsplit(" ", 1)[0] + " ..."


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


def cmd_ablate(args) -> int:
    """Validate, then print the plan or run it: 0 when every run finished, 1 otherwise."""
    if args.parallel < 1:
        raise UsageError(f"--parallel must be at least 1, got {args.parallel}")
    ablation, resolved = load_ablation(args.file, args.set)
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


def add_no_verify(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-verify", action="store_true",
                   help=f"use a run folder's exported files even if they differ from its {EXPORT_RECORD}")


def check_export(target, no_verify: bool = False) -> None:
    """Refuse a run folder whose exported files changed since export (their sha256 is in export.json).

    A folder exported before exports were hashed has no export.json: used, with a warning.
    """
    folder = Path(target)
    folder = folder.parent if folder.is_file() else folder
    if no_verify or not (folder / "recipe.toml").is_file() or not (folder / WEIGHTS).exists():
        return  # not a run folder: an HF folder, a recipe, or a run that has not exported yet
    if not (folder / EXPORT_RECORD).exists() and not (folder / EXPORT_RECORD).is_symlink():
        print(f"warning: {folder}: no {EXPORT_RECORD} (exported before exports were hashed): {WEIGHTS} is used "
              f"unchecked", file=sys.stderr)
        return
    if why := export_problem(folder):
        how = (f"remove it and run playattention train --resume {folder}" if latest(folder / "checkpoints")
               else "convert it again from its source")
        raise CheckpointError(f"{why}; re-export it ({how}) or pass --no-verify")


def cmd_recipe_show(args) -> int:
    recipe, data, held = load_for_reading(args.recipe, args.set, args.plugin, model_check=model_problems)
    for line in held:
        print(f"warning: {args.recipe}: {one_line(line)}", file=sys.stderr)
    if recipe is not None:
        print_warnings(recipe, args.recipe)
    print(tomli_w.dumps(data), end="")
    return 0


def cmd_recipe_list(args) -> int:
    print(catalog.render_list())
    return 0


def cmd_recipe_validate(args) -> int:
    """Every file resolved and checked: ``FILE: ok`` on stdout, each problem on stderr; 2 if any."""
    bad = 0
    for path in args.files:
        try:
            recipe = load_buildable(path, args.set, args.plugin)
        except ConfigError as exc:
            print_errors(exc.lines)
            bad += 1
        except (UserError, FileNotFoundError) as exc:
            print_errors([f"{path}: {exc}" if path not in str(exc) else str(exc)])
            bad += 1
        else:
            print_warnings(recipe, path)
            print(f"{path}: ok")
    return 2 if bad else 0


def cmd_recipe_copy(args) -> int:
    written = catalog.copy_recipe(args.name, args.dest)
    bases = f" (with {', '.join(str(p) for p in written[1:])}, which it extends)" if written[1:] else ""
    print(f"wrote {written[0]}{bases}; train it with: playattention train {written[0]}")
    return 0


def cmd_runs(args) -> int:
    root = Path(args.dir or DEFAULT_DIR)
    if not root.is_dir():
        raise UsageError(f"{root}: no such folder of runs" + ("" if args.dir else " (train puts runs here; give DIR)"))
    rows = find_runs(root)
    print(render_runs(rows) if rows else f"no run folders in {root}")
    return 0


def cmd_completion(args) -> int:
    parser, registry = build_parser(), default_registry()
    add_plugin_commands(parser._subparsers._group_actions[0], registry)  # installed plugins' commands too
    print(completion.script(args.shell, parser, registry), end="")
    return 0


def print_warnings(recipe, path) -> None:
    """``warning: <recipe>: <line>`` on stderr for each of :func:`recipe_warnings` (rank 0 only)."""
    if int(os.environ.get("RANK", "0")) == 0:
        for line in recipe_warnings(recipe):
            print(f"warning: {path}: {one_line(line)}", file=sys.stderr)


def cmd_inspect(args) -> int:
    if args.world_size < 1:
        raise UsageError(f"--world-size must be >= 1, got {args.world_size}")
    check_export(args.recipe, args.no_verify)
    print(inspect_recipe(load_buildable(args.recipe, args.set, args.plugin), args.world_size, args.recipe))
    return 0


def cmd_diff(args) -> int:
    (_, a, held_a), (_, b, held_b) = (load_for_reading(r, args.set, args.plugin, model_check=model_problems)
                                      for r in (args.a, args.b))
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
    if args.init_from:
        check_export(args.init_from, args.no_verify)
    if (args.extend is not None or args.decay is not None or args.reshape) and not args.resume:
        raise UsageError("--extend, --decay and --reshape go with --resume RUN_DIR (or --resume auto)")
    recipe, resume = train_target(args)
    if "WORLD_SIZE" not in os.environ:  # before any rank starts: the DeepSpeed config, and that the model fits
        deepspeed_config(recipe, args.nproc)
        check_fits(recipe, args.nproc)
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return launch_ranks(args, recipe, resume)
    print_warnings(recipe, args.recipe or resume)
    summary = train(recipe, run_dir=resume or args.run_dir, resume=resume is not None, init_from=args.init_from,
                    verbose=args.verbose, launched=(STARTED, IMPORTED))
    code = train_exit_status(summary)
    if int(os.environ.get("RANK", "0")) == 0:
        print(render_train_summary(summary, prompt_hint(recipe, summary["run_dir"]) if code == 0 else ""),
              file=sys.stdout if code == 0 else sys.stderr)
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
                return load_buildable(made, args.set, args.plugin), None
        if not args.recipe:
            raise UsageError("give a RECIPE to train, --init-from a folder to start from, or --resume RUN_DIR")
        return load_buildable(args.recipe, args.set, args.plugin), None
    if args.resume == "auto":
        if not args.recipe:
            raise UsageError("--resume auto needs the RECIPE whose newest run to continue")
        recipe = load_buildable(args.recipe, args.set, args.plugin)
        run_dir = find_run(recipe.train.out_dir, recipe.name)
    else:
        run_dir = check_resumable(args.resume)
    if args.run_dir and Path(args.run_dir).resolve() != run_dir.resolve():
        raise UsageError(f"--run-dir {args.run_dir} and --resume {run_dir} differ; a resumed run continues in its own folder")
    return resumed_recipe(run_dir, args), str(run_dir)


#: what shapes a resumed run's learning-rate curve or its batch: a --set of these is confirmed (--reshape)
CURVE_KEYS = ("train.warmup_steps", "train.lr", "train.min_lr", "train.schedule", "train.micro_batch",
              "train.grad_accum", "train.tokens_per_step")
#: the horizon: changed only by --extend, which keeps the schedule's own decay (no re-stretched cosine)
HORIZON_KEYS = ("train.max_steps", "train.decay_steps")


def _plain(recipe) -> dict:
    """A recipe as flat JSON values, plugin paths absolute (as a run records them), for comparing."""
    d = json.loads(json.dumps(recipe_to_dict(recipe), default=str))
    d["plugins"] = [str(Path(p).resolve()) if is_path_spec(p) else p for p in d.get("plugins", [])]
    return flatten(d)


def _first_differences(a: dict, b: dict, keys=None, n: int = 3) -> list[str]:
    found = diff_lines(a, b, keys=[k for k in dict.fromkeys([*a, *b]) if keys is None or k.startswith(keys)])
    return found[:n] + ([f"and {len(found) - n} more"] if len(found) > n else [])


def resumed_recipe(run_dir: Path, args):
    """The recipe a resume trains with: the one the newest checkpoint recorded, plus --set (and --extend).

    Refused in one line: a recipe.toml that differs from the checkpoint's record, a RECIPE file that
    differs from the run's (unless the differences are given as --set), a --set of the horizon
    (use --extend) or of the learning-rate curve or batch without --reshape.
    """
    found = latest(run_dir / "checkpoints")
    saved = read_state(found).get("recipe")
    own = load_buildable(run_dir)
    # keys both know: a key one toolkit version has and the other not is not a change of this run's recipe
    recorded = flatten(json.loads(json.dumps(saved))) if isinstance(saved, dict) else {}
    mine = {k: v for k, v in _plain(own).items() if k in recorded}
    if diff := ", ".join(_first_differences({k: v for k, v in recorded.items() if k in mine}, mine)):
        raise CheckpointError(f"{run_dir / 'recipe.toml'} differs from the recipe {found.name} recorded ({diff}); "
                              f"restore it, or give the changes you mean as --set")
    extend, said = extension(run_dir, own, args)
    recipe = load_buildable(run_dir, [*extend, *args.set], args.plugin)
    if args.recipe:
        other = _plain(load_buildable(args.recipe, [*extend, *args.set], args.plugin))
        if diff := _first_differences(_plain(recipe), other):
            raise UsageError(f"{args.recipe} differs from the recipe of {run_dir} ({', '.join(diff)}); a resume keeps "
                             f"the run's own recipe: leave RECIPE out, or give the changes you mean as --set")
    before, after = _plain(load_buildable(run_dir, extend)), _plain(recipe)  # what --extend and --decay change is meant
    if diff := _first_differences(before, after, HORIZON_KEYS):
        raise UsageError(f"--set {diff[0]}: a resumed run keeps its horizon (a longer cosine would re-stretch and the "
                         f"learning rate jump); to train N more steps at the schedule's final rate use --extend N")
    if not args.reshape and (diff := _first_differences(before, after, CURVE_KEYS)):
        raise UsageError(f"--set {', '.join(diff)}: changes the learning-rate curve or the batch of a run mid-way; "
                         f"pass --reshape to resume with it anyway")
    if said and int(os.environ.get("RANK", "0")) == 0:
        print(said, file=sys.stderr)
    return recipe


def extension(run_dir: Path, own, args) -> tuple[list[str], str | None]:
    """The --set values of ``--extend N [--decay F]`` and the line saying what the learning rate will do.

    The finished schedule keeps its own decay (``decay_steps`` pinned where it ended), so the N new
    steps run at its final rate; with ``--decay F`` a run that ended at its peak rate (a constant
    schedule) holds it, then cools down to ``min_lr`` over the last F of the N steps (WSD's 1-sqrt,
    Hägele et al. 2024) instead.
    """
    if args.extend is None:
        if args.decay is not None:
            raise UsageError("--decay F goes with --extend N: it decays over the last F of the N new steps")
        return [], None
    if args.extend < 1:
        raise UsageError(f"--extend must be at least 1 step, got {args.extend}")
    t = own.train
    end, steps = t.decay_steps or t.max_steps, t.max_steps + args.extend
    if end <= t.warmup_steps:  # it stopped while warming up: no final rate of a schedule to hold
        raise UsageError(f"--extend: {run_dir} ended at step {t.max_steps}, inside its warmup ({t.warmup_steps} "
                         f"steps), so it has no final learning rate to continue at; train it again with more steps")
    sets = [f"train.max_steps={steps}", f"train.decay_steps={end}"]
    final = lr_at(t.max_steps, load_buildable(run_dir, sets).train, registry_of(own))
    if args.decay is None:
        return sets, (f"extending {run_dir} by {args.extend} steps, to {steps}: the learning rate stays at "
                      f"{final:.3g}, the final rate of its {t.schedule.kind} schedule (which ends at step {end})")
    if not 0 < args.decay <= 1:
        raise UsageError(f"--decay must be a fraction of the new steps in (0, 1], got {args.decay}")
    if not math.isclose(final, t.lr):
        raise UsageError(f"--decay: {run_dir} ends at a learning rate of {final:.3g}, already decayed from its peak "
                         f"{t.lr:.3g}; --decay cools down from a run that ended at its peak (a constant schedule)")
    # the cooldown reaches min_lr on the last step (decay_steps is 0-based): `cool` steps below the peak
    cool = max(1, round(args.decay * args.extend))
    fraction = cool / (steps - 1 - min(t.warmup_steps, t.max_steps))
    sets = [f"train.max_steps={steps}", f"train.decay_steps={steps - 1}",
            f'train.schedule={{kind = "wsd", decay_fraction = {fraction!r}}}']
    return sets, (f"extending {run_dir} by {args.extend} steps, to {steps}: the learning rate stays at {final:.3g} "
                  f"for {args.extend - cool} steps, then decays to {t.min_lr:.3g} over the last {cool} (wsd, 1-sqrt)")


def train_exit_status(summary: dict) -> int:
    """0 finished; 128 + the signal when stopped by one (130 SIGINT, 143 SIGTERM); 1 failed, or finished
    with the final evaluation or sample failing (``end_errors``: the checkpoint and export are written)."""
    if summary["status"] == "finished":
        return 1 if summary.get("end_errors") else 0
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
    run_dir = resume or args.run_dir or str(new_run_dir(recipe))
    # this process holds the run folder's lock while the ranks run: a second launcher is refused here,
    # before it starts any rank; rank 0 finds the lock held by its launcher (LOCK_HOLDER_ENV)
    lock = lock_folder(run_dir)
    cmd = [sys.executable, "-m", "toolkit.launch", "--standalone", f"--nproc_per_node={args.nproc}",
           "--shutdown_timeout=300", "-m", "toolkit", "train", *([args.recipe] if args.recipe else []),
           "--run-dir", run_dir, *(["--resume", run_dir] if resume else []),
           *(["--init-from", args.init_from] if args.init_from else []),
           *(["--extend", str(args.extend)] if args.extend is not None else []),
           *(["--decay", str(args.decay)] if args.decay is not None else []),
           *(["--reshape"] if args.reshape else []), *(["--no-verify"] if args.no_verify else []),
           *(["--verbose"] if args.verbose else [])]
    for s in args.set:
        cmd += ["--set", s]
    for p in args.plugin:
        cmd += ["--plugin", p]
    if args.trust_plugins:
        cmd.append("--trust-plugins")
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc)))
    env[PARENT_PID] = str(os.getpid())  # torchrun (toolkit.launch) dies with this process, the ranks with it
    env[LOCK_HOLDER_ENV] = str(os.getpid())
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
        lock.release()
    return 128 + got[0] if got else code


def prompt_hint(recipe, run_dir: str | Path) -> str:
    """The prompt the end-of-run hint suggests. A char-level model knows only its corpus's characters, so
    the first whole line of its validation text; other tokenizers take any text, so none (generate then
    uses the run's own prompts)."""
    try:
        tokenizer = load_tokenizer(run_dir, registry_of(recipe))
        if tokenizer.name != "char":
            return ""
        text = tokenizer.decode(read_split(prepared_dir(recipe.data), "val")[0][:400])
    except (OSError, ValueError, IndexError, UserError):
        return ""
    lines = text.splitlines()[1:]  # the split may start mid-line
    return next((ln.strip()[:40] for ln in lines if ln.strip()), "")


def render_train_summary(s: dict, prompt: str = "") -> str:
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
        f"  generate: playattention generate {run}" + (f" --prompt {shlex.quote(prompt)}" if prompt else ""),
        *(f"error: {one_line(e)}" for e in s.get("end_errors", [])),
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
    check_export(args.source, args.no_verify)
    s = run_to_hf(args.source, args.out, model_type=args.arch)
    print(f"wrote {s['hf_class']} into {s['out']} ({', '.join(s['files'])}); "
          f"load it with transformers.AutoModelForCausalLM.from_pretrained({s['out']!r})")
    return 0


def cmd_generate(args) -> int:
    check_export(args.run, args.no_verify)
    if args.num_samples < 1:
        raise UsageError(f"--num-samples must be at least 1, got {args.num_samples}")
    model, tokenizer, recipe, _ = load_model(args.run, device=args.device or ("cuda" if _cuda() else "cpu"))
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
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    check_export(args.target, args.no_verify)
    results = evaluate_target(args.target, args.task, device=args.device or ("cuda" if _cuda() else "cpu"),
                              batch_size=args.batch_size)
    if args.json != "-":
        print(render_results(results))
    if args.json:
        write_results(results, args.target, args.json)
    return 0


def cmd_attention(args) -> int:
    r = look_inside(args.folder, prompt=args.prompt, ids=args.ids, out=args.out, importance=args.head_importance,
                    text=args.text, windows=args.windows, length=args.length, device=args.device or "cpu")
    print(r["table"])
    if "importance_table" in r:
        print(r["importance_table"])
    print(f"wrote {', '.join(r['files'])} into {r['out']}")
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

    p = sub.add_parser("plugins", help="list every registered component with its options and source",
                       description="List registered components: each with its one-line description, who "
                       "registered it, and its options (type, default, description). Give a FAMILY, or a "
                       "FAMILY and a NAME, to list only those.")
    p.add_argument("family", nargs="?", metavar="FAMILY", help="only this family: " + ", ".join(families.NAMES))
    p.add_argument("name", nargs="?", metavar="NAME", help="only this component of FAMILY")
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
    q = recipe_sub.add_parser("list", help="the shipped recipes with their one-line descriptions")
    q.set_defaults(func=cmd_recipe_list)
    q = recipe_sub.add_parser("validate", help="check recipe files: exit 0 if all are valid, 2 otherwise",
                              description="Resolve and check each FILE as train would: `FILE: ok`, or one line "
                              "per problem. Exit status 0 if every file is valid, 2 otherwise.")
    q.add_argument("files", nargs="+", metavar="FILE", help="recipe TOML files or run folders")
    add_recipe_options(q)
    q.set_defaults(func=cmd_recipe_validate)
    q = recipe_sub.add_parser("copy", help="copy a shipped recipe to start from (never overwrites)")
    q.add_argument("name", metavar="NAME", help="a shipped recipe (`playattention recipe list`), e.g. gpt-cpu")
    q.add_argument("dest", metavar="DEST", help="the new file, or a folder to copy it into")
    q.set_defaults(func=cmd_recipe_copy)

    p = sub.add_parser("inspect", help="parameters, FLOPs, batch arithmetic, DeepSpeed config and memory of a recipe")
    p.add_argument("recipe", help="recipe TOML file or run folder")
    p.add_argument("--world-size", type=int, default=1, metavar="N", help="number of GPUs (default 1)")
    add_recipe_options(p)
    add_no_verify(p)
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
    p.add_argument("--extend", type=int, metavar="N", help="with --resume: train N more steps than the run's "
                   "max_steps, at the final learning rate of its schedule (the decay is not re-stretched)")
    p.add_argument("--decay", type=float, metavar="F", help="with --extend N: hold the final rate, then decay to "
                   "train.min_lr over the last F of the N steps (WSD; for a run that ended at its peak rate)")
    p.add_argument("--reshape", action="store_true", help="with --resume: confirm --set changes to the learning-rate "
                   "curve or the batch (lr, min_lr, warmup_steps, schedule, micro_batch, grad_accum, tokens_per_step)")
    add_no_verify(p)
    p.add_argument("--nproc", type=int, default=1, metavar="N", help="launch N local ranks through torchrun")
    p.add_argument("--verbose", action="store_true", help="print the start-up phases (imports, data, model build, "
                   "engine init, first step) once the first step is done; summary.json keeps them either way")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("convert", help="a Hugging Face folder into a run folder, or a run into a Hugging Face folder",
                       description="Convert HF_DIR (config.json + weights + tokenizer) into a run folder that "
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
    add_trust_option(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("generate", help="sample text from a run, a checkpoint or a Hugging Face folder, streamed")
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
    add_trust_option(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("eval", help="run evaluators (hellaswag, perplexity, ...) on a run, a checkpoint or a HF folder",
                       description="Run evaluators on a finished run folder, a checkpoint of a run (RUN@best, "
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
    add_trust_option(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("attention", help="what each attention head attends to: heatmaps, a page to explore, statistics",
                       description="Draw every layer's and head's attention over a prompt (attention.png, and "
                       "attention.html to pick a head and hover a query token) and print each head's entropy, sink "
                       "mass, mean distance and most attended earlier token. --head-importance: the validation loss "
                       "change when each head is zeroed. See docs/look-inside.md.")
    p.add_argument("folder", metavar="RUN_OR_HF_FOLDER", help="a finished run folder or a Hugging Face folder")
    p.add_argument("--prompt", help="the text to look at")
    p.add_argument("--ids", metavar="I,J,...", help="token ids instead of a prompt (a folder without a tokenizer)")
    p.add_argument("--out", metavar="DIR", help="where the files go (default attention-out/<folder name>/)")
    p.add_argument("--head-importance", action="store_true",
                   help="also the val loss change when each head's output is zeroed (one forward per head)")
    p.add_argument("--text", metavar="FILE", help="validation text for --head-importance (default the run's val split)")
    p.add_argument("--windows", type=int, default=4, metavar="N", help="--head-importance: windows of text (default 4)")
    p.add_argument("--length", type=int, default=256, metavar="T",
                   help="--head-importance: tokens per window (default 256, at most block_size)")
    p.add_argument("--device", help="cpu (default), cuda, cuda:1")
    add_trust_option(p)
    p.set_defaults(func=cmd_attention)

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
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value for every variant, as train --set (after the file's own set); "
                   "steps, tokens, seeds and evals change the ablation's budget (e.g. --set steps=50); repeatable")
    add_trust_option(p)
    p.set_defaults(func=cmd_ablate)

    p = sub.add_parser("coordcheck", help="mean activation per layer kind across widths after a few steps, "
                       "standard vs mup (docs/mup.md)")
    coordcheck.add_arguments(p)
    add_recipe_options(p)
    p.set_defaults(func=coordcheck.run)

    p = sub.add_parser("runs", help="a table of run folders: recipe, steps, best val loss, state, age",
                       description="One line per run folder under DIR: its recipe, steps done of its total, "
                       "best validation loss, state (finished, converted, resumable: has a complete checkpoint, "
                       "broken: neither, with the reason) and age. Reads the folders as data only: no plugin "
                       "code runs.")
    p.add_argument("dir", nargs="?", metavar="DIR", help=f"a folder of run folders (default {DEFAULT_DIR}/)")
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser("completion", help="print a shell completion script (bash or zsh)",
                       description="Print a completion script for commands, recipe files and --set keys. "
                       "Load it with `source <(playattention completion bash)` (or zsh) in your shell's rc file.")
    p.add_argument("shell", choices=completion.SHELLS)
    p.set_defaults(func=cmd_completion)
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


NAME_MAX = 255  # Linux and macOS

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
    global IMPORTED
    IMPORTED = IMPORTED or time.perf_counter()  # the first call: the module's imports are done
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
