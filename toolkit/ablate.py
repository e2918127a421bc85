"""Running an ablation: every (variant, seed) trained the same way, then one comparison report.

:mod:`toolkit.ablation` reads the file and resolves each variant's recipe; this module runs them.
Each (variant, seed) trains in a subprocess (``python -m toolkit train``) into
``<out>/<variant>-s<seed>/``, one after another or ``--parallel N`` side by side (one GPU each, or
CPU threads divided between them). The resolved recipe of each run is kept in ``<out>/recipes/``, its
output in ``<out>/logs/``, and ``<out>/state.json`` records each run's recipe fingerprint and status.
Re-running skips finished runs whose recipe is unchanged, resumes interrupted ones from their newest
complete checkpoint (``train --resume``), starts failed and changed ones again, and a run that fails
is recorded (with its last error line) while the others go on. Ctrl-C or SIGTERM stops the running
trainings, which save a checkpoint first. The report (:mod:`toolkit.report`) is refreshed after every run.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import attrs
import torch
from tqdm import tqdm

from . import report
from .ablation import Ablation, Resolved, budget_line
from .engine import free_port
from .errors import CheckpointError, UsageError
from .recipe import dump_recipe, registry_of
from .runfolder import check_resumable, lock_folder
from .safeio import write_atomically


# -- running -----------------------------------------------------------------------------------
@attrs.frozen
class Job:
    variant: str
    seed: int
    name: str
    recipe_text: str
    fingerprint: str
    code: dict = attrs.field(factory=dict, eq=False)  # each plugin source and the code it stands for


def plan_jobs(ablation: Ablation, resolved: list[Resolved]) -> list[Job]:
    """One job per (variant, seed), variants outermost. The fingerprint hashes the resolved recipe and
    the code of every plugin it loads (a file's content, a package's version and module), so a run is
    reused only if neither changed."""
    jobs = []
    for r in resolved:
        code = registry_of(r.recipe).code()
        for seed in ablation.seeds:
            text = dump_recipe(r.recipe_for(ablation, seed))  # plugin paths are absolute: it trains from anywhere
            start = f"\n# init_from {ablation.init_from.resolve()}" if ablation.init_from is not None else ""
            digest = hashlib.sha256((text + start + json.dumps(code, sort_keys=True)).encode()).hexdigest()[:16]
            jobs.append(Job(r.variant.name, seed, ablation.run_name(r.variant.name, seed), text, digest, code))
    return jobs


def why_rerun(seen: dict, job: Job) -> str | None:
    """Why a finished run cannot be reused for ``job`` (its plugin code or its recipe changed), or None."""
    if seen.get("fingerprint") == job.fingerprint:
        return None
    before = seen.get("code")
    if isinstance(before, dict):
        changed = sorted(k for k in {*before, *job.code} if before.get(k) != job.code.get(k))
        if changed:
            return "plugin code changed since it ran: " + ", ".join(
                f"{k} ({before.get(k, 'absent')} -> {job.code.get(k, 'absent')})" for k in changed[:3])
    elif "code" not in seen and seen.get("fingerprint"):
        return "it ran before plugin code was fingerprinted"
    return "its recipe changed since it ran"


def resume_args(run_dir: Path) -> list[str] | None:
    """``train`` arguments that continue an interrupted run from its newest complete checkpoint,
    or None (no complete checkpoint) to start it over."""
    try:
        check_resumable(run_dir)
    except CheckpointError:
        return None
    return ["--resume", str(run_dir)]


def last_error_line(log_text: str) -> str | None:
    """The line that says why a run died: the exception line of a traceback, an ``error:`` line, or the last line."""
    lines = [ln.strip() for ln in log_text.replace("\r", "\n").splitlines() if ln.strip()]
    pattern = re.compile(r"^(error:|([A-Za-z_][\w.]*)?(Error|Exception|Interrupt|Exit)\b)")
    for ln in reversed(lines):
        if pattern.match(ln):
            return ln
    return lines[-1] if lines else None


def _gpus() -> list[str]:
    if not torch.cuda.is_available():
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        return [d.strip() for d in visible.split(",") if d.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


def child_env(slot: int, parallel: int, gpus: list[str]) -> dict[str, str]:
    """The environment of one training subprocess: its own rendezvous port, and with ``parallel > 1``
    its own GPU or its share of the CPU cores."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    root = str(Path(__file__).resolve().parent.parent)  # the same toolkit as this process, installed or not
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    env.update(PYTHONUNBUFFERED="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    # idle OpenMP threads sleep instead of spinning: on a shared CPU spinning made training ~10x slower
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if parallel > 1:
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[slot]
        else:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(max(1, cores // parallel))
    return env


class _State:
    """``state.json``: per run, the recipe fingerprint it ran with, its status and error."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.runs: dict[str, dict] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            self.runs = {}

    def get(self, name: str) -> dict:
        return self.runs.get(name, {})

    def set(self, name: str, **fields) -> None:
        self.runs[name] = {**self.runs.get(name, {}), **fields}
        write_atomically(self.path, json.dumps(self.runs, indent=1, sort_keys=True))


def _header(ablation: Ablation, resolved: list[Resolved]) -> list[str]:
    lines = [ablation.description] if ablation.description else []
    lines += [
        budget_line(ablation, resolved),
        f"seeds: {', '.join(map(str, ablation.seeds))}; baseline: {ablation.baseline}",
        f"ablation file: `{ablation.path}`; per-run recipes in `recipes/`, logs in `logs/`",
    ]
    return lines


def run_ablation(ablation: Ablation, resolved: list[Resolved], out: str | Path, *, parallel: int = 1,
                 progress: bool = True) -> list[report.RunResult]:
    """Train every (variant, seed) not already finished, refreshing the report after each; return all runs.

    ``out`` is locked while this runs (a second ``ablate`` into it is refused, naming this pid)."""
    lock = lock_folder(out, "ablation folder")
    try:
        return _run_ablation(ablation, resolved, Path(out), parallel=parallel, progress=progress)
    finally:
        lock.release()


def _run_ablation(ablation: Ablation, resolved: list[Resolved], out: Path, *, parallel: int,
                  progress: bool) -> list[report.RunResult]:
    for sub in ("recipes", "logs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ablation.path, out / "ablation.toml")
    state = _State(out / "state.json")
    gpus = _gpus() if parallel > 1 else []
    if gpus and parallel > len(gpus):
        raise UsageError(f"--parallel {parallel} needs {parallel} GPUs (one per variant); {len(gpus)} visible")
    jobs = plan_jobs(ablation, resolved)
    infos = [r.info for r in resolved]
    results: dict[str, report.RunResult] = {}
    todo, reruns = [], []
    for job in jobs:
        run_dir = out / job.name
        seen = state.get(job.name)
        res = report.read_run(job.variant, job.seed, run_dir, status=seen.get("status", "pending"), error=seen.get("error"))
        if res.status == "finished":
            why = why_rerun(seen, job)
            if why is None:
                results[job.name] = res
                continue
            reruns.append(f"{job.name}: {why}")
        results[job.name] = report.RunResult(job.variant, job.seed, str(run_dir), "pending")
        todo.append(job)
    reused = [j.name for j in jobs if j not in todo]

    def refresh() -> None:
        runs = [results[j.name] for j in jobs]
        header = _header(ablation, resolved)
        if reused:
            header.append(f"reused from an earlier run of this ablation (same recipe and plugin code): {', '.join(reused)}")
        header += [f"trained again, {why}" for why in reruns]
        report.write_report(out, infos, runs, baseline=ablation.baseline, title=ablation.name, header=header)

    refresh()
    # disable=None: a bar on a terminal only; a log file gets the plain lines of `say` alone
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc=ablation.name, unit="run",
               disable=None if progress else True, dynamic_ncols=True)
    say = bar.write if progress else (lambda s: None)
    if reused:
        say(f"{len(reused)} of {len(jobs)} runs already finished with the same recipe and plugin code; "
            f"skipping them: {', '.join(reused)}")
    for why in reruns:
        say(f"training again {why}")
    active: dict[int, tuple[Job, subprocess.Popen, Any, float]] = {}
    queue = list(todo)
    started = 0

    def launch(slot: int, job: Job) -> None:
        nonlocal started
        run_dir = out / job.name
        seen = state.get(job.name)
        args = None
        if run_dir.exists():
            if seen.get("fingerprint") == job.fingerprint and seen.get("status") in ("running", "interrupted"):
                args = resume_args(run_dir)
            if args is None:
                shutil.rmtree(run_dir)  # a changed recipe, a failed run, or no way to resume: start over
        recipe_path = out / "recipes" / f"{job.name}.toml"
        recipe_path.write_text(job.recipe_text)
        start = []  # a new run starts from the ablation's init_from folder, if it names one
        if args is None and ablation.init_from is not None:
            start = ["--init-from", str(ablation.init_from.resolve())]
        # --trust-plugins: the recipe's plugin files were allowed to run here already, when the ablation loaded
        cmd = [sys.executable, "-m", "toolkit", "train", str(recipe_path), "--run-dir", str(run_dir), *(args or start),
               "--trust-plugins"]
        log = open(out / "logs" / f"{job.name}.log", "a" if args else "w")
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        # its own session: a Ctrl-C at the terminal reaches only this process, which then stops each
        # training with exactly one SIGTERM (a second signal would make it stop without a checkpoint)
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env(slot, parallel, gpus),
                                start_new_session=True)
        started += 1
        state.set(job.name, fingerprint=job.fingerprint, code=job.code, status="running", error=None, started=time.time())
        results[job.name] = report.RunResult(job.variant, job.seed, str(run_dir), "running")
        where = f" on GPU {gpus[slot]}" if gpus else ""
        say(f"start {job.name}{' (resuming)' if args else ''}{where}: run {started} of {len(todo)}, "
            f"{len(todo) - started} waiting")
        active[slot] = (job, proc, log, time.time())

    def finish(slot: int, rc: int) -> None:
        job, proc, log, t0 = active.pop(slot)
        log.close()
        run_dir = out / job.name
        res = report.read_run(job.variant, job.seed, run_dir, status="failed")
        error = None
        if res.status == "interrupted":  # stopped by a signal; the trainer saved a checkpoint to resume from
            error = f"interrupted (exit status {rc})"
            res = attrs.evolve(res, error=error)
        elif rc != 0 or res.status != "finished":
            log_text = (out / "logs" / f"{job.name}.log").read_text(errors="replace")
            if rc < 0:
                error = f"killed by signal {-rc}" + (" (out of memory?)" if -rc == 9 else "")
            else:
                error = res.error or last_error_line(log_text) or f"exit status {rc}"
            if rc == 0:
                error = f"the trainer exited without a finished summary.json ({error})"
            res = attrs.evolve(res, status="failed", error=error)
        results[job.name] = res
        state.set(job.name, status=res.status, error=error, returncode=rc, wall_s=round(time.time() - t0, 1))
        if res.status == "finished":
            loss = res.summary.get("final_val_loss")
            say(f"done  {job.name}: final val loss {loss:.4f}, {time.time() - t0:.0f}s" if isinstance(loss, (int, float))
                else f"done  {job.name}: {time.time() - t0:.0f}s")
        else:
            say(f"{res.status.upper()} {job.name}: {error} (log: {out / 'logs' / (job.name + '.log')})")
        bar.update(1)
        refresh()

    def on_term(signum, frame):  # a scheduler's SIGTERM stops the runs as Ctrl-C does
        raise KeyboardInterrupt

    old_term = signal.signal(signal.SIGTERM, on_term) if threading.current_thread() is threading.main_thread() else None
    try:
        while queue or active:
            for slot in range(parallel):
                if slot not in active and queue:
                    launch(slot, queue.pop(0))
            time.sleep(0.2)
            for slot, (_, proc, _, _) in list(active.items()):
                rc = proc.poll()
                if rc is not None:
                    finish(slot, rc)
    except BaseException:  # Ctrl-C, SIGTERM, or a bug here: never leave training processes behind
        for slot, (job, proc, log, _) in list(active.items()):
            proc.terminate()  # the trainer finishes its step and saves a checkpoint to resume from
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
            state.set(job.name, status="interrupted")
            results[job.name] = attrs.evolve(results[job.name], status="interrupted", error="interrupted")
        refresh()
        raise
    finally:
        bar.close()
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    return [results[j.name] for j in jobs]
