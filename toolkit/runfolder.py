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

Besides writing it, the chores on a run folder live here: finding the run ``--resume`` means
(:func:`find_run`, :func:`check_resumable`), trimming its metrics and samples back to the step it
resumes from (:func:`repair_metrics`, :func:`trim_samples`), and its exported weights, their record
and loading them (:func:`export_weights`, :func:`write_export_record`, :func:`load_weights`).
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
import sys
import time
from pathlib import Path

import tomli_w
import torch
from safetensors.torch import load_file, save_file

from . import safeio
from .checkpoint import latest, list_checkpoints, problem
from .errors import CheckpointError
from .plots import plot_losses, plot_summary
from .recipe import Recipe, dump_recipe, recipe_to_dict
from .registry import Registry
from .safeio import sha256_of, write_atomically
from .trackers import Trackers

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


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
            pass  # unwritable: said in one line where the folder is first written (unwritable)
        return path
    return path  # something odd in the way (a dangling symlink): the first write says what


# -- finding a run to resume -----------------------------------------------------------------------
RUN_NAME_RE = re.compile(r"-(\d{8}-\d{6})(?:-(\d+))?$")  # <name>-<YYYYmmdd-HHMMSS>[-n] (default_run_dir)


def check_resumable(run_dir: str | Path) -> Path:
    """``run_dir`` if it is a run folder with a complete checkpoint; CheckpointError (one line) if not."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise CheckpointError(f"--resume {run_dir}: no such run folder")
    recipe = run_dir / "recipe.toml"
    if not run_dir.is_dir() or not (recipe.exists() or recipe.is_symlink()):
        raise CheckpointError(f"--resume {run_dir}: not a run folder (no recipe.toml)")
    if why := safeio.problem(recipe, inside=run_dir):
        raise CheckpointError(f"--resume {run_dir}: {why}")
    if latest(run_dir / "checkpoints") is None:
        broken = [f"{p.name} ({problem(p)})" for p in list_checkpoints(run_dir / "checkpoints")]
        detail = f"; incomplete: {', '.join(broken)}" if broken else ""
        raise CheckpointError(f"--resume {run_dir}: no complete checkpoint in {run_dir / 'checkpoints'}{detail}")
    return run_dir


def find_run(out_dir: str | Path, recipe_name: str) -> Path:
    """The newest run folder of ``recipe_name`` under ``out_dir`` with a complete checkpoint (``--resume auto``)."""
    out_dir, found = Path(out_dir), []
    for run in (out_dir.iterdir() if out_dir.is_dir() else []):
        m = RUN_NAME_RE.search(run.name)
        if not m or not (run / "recipe.toml").is_file() or latest(run / "checkpoints") is None:
            continue
        try:
            name = tomllib.loads(safeio.read_text(run / "recipe.toml", inside=run)).get("name")
        except (OSError, ValueError, RecursionError):
            continue
        if name == recipe_name:
            found.append(((m.group(1), int(m.group(2) or 1)), run))
    if not found:
        raise CheckpointError(f"--resume auto: no run of recipe {recipe_name!r} under {out_dir} has a complete checkpoint")
    return max(found)[1]


def unwritable(run_dir: str | Path) -> str | None:
    """Create ``run_dir`` and write a file there; None if that worked, else why not (one line)."""
    run_dir = Path(run_dir)
    probe = run_dir / f".write-test-{os.getpid()}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        return f"{run_dir}: cannot write to the run folder ({exc.strerror or exc})"
    return None


# -- a resumed run's metrics and samples -----------------------------------------------------------
def trim_metrics(path: str | Path, step: int) -> int:
    """Drop metrics lines after ``step`` (and a torn last line); returns how many were dropped.
    See :func:`repair_metrics` for a damaged file."""
    return repair_metrics(path, step)[0]


def repair_metrics(path: str | Path, step: int) -> tuple[int, str | None]:
    """Keep metrics.jsonl's lines up to ``step``: (lines dropped, a note if the file was damaged).

    A line that is not UTF-8 JSON of an object with an integer ``step`` ends the valid prefix:
    it and everything after it go, and the note says where. A torn last line (a kill while
    writing) is dropped without a note. A folder in the file's place is a CheckpointError.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: a folder where the run's metrics file belongs; move it away to resume")
    if not path.exists() and not path.is_symlink():
        return 0, None
    try:
        raw = safeio.read_bytes(path, inside=path.parent)
    except OSError as exc:
        raise CheckpointError(f"cannot read the run's metrics: {exc}; move it away to resume") from None
    lines = raw.split(b"\n")
    torn = lines.pop() if lines else b""  # the bytes after the last newline: a torn line, or nothing
    kept, dropped, note = [], 0, None
    for n, line in enumerate(lines, 1):
        try:
            row = json.loads(line.decode("utf-8"))
            ok = isinstance(row, dict) and isinstance(row.get("step"), int) and not isinstance(row["step"], bool)
        except ValueError:  # UnicodeDecodeError, JSONDecodeError
            ok = False
        if not ok:
            note = (f"{path.name} is damaged at line {n}: kept the {len(kept)} valid line(s) before it, "
                    f"dropped {len(lines) - n + 1} from there on")
            dropped += len(lines) - n + 1
            break
        if row["step"] > step:
            dropped += 1
        else:
            kept.append(line)
    dropped += bool(torn)
    if dropped:
        write_atomically(path, b"".join(ln + b"\n" for ln in kept))
    return dropped, note


SAMPLE_HEADER = re.compile(rb"^=== step (\d+) \|", re.M)


def trim_samples(path: str | Path, step: int) -> int:
    """Drop the samples drawn after ``step`` from samples.txt; returns how many were dropped."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return 0
    try:  # bytes: a damaged file is trimmed, not a UnicodeDecodeError
        data = safeio.read_bytes(path, inside=path.parent)
    except OSError as exc:
        raise CheckpointError(f"cannot read the run's samples: {exc}; move it away to resume") from None
    cut = next((m.start() for m in SAMPLE_HEADER.finditer(data) if int(m.group(1)) > step), None)
    if cut is None:
        return 0
    dropped = len(SAMPLE_HEADER.findall(data[cut:]))
    write_atomically(path, data[:cut])
    return dropped


def samples_damage(path: str | Path) -> str | None:
    """Cut samples.txt at the sample holding its first byte that is not UTF-8; one line saying so, or None."""
    path = Path(path)
    if not path.exists():
        return None
    data = safeio.read_bytes(path, inside=path.parent)
    try:
        data.decode("utf-8")
        return None
    except UnicodeDecodeError as exc:
        bad = exc.start
    starts = [m.start() for m in SAMPLE_HEADER.finditer(data) if m.start() <= bad]
    cut = starts[-1] if starts else 0
    write_atomically(path, data[:cut])
    kept, dropped = max(0, len(starts) - 1), len(SAMPLE_HEADER.findall(data[cut:]))
    return (f"{path.name} is damaged at byte {bad:,} (not UTF-8): kept the {kept} sample(s) before it, "
            f"dropped {dropped} from there on")


# -- exported weights ------------------------------------------------------------------------------
WEIGHTS = "model.safetensors"
def exportable(state: dict[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
    """The tensors to write: contiguous, and a tied LM head stored once (as transformer.wte.weight)."""
    out = {k: v.contiguous() for k, v in state.items()}
    if tied:
        out.pop("lm_head.weight", None)
    return out


def export_weights(state: dict[str, torch.Tensor], path: str | Path, tied: bool, metadata: dict | None = None) -> Path:
    """Write fp32 weights to a safetensors file, atomically."""
    path = Path(path)
    tensors, meta = exportable(state, tied), {k: str(v) for k, v in (metadata or {}).items()}
    return write_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


#: the export's record, beside model.safetensors: each exported file's size and sha256
EXPORT_RECORD = "export.json"
#: the files of an export the record covers (those present): the weights, and what gives them meaning
#: the files of a finished run that generate, eval and convert read, hashed at export: the weights, and
#: the recipe that says how to build and sample them (a damaged one could still parse, into defaults)
EXPORTED = (WEIGHTS, "model.toml", "tokenizer.json", "recipe.toml")


def write_export_record(folder: str | Path) -> None:
    """export.json: the size and sha256 of each file of EXPORTED in ``folder``, written atomically, last."""
    folder = Path(folder)
    files = {name: {"size": (folder / name).stat().st_size, "sha256": sha256_of(folder / name)}
             for name in EXPORTED if (folder / name).is_file()}
    write_atomically(folder / EXPORT_RECORD, json.dumps({"files": files}, indent=1) + "\n")


def export_problem(folder: str | Path) -> str | None:
    """Why the export in ``folder`` must not be used (a file that differs from export.json), or None.

    A folder without export.json (exported before exports were hashed) is None: nothing to check against.
    """
    folder = Path(folder)
    if not (folder / EXPORT_RECORD).exists() and not (folder / EXPORT_RECORD).is_symlink():
        return None
    try:
        record = safeio.read_json(folder / EXPORT_RECORD, inside=folder)
        files = record["files"]
        entries = [(name, files[name]["sha256"]) for name in files if name in EXPORTED]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        why = exc if isinstance(exc, (safeio.UnsafeFile, safeio.BadContent)) else type(exc).__name__
        return f"{folder / EXPORT_RECORD} is damaged ({why})"
    for name, digest in entries:
        try:
            have = sha256_of(folder / name, inside=folder)
        except OSError as exc:
            return str(exc)
        if have != digest:
            return f"{folder / name} changed since it was written (its sha256 differs from {EXPORT_RECORD})"
    return None


def load_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Load an exported ``model.safetensors`` into ``model``; a tied head may be absent, nothing else."""
    load_state(model, load_file(str(path)), path)


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Load weights into ``model``; ValueError naming ``path`` unless they match it (a tied head may be absent)."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches: keep the first line that names a tensor
        lines = [ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln] or [str(exc).splitlines()[0]]
        raise ValueError(f"{path}: weights do not match the model ({lines[0]})") from None
    allowed = {"lm_head.weight"} if getattr(model.config, "tie_embeddings", False) else set()
    missing = [k for k in missing if k not in allowed]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
        raise ValueError(f"{path}: weights do not match the model ({'; '.join(parts)})")


#: model.toml is for reading: nothing loads it (a run is rebuilt from recipe.toml, which is authoritative)
MODEL_TOML_HEADER = ("# The model of this run, for reading. Nothing loads this file: recipe.toml is the run's\n"
                     "# authoritative description (playattention generate rebuilds the model from it).\n")


#: the files a run folder holds besides checkpoints/ (tensorboard/ and wandb/ are the trackers' own)
RUN_FILES = ("recipe.toml", "ds_config.json", "versions.json", "metrics.jsonl", "metrics.csv", "losses.png",
             "summary.png", "samples.txt", "resume.log", WEIGHTS, "model.toml", EXPORT_RECORD,
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
        _, damaged = repair_metrics(self.metrics_path, step)
        trim_samples(self.path / "samples.txt", step)
        damaged = [d for d in (damaged, summary_damage(self.path / "summary.json"),
                               samples_damage(self.path / "samples.txt")) if d]
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
        path = self.path / WEIGHTS
        export_weights(state, path, tied=recipe.model.tie_embeddings,
                                  metadata={"format": "pt", "recipe": recipe.name, "step": step})
        d = recipe_to_dict(recipe)
        safeio.write_atomically(self.path / "model.toml", MODEL_TOML_HEADER + tomli_w.dumps(
            {"plugins": d.get("plugins", []), "model": d["model"]}))
        write_export_record(self.path)  # last: generate, eval, convert check the files against it
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
