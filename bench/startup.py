"""How long the light commands take to start: import time and each command's wall and CPU time.

    python bench/startup.py [--rounds 5] [--json FILE]

First ``python -X importtime -m toolkit --help``: the total of its "self" column (every module's own
import time, once) and the ten slowest packages and toolkit modules by cumulative time. Then ``--help``,
``recipe show recipes/gpt-cpu.toml``, ``plugins`` and ``diff recipes/gpt2.toml recipes/llama.toml``
run ``--rounds`` times each as fresh processes, alternating, with the median and the best wall time
and the median CPU time (user + system of the child). The goal (issue 20) is under 1 s of CPU for
each; compare numbers within one table only, the machine's load moves them.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = {
    "--help": ["--help"],
    "recipe show": ["recipe", "show", "recipes/gpt-cpu.toml"],
    "plugins": ["plugins"],
    "diff": ["diff", "recipes/gpt2.toml", "recipes/llama.toml"],
}


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [e.get("PYTHONPATH")])])
    return e


def import_times() -> tuple[float, list[tuple[float, str]]]:
    """(total seconds of every module's own import, [(cumulative s, name)] of the ten slowest packages:
    each top-level package (torch, deepspeed, toolkit.cli's) with what it imported, wherever it was first imported)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "toolkit", "--help"], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=300)
    total, top = 0, []
    for line in proc.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if m:
            total += int(m.group(1))
            if "." not in m.group(4) or m.group(4).startswith("toolkit."):
                top.append((int(m.group(2)) / 1e6, m.group(4)))
    return total / 1e6, sorted(top, reverse=True)[:10]


def timed(args: list[str]) -> tuple[float, float]:
    """(wall s, CPU s) of one fresh ``python -m toolkit ARGS``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "toolkit", *args], cwd=ROOT, env=env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=300)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode not in (0, 1):  # diff exits 1 when the recipes differ
        sys.exit(f"python -m toolkit {' '.join(args)} failed ({proc.returncode}): {proc.stderr.decode()[-500:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", metavar="FILE", help="also write the numbers as JSON")
    args = ap.parse_args()

    total, top = import_times()
    print(f"python -X importtime -m toolkit --help: {total:.2f} s of imports in all; "
          "the slowest, with what they import:")
    for cum, name in top:
        print(f"  {cum:6.2f} s  {name}")
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in COMMANDS}
    for _ in range(args.rounds):
        for name, argv in COMMANDS.items():  # alternating, so load on the machine slows each alike
            times[name].append(timed(argv))
    rows = {name: {"wall_median_s": statistics.median(w for w, _ in t), "wall_best_s": min(w for w, _ in t),
                   "cpu_median_s": statistics.median(c for _, c in t)} for name, t in times.items()}
    print(f"\n| command ({args.rounds} runs each) | wall median | wall best | CPU median |")
    print("|---|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| playattention {name} | {r['wall_median_s']:.2f} s | {r['wall_best_s']:.2f} s "
              f"| {r['cpu_median_s']:.2f} s |")
    if args.json:
        Path(args.json).write_text(json.dumps({"import_total_s": total, "slowest_imports": top, "commands": rows},
                                              indent=2) + "\n")


if __name__ == "__main__":
    main()
