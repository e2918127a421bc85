"""Checkpoints of a run, written so that a crash never leaves one that looks complete but is not.

    run_dir/checkpoints/
        step-0000100/              one complete checkpoint
            mp_rank_00_model_states.pt, ...   DeepSpeed's engine state (pickles, loaded weights-only)
            tokenizer.json
            toolkit_state.json     ours: step, tokens, each rank's loader position and RNG states,
                                   best val loss, the recipe and plugin fingerprint, a file manifest
        latest                     the newest complete tag (DeepSpeed's format), moved last
        .partial-step-0000150/     being written, or left by a crash: never loaded, removed later

A save (:func:`save`) writes everything into ``.partial-<tag>``, fsyncs it, then renames the
folder to ``<tag>`` (the commit) and only then replaces ``latest`` (write, then rename). A
committed checkpoint is *complete* when ``toolkit_state.json`` reads and every file of its
manifest has the size it had when written (:func:`problem`); loading skips anything else, so a
kill -9 or a full disk mid-save leaves the previous checkpoint as the one that resumes.

The manifest also records each file's sha256. :func:`load` checks every file against it before
DeepSpeed unpickles anything (:func:`verify`), and refuses the checkpoint in one line if one
differs: a flipped bit, another step's file copied over, a file replaced by one padded to the
recorded size. Whoever can write the folder can also rewrite the manifest: the hash catches
damage and mix-ups; what makes a checkpoint from elsewhere safe to load is that every file must be
in the manifest and every ``torch.load`` DeepSpeed makes runs weights-only, with the few DeepSpeed
classes its files hold allowed by name (:func:`weights_only_loads`), so loading never runs code.

Resuming with another number of ranks goes through DeepSpeed's universal checkpoint for ZeRO
stages 1-3 (``ds_to_universal``, then ``load_universal``); stage 0 checkpoints hold the whole
model and optimizer and load as they are. The run folder's chores (its exported weights, trimming
metrics and samples on resume, finding a run to resume) are :mod:`toolkit.runfolder`'s.
"""
from __future__ import annotations

import base64
import contextlib
import errno
import gc
import hashlib
import json
import math
import os
import pickle
import random
import re
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from . import families, safeio
from .engine import device
from .errors import CheckpointError
from .recipe import diff_lines, flatten, recipe_to_dict, validate
from .registry import code_of
from .safeio import fsync, sha256_of, write_atomically

TAG_RE = re.compile(r"^step-(\d+)$")
STATE_FILE = "toolkit_state.json"
LATEST = "latest"
PARTIAL = ".partial-"  # a save in progress (or a crashed one)
TRASH = ".trash-"  # a committed checkpoint being replaced
UNIVERSAL = ".universal-"  # a conversion for another number of ranks
FORMAT = 2  # 2: the manifest records each file's size and sha256 (1: sizes only)
#: the recipe keys a resumed run may not change besides the model: the checkpoint's layout depends on them
ENGINE_KEYS = ("deepspeed.zero_stage", "deepspeed.precision", "deepspeed.offload")


def tag_for(step: int) -> str:
    return f"step-{step:07d}"


def step_of(path: str | Path) -> int:
    return int(TAG_RE.match(Path(path).name).group(1))


# -- finding checkpoints ---------------------------------------------------------------------
def list_checkpoints(root: str | Path) -> list[Path]:
    """Committed checkpoint folders under ``root`` (complete or not), oldest step first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := TAG_RE.match(p.name))]
    return [p for _, p in sorted(found)]


#: what toolkit_state.json must hold for a checkpoint to load (key: accepted types); the trainer's
#: own keys are checked by :func:`state_problem` with its schema
STATE_SCHEMA = {"step": int, "world_size": int, "zero_stage": int, "files": dict}


def state_problem(state, schema: dict = STATE_SCHEMA) -> str | None:
    """What is wrong with a checkpoint's state (keys of ``schema`` with the wrong type), or None."""
    if not isinstance(state, dict):
        return f"{STATE_FILE} is not a JSON object"
    for key, types in schema.items():
        value = state.get(key)
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,))):
            return f"{STATE_FILE}: {key} is {json.dumps(value)[:40] if key in state else 'missing'}"
    return None


def _state_problem(state) -> str | None:
    if why := state_problem(state):
        return why
    if state["step"] < 0 or state["world_size"] < 1 or state["zero_stage"] not in (0, 1, 2, 3):
        return f"{STATE_FILE}: step, world_size or zero_stage out of range"
    for name, entry in state["files"].items():
        size = entry.get("size") if isinstance(entry, dict) else entry
        if not isinstance(name, str) or not isinstance(size, int) or ".." in Path(name).parts or name.startswith("/"):
            return f"{STATE_FILE}: a bad manifest entry for {name!r}"
    return None


def problem(path: str | Path) -> str | None:
    """Why the checkpoint at ``path`` is not complete, or None if it is (sizes only: see :func:`verify`)."""
    path = Path(path)
    try:
        state = safeio.read_json(path / STATE_FILE, inside=path)
    except safeio.UnsafeFile as exc:
        if exc.errno == errno.ENOENT and not (path / STATE_FILE).is_symlink():
            return f"no {STATE_FILE} (the save did not finish)"
        return f"unreadable {STATE_FILE} ({exc})"
    except ValueError as exc:  # not UTF-8, not JSON, too deep
        return f"unreadable {STATE_FILE} ({type(exc).__name__})"
    if why := _state_problem(state):
        return why
    for name, entry in state["files"].items():
        size = entry["size"] if isinstance(entry, dict) else entry
        try:
            have = (path / name).stat().st_size
        except OSError:
            return f"{name} is missing"
        if have != size:
            return f"{name} has {have:,} bytes, {size:,} were written"
    return None


def verify(path: str | Path, names: list[str] | None = None) -> str | None:
    """Why the checkpoint at ``path`` must not be loaded (a file whose sha256 differs from the
    manifest's), or None. ``names``: only these files of the manifest (a rank's share)."""
    path = Path(path)
    if why := problem(path):
        return why
    files = read_state(path)["files"]
    for name in sorted(files) if names is None else names:
        entry = files[name]
        if not isinstance(entry, dict) or "sha256" not in entry:
            continue  # a format 1 checkpoint recorded sizes only
        try:
            have = sha256_of(path / name, inside=path)
        except OSError as exc:
            return f"{name} cannot be read ({exc.strerror or exc})"
        if have != entry["sha256"]:
            return (f"{name} does not match the sha256 recorded when it was saved (changed or damaged since); "
                    f"nothing of it was loaded")
    return None


def complete_checkpoints(root: str | Path) -> list[Path]:
    """The complete checkpoints under ``root``, oldest first."""
    return [p for p in list_checkpoints(root) if problem(p) is None]


def latest(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (a run's ``checkpoints/``), or None."""
    done = complete_checkpoints(root)
    return done[-1] if done else None


def read_state(path: str | Path) -> dict:
    """The toolkit's state saved with the checkpoint at ``path``; CheckpointError (one line) if it is damaged."""
    try:
        state = safeio.read_json(Path(path) / STATE_FILE, inside=path)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable {STATE_FILE} ({type(exc).__name__})") from None
    if why := _state_problem(state):
        raise CheckpointError(f"{path}: {why}")
    return state



# -- what the toolkit saves besides DeepSpeed --------------------------------------------------
def rng_state() -> dict:
    """This process's random number generator states (python, numpy, torch CPU, CUDA), as JSON."""
    version, keys, gauss = random.getstate()
    np_key, np_keys, pos, has_gauss, cached = np.random.get_state()
    out = {"python": [version, list(keys), gauss],
           "numpy": [np_key, np_keys.tolist(), int(pos), int(has_gauss), float(cached)],
           "torch": _b64(torch.get_rng_state()), "cuda": None}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = _b64(torch.cuda.get_rng_state())
    return out


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned: the same random numbers follow (dropout, sampling)."""
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    np_key, np_keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((np_key, np.array(np_keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(state["torch"]))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(_unb64(state["cuda"]))


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def identity(recipe, registry) -> dict:
    """What made the weights: the resolved recipe, and the plugin source of each model component.

    ``fingerprint`` hashes the parts a resume may not change: the model table, the plugin list,
    the component sources (package and version, or a plugin file's content hash) and ENGINE_KEYS.
    """
    d = recipe_to_dict(recipe)
    components = {}
    for family in families.MODEL_FAMILIES:
        kind = getattr(recipe.model, family).kind
        components[f"{family}:{kind}"] = code_of(registry.get(family, kind).source, modules=False)
    fixed = {"model": _fixed_keys(d), "components": components}
    digest = hashlib.sha256(json.dumps(fixed, sort_keys=True, default=str).encode()).hexdigest()
    return {"recipe": d, "components": components, "fingerprint": digest}


def _fixed_keys(recipe_dict: dict) -> dict:
    flat = flatten({k: recipe_dict[k] for k in ("plugins", "model", "deepspeed") if k in recipe_dict})
    return {k: v for k, v in flat.items() if k == "plugins" or k.startswith("model.") or k in ENGINE_KEYS}


def as_resolved_now(recipe_dict: dict) -> dict:
    """A saved resolved recipe as this version resolves it: a key added since it was saved (a new
    family such as model.parametrization, a new option) takes its default, which is what the run had,
    so it is no change; a recipe this version cannot read stays as saved and its keys compare as they are."""
    recipe, _ = validate(recipe_dict)
    return recipe_to_dict(recipe) if recipe is not None else recipe_dict


def identity_changes(saved: dict, current: dict) -> tuple[list[str], list[str]]:
    """(refused, allowed) differences from a checkpoint's identity to the resuming run's, ``key: a -> b`` each.

    Refused: the model, its plugins and their versions, and ENGINE_KEYS. Allowed: everything else
    (more steps, another eval interval, ...), which the run folder then records.
    """
    old = as_resolved_now(saved["recipe"])
    old_fixed, new_fixed = _fixed_keys(old), _fixed_keys(current["recipe"])
    refused = diff_lines(old_fixed, new_fixed) + diff_lines(saved["components"], current["components"], prefix="plugin ")
    old_all, new_all = flatten(old), flatten(current["recipe"])
    allowed = diff_lines({k: v for k, v in old_all.items() if k not in old_fixed},
                         {k: v for k, v in new_all.items() if k not in new_fixed})
    return refused, allowed


# -- saving ------------------------------------------------------------------------------------
def save(engine, root: str | Path, step: int, state: dict, *, keep: int | None = None, tokenizer=None,
         keep_best: bool = False) -> Path:
    """Save a checkpoint of ``step`` atomically (every rank calls); rank 0 then keeps the newest ``keep``.

    ``state`` is the toolkit's own (JSON-serialisable) state. An OSError on any rank (a full disk)
    removes the partial save and raises CheckpointError on every rank; the previous checkpoint
    stays the newest complete one.
    """
    root, tag = Path(root), tag_for(step)
    partial = root / f"{PARTIAL}{tag}"
    rank = dist.get_rank()
    error = None
    try:
        if rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)  # a crashed save of this same step
        dist.barrier()
        # DeepSpeed writes every rank's files (module, optimizer partitions, scheduler) and ends in a barrier
        engine.save_checkpoint(str(root), tag=partial.name, client_state={"step": step}, save_latest=False)
        if rank == 0:
            state = {**state, "format": FORMAT, "step": step, "world_size": dist.get_world_size(),
                     "zero_stage": int(engine.zero_optimization_stage()), "saved_at": time.time()}
            if tokenizer is not None:
                tokenizer.save(partial)
            _write_state(partial, state)
    except (OSError, RuntimeError) as exc:  # torch.save says a full disk with a RuntimeError
        error = _said(exc, root)
    failed = _any_rank(error is not None)
    if not failed and rank == 0:
        try:
            _commit(root, partial, tag)
        except OSError as exc:
            error = _said(exc, root)
    if failed or _any_rank(error is not None):
        gc.collect()  # a writer that failed may still hold its file open: close it, or removing frees nothing
        if rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
        before = latest(root)
        raise CheckpointError(
            f"saving checkpoint {tag} failed ({error or 'on another rank'}); "
            f"the newest complete checkpoint is {before.name if before else 'none'}")
    if rank == 0:
        prune(root, step, keep, keep_best)
    dist.barrier()
    return root / tag


def _said(exc: BaseException, where: Path) -> str:
    """The failure in one line, and the failing frames let go: torch.save's zip writer, torn down by
    a full disk, keeps its file open in them (and the file's space in use) while they live."""
    text = describe_write_error(exc, where)
    traceback.clear_frames(exc.__traceback__)
    exc.__traceback__ = None
    return text


def describe_write_error(exc: BaseException, where: str | Path) -> str:
    """A failed write in one line: a full disk said so (torch.save raises RuntimeError, not OSError)."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return f"no space left on the device: {exc.filename or where}"
    first = (str(exc).strip().splitlines() or [""])[0]
    try:
        full = shutil.disk_usage(where if Path(where).exists() else Path(where).parent).free < (1 << 20)
    except OSError:
        full = False
    if full:
        return f"no space left on the device: {where} ({type(exc).__name__}: {first})"
    return f"{type(exc).__name__}: {first}"


def _any_rank(flag: bool) -> bool:
    """True on every rank if it is True on any (one all-reduced int)."""
    if dist.get_world_size() == 1:
        return flag
    t = torch.tensor([int(flag)], device=device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _write_state(folder: Path, state: dict) -> None:
    """fsync everything in ``folder``, then write the state with the manifest of those files, last."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        fsync(path)
        files[path.relative_to(folder).as_posix()] = {"size": path.stat().st_size, "sha256": sha256_of(path)}
    state = {**state, "files": files}
    write_atomically(folder / STATE_FILE, json.dumps(_finite(state), indent=1) + "\n")


def _finite(value):
    """JSON has no inf or nan: they become null (a best val loss not yet measured)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _commit(root: Path, partial: Path, tag: str) -> None:
    """Rename the finished save into place, then move ``latest`` to it (each step a rename)."""
    final = root / tag
    if final.exists():  # an incomplete leftover of a lost future (we resumed from an earlier step)
        trash = root / f"{TRASH}{tag}"
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(final, trash)
    os.replace(partial, final)
    fsync(root)
    # `latest` is for DeepSpeed's own tools (we find checkpoints by their folders): a failure to
    # update it leaves the committed checkpoint complete and loadable
    try:
        if (root / LATEST).is_dir() and not (root / LATEST).is_symlink():  # something in its place
            shutil.rmtree(root / LATEST)
        write_atomically(root / LATEST, tag)
    except OSError:
        (root / f"{LATEST}.tmp").unlink(missing_ok=True)


def prune(root: str | Path, step: int, keep: int | None, keep_best: bool = False) -> None:
    """Remove leftovers, checkpoints after ``step`` (a resumed run's lost future), and all but the newest
    ``keep`` and, with ``keep_best``, the one with the lowest val loss (:func:`best_checkpoint`)."""
    root = Path(root)
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith((PARTIAL, TRASH)):
            shutil.rmtree(p, ignore_errors=True)
    found = list_checkpoints(root)
    done = [p for p in found if step_of(p) <= step]
    best = best_checkpoint(root, step) if keep_best else None
    for p in [p for p in found if step_of(p) > step] + (done[:-keep] if keep else []):
        if p != best:
            shutil.rmtree(p, ignore_errors=True)


# -- loading -----------------------------------------------------------------------------------
def safe_globals() -> list:
    """What DeepSpeed's checkpoint files pickle besides tensors and plain containers, found by saving
    ZeRO 0-3 checkpoints in fp32 and bf16 (and their universal conversions) and loading each file with
    weights_only=True (tests/test_checkpoint.py does it again): only these classes may be rebuilt.
    (Imported here: DeepSpeed loads only when a checkpoint does.)"""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler  # ZeRO 1-2's optimizer state, fp32
    from deepspeed.runtime.zero.config import ZeroStageEnum  # every ZeRO optimizer state
    from deepspeed.utils.tensor_fragment import fragment_address  # ZeRO 1-2's partition map

    return [LossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def weights_only_loads():
    """Every ``torch.load`` inside runs with ``weights_only=True`` and :func:`safe_globals` allowed.

    DeepSpeed calls ``torch.load(..., weights_only=False)`` from its checkpoint engine, its ZeRO 3
    and universal loaders and ``ds_to_universal``, a dozen places in all; replacing ``torch.load``
    here, for the duration of one load, covers them all (a custom checkpoint engine would miss the
    optimizer's own loads). A pickle that names anything else is refused by torch's weights-only
    unpickler instead of run.
    """
    original = torch.load

    def load(f, map_location=None, pickle_module=None, *, weights_only=None, **kwargs):
        return original(f, map_location=map_location, weights_only=True, **kwargs)

    torch.load = load
    try:
        with torch.serialization.safe_globals(safe_globals()):
            yield
    finally:
        torch.load = original


def refused_pickle(message: str) -> str | None:
    """torch's weights-only refusal of a global (many lines) in one: what the pickle asked for, and
    that it did not run; None if ``message`` is not one (a garbled file fails otherwise)."""
    m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", message)
    return (f"a file holds a pickle of something other than tensors and DeepSpeed's state (it asks for "
            f"{m.group(1)}); nothing of it was run") if m else None


def unlisted(path: str | Path) -> str | None:
    """A file or folder in the checkpoint at ``path`` that its manifest does not list, or None.
    DeepSpeed finds a checkpoint's files by globbing its folder: anything there would be loaded."""
    path = Path(path)
    files = read_state(path)["files"]
    parents = {p.as_posix() for name in files for p in Path(name).parents}
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path).as_posix()
        if rel in files or rel == STATE_FILE or (rel in parents and p.is_dir() and not p.is_symlink()):
            continue
        return f"{rel} is not in the manifest of {STATE_FILE} (this save did not write it); nothing was loaded"
    return None


def load(engine, root: str | Path, tag: str | None = None) -> dict:
    """Load a complete checkpoint (default: the newest) into ``engine``; returns the toolkit's state.

    With another number of ranks than wrote it, a ZeRO 1-3 checkpoint is converted to DeepSpeed's
    universal format first (rank 0, a subprocess) and loaded from that.
    Every file is checked against the manifest's sha256 first (:func:`verify`), a file the manifest
    does not list is refused (:func:`unlisted`), and DeepSpeed's unpickling runs weights-only
    (:func:`weights_only_loads`): a pickle that would run code is refused, not run.
    """
    root = Path(root)
    path = root / tag if tag else latest(root)
    if path is None:
        raise CheckpointError(f"{root}: no complete checkpoint")
    if why := problem(path):
        raise CheckpointError(f"{path}: incomplete checkpoint: {why}")
    if why := unlisted(path):
        raise CheckpointError(f"{path}: refused: {why}")
    # every file checked before any is unpickled, by DeepSpeed or by the universal conversion; the
    # ranks share the hashing and every rank gets every rank's verdict
    names = sorted(read_state(path)["files"])
    rank, world = dist.get_rank(), dist.get_world_size()
    found = verify(path, names[rank::world])
    verdicts = [found] if world == 1 else [None] * world
    if world > 1:
        dist.all_gather_object(verdicts, found)
    if why := next((v for v in verdicts if v), None):
        raise CheckpointError(f"{path}: refused: {why}")
    state = read_state(path)
    try:
        if state["world_size"] != dist.get_world_size() and state["zero_stage"] > 0:
            _load_universal(engine, root, path.name)
        else:
            with weights_only_loads():
                loaded, _ = engine.load_checkpoint(str(root), tag=path.name)
            if loaded is None:
                raise CheckpointError(f"{path}: DeepSpeed found no checkpoint to load")
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - a damaged file of a checkpoint saved without hashes (format 1)
        if isinstance(exc, pickle.UnpicklingError) and (why := refused_pickle(str(exc))):
            raise CheckpointError(f"{path}: refused: {why}") from None
        first = (str(exc).strip().splitlines() or [""])[0]
        raise CheckpointError(f"{path}: DeepSpeed could not load it ({type(exc).__name__}: {first})") from None
    return state


#: ``python -c`` program: DeepSpeed's ds_to_universal with every torch.load weights-only (argv: its arguments)
UNIVERSAL_MAIN = ("import sys\n"
                  "from deepspeed.checkpoint import ds_to_universal as c\n"
                  "from toolkit.checkpoint import weights_only_loads\n"
                  "sys.argv[0] = c.__file__\n"
                  "with weights_only_loads():\n"
                  "    c.main(c.parse_arguments())\n")


def _load_universal(engine, root: Path, tag: str) -> None:
    """Convert ``tag`` with ``ds_to_universal`` and load it, whatever the number of ranks."""
    out = root / f"{UNIVERSAL}{tag}"
    failure = ""
    if dist.get_rank() == 0:
        shutil.rmtree(out, ignore_errors=True)
        # ds_to_universal unpickles every file of the checkpoint: run it under weights_only_loads too
        # (one worker each: the conversion stays in this one process, where the patch holds)
        cmd = [sys.executable, "-c", UNIVERSAL_MAIN, "--input_folder", str(root / tag),
               "--output_folder", str(out), "--inject_missing_state",
               "--num_extract_workers", "1", "--num_merge_workers", "1"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
            failure = lines[-1] if lines else f"exit status {proc.returncode}"
            failure = refused_pickle(proc.stderr) or failure
    if _any_rank(bool(failure)):
        raise CheckpointError(f"{root / tag}: converting to a universal checkpoint for "
                              f"{dist.get_world_size()} rank(s) failed: {failure or 'on rank 0'}")
    opt = getattr(engine.optimizer, "optimizer", engine.optimizer)  # the torch optimizer inside ZeRO's
    groups = [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in opt.param_groups]
    # DeepSpeed reads this flag only when loading; set it for this one load
    engine._config.load_universal_checkpoint = True
    try:
        with weights_only_loads():
            loaded, _ = engine.load_checkpoint(str(root), tag=out.name)
    finally:
        engine._config.load_universal_checkpoint = False
    if loaded is None:
        raise CheckpointError(f"{out}: DeepSpeed found no universal checkpoint to load")
    # ZeRO 3's universal load gives every param group group 0's hyperparameters (the no-decay group
    # gets weight decay) and one shared `step` tensor that each group's update then increments: undo both
    for g, saved in zip(opt.param_groups, groups):
        g.update(saved)
    for s in opt.state.values():
        if isinstance(s.get("step"), torch.Tensor):
            s["step"] = s["step"].clone()
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(out, ignore_errors=True)
        (root / "latest_universal").unlink(missing_ok=True)


# -- seeds and room for a run's checkpoints -------------------------------------------------------
def reseed(seed: int) -> None:
    """Seed python, numpy and torch (a rank that has no saved RNG state after a change of ranks)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def checkpoint_bytes(params: int, precision: str, zero_stage: int) -> int:
    """About how large one checkpoint is: the weights, fp32 master weights where kept apart, Adam's two moments.

    Measured (DeepSpeed 0.19, bytes per parameter): fp32 12 at stage 0, 16 at stages 1-2 (the
    module and the fp32 partitions), 12 at stage 3 (partitions only); bf16 14, 14, 12.
    """
    if zero_stage == 3:  # the module file holds no weights, only the partitions do
        return params * (4 + 8)
    # bf16 at ZeRO 0 runs under autocast with fp32 weights (see engine.deepspeed_config)
    weights = 2 if precision == "fp16" or (precision == "bf16" and zero_stage > 0) else 4
    master = 4 if (weights == 2 or zero_stage > 0) else 0  # ZeRO saves its fp32 partitions besides the module
    return params * (weights + master + 8)


def check_room(run_dir: str | Path, params: int, precision: str, zero_stage: int, keep: int) -> None:
    """CheckpointError if the disk has no room for the checkpoints a run keeps (+1 being written) and its export."""
    run_dir = Path(run_dir)
    each = checkpoint_bytes(params, precision, zero_stage)
    have = len(complete_checkpoints(run_dir / "checkpoints"))
    need = max(0, keep + 1 - have) * each + 4 * params
    free = shutil.disk_usage(run_dir).free
    if free < need:
        raise CheckpointError(
            f"{run_dir}: {_size(free)} free, but this run needs about {_size(need)} ({keep} checkpoint(s) kept + 1 "
            f"being written, ~{_size(each)} each, and the exported weights); free space, lower "
            f"train.keep_checkpoints or pick another train.out_dir")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError






# -- any checkpoint of a run, for inference (generate, eval, convert --to hf) ------------------------
CHECKPOINT_SELECTORS = ("latest", "best", "step-N")


def evaluated_loss(path: str | Path) -> float | None:
    """The val loss measured at the checkpoint's own step (its state's last evaluation), or None."""
    state = read_state(path)
    ev = state.get("last_eval")
    loss = ev.get("val_loss") if isinstance(ev, dict) and ev.get("step") == state["step"] else None
    return float(loss) if isinstance(loss, (int, float)) and math.isfinite(loss) else None


def best_checkpoint(root: str | Path, up_to: int | None = None) -> Path | None:
    """The complete checkpoint (at or before step ``up_to``) with the lowest val loss measured at its
    own step, the earliest of equals; None if none was evaluated."""
    scored = []
    for p in complete_checkpoints(root):
        if up_to is None or step_of(p) <= up_to:
            try:
                loss = evaluated_loss(p)
            except CheckpointError:
                continue
            if loss is not None:
                scored.append((loss, step_of(p), p))
    return min(scored)[2] if scored else None


def resolve_checkpoint(source: str | Path) -> tuple[Path, Path | None]:
    """(run folder, checkpoint folder or None) of ``RUN``, ``RUN@latest``, ``RUN@best``, ``RUN@step-N``
    or ``RUN/checkpoints/step-NNNNNNN``; CheckpointError (one line) for a checkpoint that is not there."""
    text = str(source)
    path = Path(text)
    if path.is_dir() and TAG_RE.match(path.name) and path.parent.name == "checkpoints":
        run, found, given = path.parent.parent, path, text
    elif "@" in text and not path.exists():
        run_text, _, which = text.rpartition("@")
        run, given = Path(run_text), text
        root = run / "checkpoints"
        if not run.is_dir():
            raise FileNotFoundError(f"{run}: no such run folder")
        m = re.fullmatch(r"step-0*(\d+)", which)
        if which == "latest":
            found = latest(root)
        elif which == "best":
            found = best_checkpoint(root)
        elif m:
            found = root / tag_for(int(m.group(1)))
        else:
            raise CheckpointError(f"{text}: after @ give latest, best or step-N (e.g. {run_text}@step-100)")
        if found is None or not found.is_dir():
            have = ", ".join(p.name for p in complete_checkpoints(root)) or "none"
            what = "evaluated " if which == "best" else ""
            raise CheckpointError(f"{text}: no such {what}checkpoint in {root} (complete ones: {have})")
    else:
        return path, None
    if why := problem(found):
        raise CheckpointError(f"{given}: incomplete checkpoint: {why}")
    return run, found


def checkpoint_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The fp32 weights of the complete checkpoint at ``path``, consolidated on the CPU, for inference.

    Every file is checked against the manifest first, and read with torch's weights-only unpickler,
    which runs no code: stage 0 holds the module's weights whole; ZeRO 1-3 keep fp32 master weights
    in their optimizer partitions, which DeepSpeed's zero_to_fp32 joins (under :func:`weights_only_loads`).
    A file the manifest does not list is refused.
    """
    path = Path(path)
    if why := unlisted(path) or verify(path):
        raise CheckpointError(f"{path}: refused: {why}")
    state = read_state(path)
    try:
        if state["zero_stage"] == 0:
            module = torch.load(path / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]
        else:
            module = _zero_fp32_weights(path)
    except Exception as exc:  # noqa: BLE001 - an unpickling refusal, a missing key, a damaged file
        first = (str(exc).strip().splitlines() or [""])[0]
        raise CheckpointError(f"{path}: its weights cannot be read ({type(exc).__name__}: {first})") from None
    return {k: v.float() if v.is_floating_point() else v for k, v in module.items()}


def _zero_fp32_weights(path: Path) -> dict[str, torch.Tensor]:
    """zero_to_fp32's consolidation of a ZeRO 1-3 checkpoint, every torch.load in it weights-only."""
    from deepspeed.utils import zero_to_fp32

    with weights_only_loads(), open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet), \
            contextlib.redirect_stderr(quiet):
        return zero_to_fp32._get_fp32_state_dict_from_zero_checkpoint(str(path), False)
