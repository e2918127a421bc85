"""Compare two runs' loss curves step by step, exactly (after torchtitan's ``scripts/loss_compare.py``).

    python -m toolkit.losscompare RUN_A RUN_B                 # a table of the steps where they differ
    python -m toolkit.losscompare RUN_A RUN_B --assert-equal  # exit 1 at the first difference

Reads each run folder's ``metrics.jsonl`` (or the file itself) and compares, for every step both
logged, the train rows' ``loss``, ``grad_norm`` and ``lr`` and the eval rows' ``train_loss`` and
``val_loss``, as the floats they were written as: equal means bitwise equal, which is what a
resumed run must be to the same run never stopped (fp32 on one device, same ranks; see
docs/checkpoints.md for when CPU runs are reproducible). Steps only one run has are reported too.
"""
from __future__ import annotations

import argparse
import struct
import sys
from pathlib import Path

from . import safeio

#: what is compared: (row type, key)
KEYS = (("train", "loss"), ("train", "grad_norm"), ("train", "lr"), ("eval", "train_loss"), ("eval", "val_loss"))


def read_curves(run: str | Path) -> dict[tuple[str, int], dict]:
    """``(type, step) -> row`` of a run's train and eval rows (a damaged line is skipped; a later
    row of a step replaces an earlier one, as a resume's trimming would have)."""
    path = Path(run)
    path = path / "metrics.jsonl" if path.is_dir() else path
    out = {}
    for row in safeio.read_jsonl(path):
        if row.get("type") in ("train", "eval") and isinstance(row.get("step"), int):
            out[(row["type"], row["step"])] = row
    return out


def differences(a: str | Path, b: str | Path, keys=KEYS) -> list[str]:
    """One line per (step, key) that differs between runs ``a`` and ``b``, in step order."""
    ca, cb = read_curves(a), read_curves(b)
    lines = []
    for kind, step in sorted(set(ca) | set(cb), key=lambda k: (k[1], k[0])):
        if (kind, step) not in ca or (kind, step) not in cb:
            lines.append(f"step {step} {kind}: only in {'a' if (kind, step) in ca else 'b'}")
            continue
        for row_kind, key in keys:
            if row_kind != kind:
                continue
            va, vb = ca[(kind, step)].get(key), cb[(kind, step)].get(key)
            if va != vb or type(va) is not type(vb):
                ulps = _ulps(va, vb)
                lines.append(f"step {step} {kind} {key}: {va!r} != {vb!r}" + (f" ({ulps} ulp)" if ulps else ""))
    return lines


def _ulps(x, y) -> int | None:
    """How many float32 steps apart two logged numbers are (they were fp32 before JSON), if both are floats."""
    if not (isinstance(x, float) and isinstance(y, float)):
        return None

    def bits(v: float) -> int:
        (n,) = struct.unpack("<i", struct.pack("<f", v))
        return n if n >= 0 else -(n & 0x7FFFFFFF)

    try:
        return abs(bits(x) - bits(y))
    except (OverflowError, struct.error):
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m toolkit.losscompare", description=__doc__.splitlines()[0])
    parser.add_argument("a", help="a run folder or its metrics.jsonl")
    parser.add_argument("b", help="another run folder or metrics.jsonl")
    parser.add_argument("--assert-equal", action="store_true",
                        help="exit 1 unless every compared value of every step is bitwise equal")
    args = parser.parse_args(argv)
    for run in (args.a, args.b):
        p = Path(run)
        if not (p / "metrics.jsonl" if p.is_dir() else p).is_file():
            print(f"error: {run}: no metrics.jsonl", file=sys.stderr)
            return 2
    lines = differences(args.a, args.b)
    steps = len({k[1] for k in read_curves(args.a)})
    if not lines:
        print(f"equal: {steps} steps, {', '.join(f'{t}.{k}' for t, k in KEYS)} bitwise the same")
        return 0
    print("\n".join(lines[:50] + ([f"... and {len(lines) - 50} more"] if len(lines) > 50 else [])))
    if args.assert_equal:
        print(f"error: the runs differ first at {lines[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
