"""`playattention ablate`: train a grid of component swaps and write a comparison report."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..ablate import run_ablation
from ..ablation import dry_run_text, load_ablation
from ..errors import UsageError
from . import add_trust_option


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


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Train every variant of an ablation file (a base recipe plus component swaps) "
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
