"""`playattention train`: train a recipe, resume or extend a run, on one process or N local ranks."""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from .. import cli
from ..checkpoint import latest, read_state
from ..convert import recipe_for_init
from ..data import prepared_dir, read_split
from ..engine import deepspeed_config, lr_at
from ..errors import CheckpointError, UsageError, UserError, one_line
from ..inspection import check_fits
from ..launch import LAUNCHER_PID, PARENT_PID, die_with_parent
from ..plugin_manager import is_path_spec
from ..probe import load_buildable
from ..recipe import diff_lines, dump_recipe, flatten, recipe_to_dict, registry_of
from ..runfolder import LOCK_HOLDER_ENV, check_resumable, find_run, lock_folder, new_run_dir
from ..tokenizer import load_tokenizer
from ..trainer import train
from . import add_recipe_options
from .exports import add_no_verify, check_export
from .recipe import print_warnings


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
                    verbose=args.verbose, launched=(cli.STARTED, cli.IMPORTED))
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


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Train a recipe with DeepSpeed's ZeRO engine as one process, or on N local "
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
