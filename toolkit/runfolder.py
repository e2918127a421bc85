"""The run folder a person opens after training; rank 0 writes it.

    runs/<recipe name>-<YYYYmmdd-HHMMSS>/
        recipe.toml        the resolved recipe (``playattention train`` it again to rerun)
        ds_config.json     the DeepSpeed config it ran with
        versions.json      python, torch, deepspeed, playattention and plugin versions
        metrics.jsonl      one "train" line per optimizer step, one "eval" line per evaluation
        tensorboard/ wandb/ metrics.csv   the same metrics for the trackers [train.trackers] turns on
        losses.png         train and val loss (and evaluator scores) vs step, redrawn at each evaluation
        summary.png        learning rate, gradient norm and tokens/s vs step
        samples.txt        generated text, each sample headed by the step it was drawn at
        checkpoints/       checkpoints, step-NNNNNNN, each committed whole (:mod:`toolkit.checkpoint`)
        resume.log         one entry per resume: from which checkpoint, what changed
        model.safetensors  fp32 weights under GPT-2 names, with tokenizer.json and recipe.toml:
                           the run without DeepSpeed (:func:`toolkit.generate.load_run`)
        model.toml         the model table alone, for reading (never loaded: recipe.toml is authoritative)
        export.json        the size and sha256 of model.safetensors, model.toml and tokenizer.json, checked
                           by generate, eval, convert, inspect and --init-from (--no-verify skips it)
        summary.json       the result
"""
from __future__ import annotations

import errno
import fcntl
import importlib.metadata as md
import json
import math
import os
import platform
import re
import stat
import time
from pathlib import Path

import tomli_w
import torch

from . import checkpoint, safeio
from .errors import CheckpointError
from .plots import plot_losses, plot_summary
from .recipe import Recipe, dump_recipe, recipe_to_dict
from .registry import Registry
from .trackers import Trackers


def default_run_dir(recipe: Recipe) -> Path:
    """``<train.out_dir>/<recipe name>-<YYYYmmdd-HHMMSS>``, with a numeric suffix if that exists."""
    name = re.sub(r"[^\w.-]+", "-", recipe.name).strip("-") or "run"
    base = Path(recipe.train.out_dir) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def new_run_dir(recipe: Recipe) -> Path:
    """A :func:`default_run_dir` made here and now (``mkdir`` fails if it exists): two runs of one recipe
    started in the same second get a folder each, not one folder with two writers."""
    for _ in range(100):
        path = default_run_dir(recipe)
        try:
            path.mkdir(parents=True)
        except FileExistsError:
            continue  # taken since default_run_dir looked: the next call picks the next suffix
        except OSError:
            pass  # unwritable: said in one line where the folder is first written (checkpoint.unwritable)
        return path
    return path  # something odd in the way (a dangling symlink): the first write says what


#: model.toml is for reading: nothing loads it (a run is rebuilt from recipe.toml, which is authoritative)
MODEL_TOML_HEADER = ("# The model of this run, for reading. Nothing loads this file: recipe.toml is the run's\n"
                     "# authoritative description (playattention generate rebuilds the model from it).\n")


#: the files a run folder holds besides checkpoints/ (tensorboard/ and wandb/ are the trackers' own)
RUN_FILES = ("recipe.toml", "ds_config.json", "versions.json", "metrics.jsonl", "metrics.csv", "losses.png",
             "summary.png", "samples.txt", "resume.log", checkpoint.WEIGHTS, "model.toml", checkpoint.EXPORT_RECORD,
             "summary.json", "tokenizer.json")


def files_problem(run_dir: str | Path) -> str | None:
    """The first file of the run folder that is not a regular file inside it, in one line, or None
    (a FIFO would block a read or a write for ever, a folder or a dangling symlink fail mid-run)."""
    for name in RUN_FILES:
        if why := safeio.problem(Path(run_dir) / name, inside=run_dir):
            return f"{why}; a run folder's {name} must be a regular file: move it away to go on"
    return None


def summary_damage(path: Path) -> str | None:
    """One line if a resumed run's summary.json is damaged (it is written again when the session ends), else None."""
    if not path.exists():
        return None
    try:
        summary = safeio.read_json(path, inside=path.parent)
        if isinstance(summary, dict):
            return None
        why = "not a JSON object"
    except (OSError, ValueError) as exc:
        why = str(exc).removeprefix(f"{path}: ")
    return f"{path.name} is damaged ({why}): lost the previous session's summary, written again when this one ends"


class RunFolder:
    """The files of one run. Only rank 0 makes one (other ranks hold ``None``)."""

    def __init__(self, path: Path, title: str, trackers: Trackers | None = None):
        self.path, self.title = Path(path), title
        self.metrics_path = self.path / "metrics.jsonl"
        self._metrics = None
        self.trackers = trackers  # TensorBoard, W&B, CSV: they get every metrics line too

    # -- at the start -------------------------------------------------------------------------
    def write_start(self, recipe: Recipe, ds_config: dict, registry: Registry, tokenizer) -> None:
        self.write_identity(recipe, registry, tokenizer)
        (self.path / "ds_config.json").write_text(json.dumps(ds_config, indent=2) + "\n")

    def write_identity(self, recipe: Recipe, registry: Registry, tokenizer) -> None:
        """recipe.toml, versions.json and the tokenizer (if any): what a run folder's weights come from,
        whether it was trained or converted (toolkit.convert)."""
        (self.path / "recipe.toml").write_text(dump_recipe(recipe))
        (self.path / "versions.json").write_text(json.dumps(versions(registry), indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(self.path)

    def record_resume(self, step: int, found: Path, world_size: int, saved_world_size: int, changes: list[str],
                      notes: list[str] = ()) -> list[str]:
        """Drop metrics and samples logged after ``step`` (and a damaged metrics tail); note the resume
        in resume.log and metrics.jsonl. ``notes``: more to say (checkpoints skipped as incomplete)."""
        _, damaged = checkpoint.repair_metrics(self.metrics_path, step)
        checkpoint.trim_samples(self.path / "samples.txt", step)
        damaged = [d for d in (damaged, summary_damage(self.path / "summary.json"),
                               checkpoint.samples_damage(self.path / "samples.txt")) if d]
        ranks = f"{world_size} rank(s)"
        if saved_world_size != world_size:
            ranks += f" (it was saved by {saved_world_size}: new optimizer partitions, data position kept)"
        lines = [f"{time.strftime('%Y-%m-%d %H:%M:%S')} resumed at step {step} from {found} on {ranks}",
                 *(f"  changed {c}" for c in changes), *(f"  {n}" for n in notes),
                 *(f"  {d}" for d in damaged)]
        with open(self.path / "resume.log", "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        self.write_metrics({"type": "resume", "step": step, "checkpoint": found.name, "world_size": world_size,
                            "saved_world_size": saved_world_size, "changes": changes})
        return lines

    # -- while training -----------------------------------------------------------------------
    def write_metrics(self, row: dict) -> None:
        """One line of metrics.jsonl (non-finite numbers as null: JSON has no nan)."""
        if self._metrics is None:
            self._metrics = open(self.metrics_path, "a", encoding="utf-8")
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        self._metrics.write(json.dumps(clean) + "\n")
        self._metrics.flush()
        if self.trackers is not None:
            self.trackers.log(clean)

    def plot(self, summary: bool = False) -> None:
        """Redraw losses.png (at every evaluation) and, at the end, summary.png."""
        plot_losses(self.metrics_path, self.path / "losses.png", title=self.title)
        if summary:
            plot_summary(self.metrics_path, self.path / "summary.png", title=self.title)

    def append_samples(self, step: int, texts: list[str], gen) -> None:
        with open(self.path / "samples.txt", "a", encoding="utf-8") as f:
            for i, text in enumerate(texts):
                f.write(f"=== step {step} | sample {i + 1}/{len(texts)} | temperature {gen.temperature}, "
                        f"top_k {gen.top_k}, top_p {gen.top_p}, seed {gen.seed} ===\n{text}\n\n")

    # -- at the end ---------------------------------------------------------------------------
    def write_export(self, state: dict[str, torch.Tensor], recipe: Recipe, step: int) -> Path:
        """model.safetensors (fp32, GPT-2 names, a tied head once) and model.toml."""
        path = self.path / checkpoint.WEIGHTS
        checkpoint.export_weights(state, path, tied=recipe.model.tie_embeddings,
                                  metadata={"format": "pt", "recipe": recipe.name, "step": step})
        d = recipe_to_dict(recipe)
        safeio.write_atomically(self.path / "model.toml", MODEL_TOML_HEADER + tomli_w.dumps(
            {"plugins": d.get("plugins", []), "model": d["model"]}))
        checkpoint.write_export_record(self.path)  # last: generate, eval, convert check the files against it
        return path

    def write_summary(self, summary: dict) -> None:
        """summary.json, written whole or not at all (a full disk leaves the previous one), then the plots."""
        safeio.write_atomically(self.path / "summary.json", json.dumps(summary, indent=2) + "\n")
        if self.metrics_path.is_file():
            self.plot(summary=True)

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        if self.trackers is not None:
            self.trackers.close()


def versions(registry: Registry) -> dict:
    """Versions of everything that shaped the run, plugin packages from the registry's sources."""
    import deepspeed

    def version(dist: str) -> str | None:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return None

    plugins: dict[tuple, dict] = {}
    for comp in registry:
        src = comp.source
        entry = plugins.setdefault((src.plugin, src.package, src.version),
                                   {"plugin": src.plugin, "package": src.package, "version": src.version,
                                    "components": []})
        entry["components"].append(f"{comp.family}:{comp.name}")
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "deepspeed": deepspeed.__version__,
        "playattention": version("playattention"),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "plugins": list(plugins.values()),
    }


# -- one writer per run folder ---------------------------------------------------------------------
#: the lock file inside a run folder (or an ablation's output folder): its writer holds an flock on it
LOCK_FILE = ".writer.lock"
#: set by ``train --nproc`` for its ranks: the pid of the launching process that holds the run folder's lock
LOCK_HOLDER_ENV = "PLAYATTENTION_RUN_LOCK_PID"


class RunLock:
    """The lock of one folder's writer: an OS file lock (``flock``) on ``<folder>/.writer.lock``.

    The kernel releases it when the process ends, however it ends (kill -9 included), so a crash
    never leaves a folder locked; the file only records the holder's pid for the message.
    """

    def __init__(self, fd: int, path: Path):
        self.fd, self.path = fd, path

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor drops the flock
            self.fd = None


def lock_folder(folder: str | Path, what: str = "run folder") -> RunLock:
    """Lock ``folder`` (created if missing) for this process, or CheckpointError naming the holder's pid.

    Non-blocking: a second writer is refused at once instead of waiting for the first to finish.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # O_NOFOLLOW: a symlink planted in the lock's place is refused, never followed and truncated
        fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise CheckpointError(f"{folder / LOCK_FILE}: a symbolic link; remove it to use this {what}") from None
        raise CheckpointError(f"{folder}: cannot write to the {what} ({exc.strerror or exc})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CheckpointError(f"{folder / LOCK_FILE}: not a regular file; remove it to use this {what}")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CheckpointError(f"{folder}: another playattention process{holder(fd)} is writing this {what}; "
                                  f"wait for it to finish or stop it") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    return RunLock(fd, folder / LOCK_FILE)


def holder(fd: int) -> str:
    """`` (pid N)`` from a held lock file, or nothing if it has no pid yet (its holder is writing it)."""
    for _ in range(20):  # the holder writes its pid just after taking the lock
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        if text.isdigit():
            return f" (pid {text})"
        time.sleep(0.01)
    return ""


def locked_by_launcher(folder: str | Path) -> bool:
    """Whether ``folder``'s lock is held by the ``train --nproc`` process that launched this rank
    (it took the lock before starting the ranks, and holds it while they run)."""
    pid = os.environ.get(LOCK_HOLDER_ENV, "")
    try:
        fd = os.open(Path(folder) / LOCK_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:  # held: by the launcher if the file names it
        return pid.isdigit() and holder(fd) == f" (pid {pid})"
    else:
        return False  # nobody holds it: the launcher is gone
    finally:
        os.close(fd)
