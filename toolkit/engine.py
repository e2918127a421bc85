"""DeepSpeed set-up in one place: the batch arithmetic, the config, the optimizer, the schedule.

Everything that trains goes through :func:`build_engine`, which wraps a model in DeepSpeed's ZeRO
data-parallel engine (Rajbhandari et al. 2020) on one CPU process or many GPUs alike. The recipe
decides the DeepSpeed config (:func:`deepspeed_config`); its ``[deepspeed.config]`` table is
merged on top last, verbatim, for anything the recipe does not name.

On a machine without CUDA we set ``DS_ACCELERATOR=cpu`` (never on a GPU machine) and use gloo;
a single process without a launcher gets the rendezvous variables a launcher would have set.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import io
import os
import socket
import sys
import time
import types
from pathlib import Path
from typing import Any, Callable

import attrs
import torch
from torch import nn

from .errors import ConfigError
from .plugin_manager import default_registry
from .recipe import Recipe, TrainConfig, deep_merge, registry_of
from .registry import Registry

#: dense bf16 peak FLOP/s per device, by a substring of torch.cuda.get_device_name()
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def on_cuda() -> bool:
    return torch.cuda.is_available()


def ensure_accelerator() -> None:
    """Tell DeepSpeed to use its CPU accelerator where there is no CUDA (must run before it picks one),
    and give its op builds this install's own cache."""
    if not on_cuda():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    isolate_op_cache()


def device() -> torch.device:
    """This rank's device: its CUDA GPU (LOCAL_RANK) or the CPU."""
    if on_cuda():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def peak_flops(dev: torch.device | None = None) -> float | None:
    """The device's dense bf16 peak FLOP/s, or None where unknown (CPUs, other GPUs)."""
    dev = dev or device()
    if dev.type != "cuda":
        return None
    name = torch.cuda.get_device_name(dev)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


# -- batch arithmetic ------------------------------------------------------------------------
@attrs.frozen
class BatchPlan:
    """How one optimizer step's tokens are made: micro batches x accumulation x ranks."""

    micro_batch: int
    grad_accum: int
    world_size: int
    block_size: int

    @property
    def batch_size(self) -> int:
        """Sequences per optimizer step over all ranks (DeepSpeed's train_batch_size)."""
        return self.micro_batch * self.grad_accum * self.world_size

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.block_size


def batch_plan(recipe: Recipe, world_size: int = 1) -> BatchPlan:
    """The batch arithmetic of a recipe on ``world_size`` ranks; ConfigError if it does not divide."""
    train: TrainConfig = recipe.train
    mb, T = train.micro_batch, recipe.model.block_size
    per_accum = mb * T * world_size
    if train.tokens_per_step is not None:
        if train.tokens_per_step % per_accum:
            raise ConfigError([
                f"train.tokens_per_step {train.tokens_per_step} is not divisible by micro_batch {mb} x "
                f"block_size {T} x world_size {world_size} = {per_accum}"
            ])
        grad_accum = train.tokens_per_step // per_accum
        if train.grad_accum is not None and train.grad_accum != grad_accum:
            raise ConfigError([
                f"train.grad_accum {train.grad_accum} disagrees with train.tokens_per_step {train.tokens_per_step} "
                f"/ (micro_batch {mb} x block_size {T} x world_size {world_size}) = {grad_accum}; give only one"
            ])
    else:
        grad_accum = train.grad_accum or 1
    return BatchPlan(mb, grad_accum, world_size, T)


# -- the DeepSpeed config --------------------------------------------------------------------
def check_precision(recipe: Recipe, cuda: bool | None = None) -> None:
    """Refuse what this machine or DeepSpeed cannot do, with the recipe key to change."""
    ds = recipe.deepspeed
    cuda = on_cuda() if cuda is None else cuda
    if ds.precision == "fp16" and not cuda:
        raise ConfigError(["deepspeed.precision: fp16 needs a CUDA GPU (DeepSpeed refuses it on CPU); "
                           "use bf16 or fp32"])
    if ds.offload == "cpu" and ds.zero_stage < 2:
        raise ConfigError([f"deepspeed.offload: optimizer offload needs zero_stage 2 or 3, "
                           f"got zero_stage {ds.zero_stage}"])


def deepspeed_config(recipe: Recipe, plan: BatchPlan | int = 1) -> dict:
    """The DeepSpeed config dict for ``recipe`` with a batch plan (or on that many ranks)."""
    check_precision(recipe)
    cfg = merged_deepspeed_config(recipe, plan)
    if recipe.deepspeed.config:  # the toolkit's own part is known good; what a recipe adds is checked before anything starts
        problems = check_deepspeed_config(cfg)
        if problems:
            raise ConfigError(problems)
    return cfg


def merged_deepspeed_config(recipe: Recipe, plan: BatchPlan | int = 1) -> dict:
    """:func:`deepspeed_config` unchecked: the toolkit's settings with ``[deepspeed.config]`` merged on top."""
    plan = plan if isinstance(plan, BatchPlan) else batch_plan(recipe, plan)
    ds, train = recipe.deepspeed, recipe.train
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload == "cpu":
        zero["offload_optimizer"] = {"device": "cpu"}
    # At ZeRO 0 DeepSpeed's bf16 mode keeps no fp32 master weights we can export and accumulates
    # gradients in bf16. Autocast instead keeps fp32 weights, gradients and Adam states and runs
    # the matmuls in bf16: standard mixed precision, as the plain loop in bench/bench.py does.
    autocast = ds.precision == "bf16" and ds.zero_stage == 0
    cfg: dict[str, Any] = {
        "train_batch_size": plan.batch_size,
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.grad_accum,
        "gradient_clipping": float(train.grad_clip),
        "zero_optimization": zero,
        "bf16": {"enabled": ds.precision == "bf16" and not autocast},
        "fp16": {"enabled": ds.precision == "fp16"},
        # we pass our own torch.optim.AdamW (ZeRO has not "tested" it, but it is plain Adam)
        "zero_allow_untested_optimizer": True,
        # we log ourselves, once per optimizer step; DeepSpeed's own printing and timers only cost time
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if autocast:
        cfg["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    return deep_merge(cfg, ds.config)


# -- checking [deepspeed.config] with DeepSpeed's own config code -----------------------------
_NO_DEFAULT = object()
#: what data_types.* may be: DeepSpeed keeps the string and resolves it only when training starts
#: (DtypeEnum also knows int8, in which no gradient accumulates)
DATA_TYPES = ("fp32", "fp16", "bf16")
#: keys DeepSpeed reads unchecked with a default of None, which cannot say what they must be
KINDS_WITHOUT_DEFAULT = {("steps_per_print",): "an integer", ("activation_checkpointing", "number_checkpoints"): "an integer"}


class _Looked(dict):
    """A config table that records each key DeepSpeed looks up (with the default it would use),
    and whether a pydantic model took the whole table (it forbids unknown keys itself)."""

    def __init__(self, data: dict, path: tuple, log: dict, whole: set):
        super().__init__({k: _Looked(v, (*path, k), log, whole) if isinstance(v, dict) else v for k, v in data.items()})
        self._path, self._log, self._whole = path, log, whole

    def get(self, key, default=None):
        if self._log.get((*self._path, key), _NO_DEFAULT) is _NO_DEFAULT:  # a default says what the value must be
            self._log[(*self._path, key)] = default
        return super().get(key, default)

    def __getitem__(self, key):
        self._log.setdefault((*self._path, key), _NO_DEFAULT)
        return super().__getitem__(key)

    def __contains__(self, key):
        self._log.setdefault((*self._path, key), _NO_DEFAULT)
        return super().__contains__(key)

    def __iter__(self):  # `Model(**table)` iterates it: the model validates every key
        self._took_whole()
        return super().__iter__()

    def keys(self):
        self._took_whole()
        return super().keys()

    def items(self):
        self._took_whole()
        return super().items()

    def _took_whole(self):
        if self._path:  # no model takes the top level (DeepSpeed copies it and scans it for removed keys)
            self._whole.add(self._path)


def _kind_of(default: Any) -> str | None:
    """What a value must be, judged by DeepSpeed's default for it (None: it does not say)."""
    if isinstance(default, bool):
        return "true or false"
    if isinstance(default, int):
        return "an integer"
    if isinstance(default, float):
        return "a number"
    if isinstance(default, str):
        return "a string"
    if isinstance(default, dict):
        return "a table"
    return None


def _fits(value: Any, kind: str) -> bool:
    return {"true or false": lambda x: isinstance(x, bool),
            "an integer": lambda x: isinstance(x, int) and not isinstance(x, bool),
            "a number": lambda x: isinstance(x, (int, float)) and not isinstance(x, bool),
            "a string": lambda x: isinstance(x, str),
            "a table": lambda x: isinstance(x, dict)}[kind](value)


def _at(config: dict, path: tuple) -> Any:
    node: Any = config
    for k in path:
        node = node.get(k, _NO_DEFAULT) if isinstance(node, dict) else _NO_DEFAULT
    return node


def _where(path) -> str:
    return ".".join(["$.deepspeed.config", *(str(k) for k in path)])


def check_deepspeed_config(config: dict) -> list[str]:
    """Every problem DeepSpeed's own config code finds in ``config`` (the merged config the engine
    would get), one line each at its recipe path: values its pydantic models refuse, values of
    another type than DeepSpeed's default for them (it reads those unchecked and fails, or not,
    mid-run), and keys it never reads, with the closest key it does read."""
    import difflib
    import logging

    import pydantic
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.config_utils import DeepSpeedConfigModel
    from deepspeed.utils import logger as ds_logger

    config = copy.deepcopy(config)
    # validated as one rank: the batch DeepSpeed derives must match whatever world size it sees
    config["train_batch_size"] = config["train_micro_batch_size_per_gpu"] * config["gradient_accumulation_steps"]
    log: dict[tuple, Any] = {}
    whole: set[tuple] = set()
    out: list[str] = []
    failure: BaseException | None = None
    level = ds_logger.level
    ds_logger.setLevel(logging.ERROR)  # its INFO lines (world size, ...) are not ours to print
    try:
        DeepSpeedConfig(_Looked(config, (), log, whole))
    except pydantic.ValidationError as exc:
        models = {m.__name__: m for m in _subclasses(DeepSpeedConfigModel)}
        for err in exc.errors():
            out.append(_pydantic_line(config, err, models.get(exc.title), difflib))
        failure = exc
    except Exception as exc:  # noqa: BLE001 - DeepSpeed's checks are asserts, ValueErrors and its own errors
        failure = exc
    finally:
        ds_logger.setLevel(level)
    for path, default in log.items():
        value, kind = _at(config, path), KINDS_WITHOUT_DEFAULT.get(path) or _kind_of(default)
        if value is not _NO_DEFAULT and kind is not None and not _fits(value, kind):
            said = "" if default is None or default is _NO_DEFAULT else f" (DeepSpeed's default is {default!r})"
            out.append(f"{_where(path)}: expected {kind}{said}, got {value!r}")
    for key in DATA_TYPES_KEYS:
        value = _at(config, ("data_types", key))
        if value is not _NO_DEFAULT and value is not None and value not in DATA_TYPES:
            out.append(f"{_where(('data_types', key))}: expected one of {', '.join(DATA_TYPES)}, got {value!r}")
    if failure is None:  # else DeepSpeed stopped before it looked everything up
        out += _unknown_keys(config, (), log, whole, difflib)
    if failure is not None and not out:
        text = [ln.strip() for ln in str(failure).splitlines() if ln.strip()]
        out.append(f"$.deepspeed.config: DeepSpeed refuses it: {type(failure).__name__}"
                   + (f": {text[0]}" if text else ""))
    return list(dict.fromkeys(out))


DATA_TYPES_KEYS = ("grad_accum_dtype", "param_dtype", "buffer_dtype")


def _subclasses(cls) -> list:
    out, stack = [], [cls]
    while stack:
        for sub in stack.pop().__subclasses__():
            out.append(sub)
            stack.append(sub)
    return out


def _pydantic_line(config: dict, err: dict, model, difflib) -> str:
    """One pydantic error at its recipe path: the table holding the first key of its location."""
    loc = tuple(err.get("loc", ()))
    # the model was given one table of the config: the one that holds loc's first key
    tables = [p for p in _tables(config) if loc and isinstance(_at(config, p), dict) and loc[0] in _at(config, p)]
    path = (*tables[0], *loc) if tables else loc
    msg = err.get("msg", "invalid")
    msg = msg[0].lower() + msg[1:]
    if err.get("type") == "extra_forbidden" and model is not None:
        names = [n for n in model.model_fields] + [f.alias for f in model.model_fields.values() if f.alias]
        close = difflib.get_close_matches(str(loc[-1]), names, n=1)
        return f"{_where(path)}: not a DeepSpeed setting" + (f"; did you mean '{close[0]}'?" if close else "")
    for words, sign in (("greater than or equal to", ">="), ("less than or equal to", "<="), ("greater than", ">"),
                        ("less than", "<"), ("input should be", "must be")):
        msg = msg.replace(words, sign)
    return f"{_where(path)}: {msg}, got {err.get('input')!r}"


def _tables(config: dict, path: tuple = ()) -> list[tuple]:
    out = [path]
    for k, v in config.items():
        if isinstance(v, dict):
            out += _tables(v, (*path, k))
    return out


def _unknown_keys(config: dict, path: tuple, log: dict, whole: set, difflib) -> list[str]:
    """Keys DeepSpeed never looked up, in tables no model took whole."""
    if path in whole:
        return []
    out = []
    for key, value in config.items():
        here = (*path, key)
        if here not in log:
            known = [p[-1] for p in log if p[:-1] == path and isinstance(p[-1], str)]
            close = difflib.get_close_matches(str(key), known, n=1)
            out.append(f"{_where(here)}: not a DeepSpeed setting" + (f"; did you mean '{close[0]}'?" if close else ""))
        elif isinstance(value, dict):
            out += _unknown_keys(value, here, log, whole, difflib)
    return out


# -- optimizer and schedule ------------------------------------------------------------------
def make_optimizer(model: nn.Module, recipe: Recipe, registry: Registry | None = None) -> torch.optim.Optimizer:
    """The recipe's optimizer (a registered ``optimizer``, ``train.optimizer``) over ``model``'s parameters."""
    # optimizer offload is DeepSpeedCPUAdam, whose op is JIT-built (~40 s) on first use
    with guarded_op_build("cpu_adam") if recipe.deepspeed.offload == "cpu" else contextlib.nullcontext():
        return (registry or registry_of(recipe)).build(recipe.train.optimizer, model, recipe)


def schedule(train: TrainConfig, registry: Registry):
    """The recipe's learning-rate schedule (a registered ``schedule``): optimizer step (0-based) -> lr."""
    return registry.build(train.schedule, train)


def lr_at(step: int, train: TrainConfig, registry: Registry | None = None) -> float:
    """The learning rate of optimizer step ``step`` (0-based) under the recipe's schedule."""
    return schedule(train, registry or default_registry())(step)


def make_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig,
                   registry: Registry | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR scaling every group's lr by schedule(step) / train.lr; DeepSpeed steps it once per optimizer step."""
    lr_of = schedule(train, registry or default_registry())

    def factor(step: int) -> float:  # a plain function: LambdaLR then leaves it out of its state_dict
        return lr_of(step) / train.lr

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# -- distributed set-up ----------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _quiet_op_loading():
    """Drop DeepSpeed's "DeepSpeed <op> built successfully" prints (stdout, each start); keep all else."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        lines = buffer.getvalue().splitlines(keepends=True)
        sys.stdout.write("".join(line for line in lines if not line.endswith("built successfully\n")))


def op_build_dir(name: str) -> Path | None:
    """Where torch builds the JIT op ``name`` (its extension cache), or None if unknown."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return Path(_get_build_directory(name, verbose=False))
    except Exception:  # noqa: BLE001 - a private torch helper: if it moves, just say nothing
        return None


def isolate_op_cache() -> None:
    """Build DeepSpeed's ops into this install's own cache (``sys.prefix/torch-extensions``) unless
    TORCH_EXTENSIONS_DIR names one: two installs sharing ``~/.cache/torch_extensions`` rebuild each
    op for their own include paths, and wait on each other's ``lock`` while they do."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return
    mine = Path(sys.prefix) / "torch-extensions"
    try:
        mine.mkdir(parents=True, exist_ok=True)
    except OSError:  # a read-only system install: torch's shared cache it is
        return
    if os.access(mine, os.W_OK):
        os.environ["TORCH_EXTENSIONS_DIR"] = str(mine)


def op_build_holders(where: Path) -> list[str]:
    """The other processes building in ``where``: ``"pid (name)"`` of each that has its ``lock`` open
    (torch's FileBaton keeps the fd open while it builds) or works in it (ninja and g++ run there,
    and outlive a builder killed alone). Reads /proc: empty elsewhere than Linux."""
    where = where.resolve()
    lock = str(where / "lock")
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        if proc.name == str(os.getpid()):
            continue
        try:
            busy = Path(os.readlink(proc / "cwd")) == where
            if not busy:
                busy = any(os.readlink(fd) == lock for fd in (proc / "fd").iterdir())
            if busy:
                found.append(f"{proc.name} ({(proc / 'comm').read_text().strip()})")
        except OSError:  # gone meanwhile, or another user's
            continue
    return found


#: how often a wait on another process's op build says so
WAIT_SAY_S = 5.0


def wait_for_op_build(where: Path | None, poll: float = 0.5, say_every: float = WAIT_SAY_S) -> None:
    """Return once no other process builds in ``where``; a ``lock`` whose builder is gone is removed.

    torch waits on that lock for ever and says nothing (a build killed mid-way leaves it); here
    every few seconds says what is awaited, where, and for how long. A lock nobody holds twice in a
    row, a second apart, is stale whatever its age (a builder releases it within microseconds).
    """
    if where is None or not sys.platform.startswith("linux"):
        return
    lock, t0, said, unheld = where / "lock", time.monotonic(), None, 0
    while lock.exists():
        holders = op_build_holders(where)
        unheld = 0 if holders else unheld + 1
        if unheld >= 2:
            lock.unlink(missing_ok=True)
            print(f"removed {lock}: the build of DeepSpeed's {where.name} op that left it is gone (no process "
                  f"holds it or builds in {where}); building it again", file=sys.stderr, flush=True)
            return
        waited = time.monotonic() - t0
        if holders and (said is None or waited - said >= say_every):
            print(f"waiting for DeepSpeed's {where.name} op being built by {', '.join(holders)} "
                  f"(lock {lock}): {waited:.0f} s so far", file=sys.stderr, flush=True)
            said = waited
        time.sleep(poll if holders else 1.0)


@contextlib.contextmanager
def guarded_op_build(name: str):
    """Around code that may JIT-build DeepSpeed's op ``name``: wait (saying so) for another process's
    build first, or clear the lock of one that died; say when this process builds it."""
    where = op_build_dir(name)
    wait_for_op_build(where)
    if where is not None and not any(where.glob("*.so")):
        print(f"building DeepSpeed's {name} op (once per install, about 30-60 s)...", file=sys.stderr, flush=True)
    yield


@contextlib.contextmanager
def _without_shm_op():
    """DeepSpeed's CPU backend without its shared-memory op: no 30 s g++ build, no lock to wait on.

    The op serves only ``inference_all_reduce`` (DeepSpeed-Inference's tensor-parallel layers),
    which falls back to torch.distributed's all_reduce without it; training (ZeRO's collectives,
    gradient all-reduce) always goes through torch.distributed, on one rank or many.
    """
    ds_torch = importlib.import_module("deepspeed.comm.torch")  # `import ... as` finds deepspeed.comm's `torch`

    build = ds_torch.build_shm_op
    ds_torch.build_shm_op = lambda: None
    try:
        yield
    finally:
        ds_torch.build_shm_op = build


def init_distributed() -> tuple[int, int]:
    """Join (or, alone, create) the process group; returns (rank, world_size).

    Under a launcher (deepspeed, torchrun) the rendezvous variables are set already; a lone
    process gets RANK=0, WORLD_SIZE=1 and a free local port, or DeepSpeed tries MPI discovery.
    """
    ensure_accelerator()
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        added = {}
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            added = dict(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
            os.environ.update(added)
        os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])
        if on_cuda():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        try:
            with _quiet_op_loading(), (contextlib.nullcontext() if on_cuda() else _without_shm_op()):
                deepspeed.init_distributed(dist_backend="nccl" if on_cuda() else "gloo", auto_mpi_discovery=False)
        finally:
            # a lone process's rendezvous must not leak into processes it starts (they would try
            # to join it, or take it for a launch of their own)
            for key in added:
                os.environ.pop(key, None)
    return dist.get_rank(), dist.get_world_size()


# -- the engine ------------------------------------------------------------------------------
@attrs.frozen
class Engine:
    """What :func:`build_engine` returns: the DeepSpeed engine and what it was built from."""

    engine: Any  # deepspeed.DeepSpeedEngine
    optimizer: Any
    scheduler: Any
    config: dict
    plan: BatchPlan
    rank: int
    world_size: int

    @property
    def module(self) -> nn.Module:
        return self.engine.module


def _clip_fp32_gradients(engine) -> None:
    """Stage 0 fp32 clipping in one fused call (foreach), keeping the norm for logging.

    DeepSpeed's own clip_grad_norm_ loops over the parameters and all-reduces a norm that is
    already global there (gradients are averaged before the step), and it discards the norm.
    """
    if not hasattr(engine, "_clip_params"):  # walking the module tree each step costs more than the norm
        engine._clip_params = list(engine.module.parameters())
    params = [p for p in engine._clip_params if p.grad is not None]
    engine._global_grad_norm = torch.nn.utils.clip_grad_norm_(params, engine.gradient_clipping(), foreach=True)


def one_rank_zero_note(zero_stage: int, world_size: int) -> str | None:
    """What ZeRO 1/2 costs on one rank, where there is nothing to partition, and how to avoid it; else None.

    Kept as the recipe says (a multi-rank recipe tried on one rank runs the path it will run on many, with
    the same checkpoints and optimizer state), but DeepSpeed's ZeRO 1/2 optimizer still copies every gradient
    into one flat fp32 tensor and the weights back each step, a cost per step: 0.54x to 0.86x of stage 0's
    speed on the CPU benchmarks (bench/RESULTS.md, "One-rank ZeRO 1/2").
    """
    if world_size != 1 or zero_stage not in (1, 2):
        return None
    return (f"note: deepspeed.zero_stage = {zero_stage} on one rank partitions nothing, yet copies every gradient "
            f"and weight through flat fp32 buffers each step (0.54x-0.86x of stage 0's speed in bench/RESULTS.md); "
            f"--set deepspeed.zero_stage=0 avoids it")


def build_engine(model: nn.Module, recipe: Recipe, *, registry: Registry | None = None,
                 plan: BatchPlan | None = None, config: dict | None = None) -> Engine:
    """Wrap ``model`` in a DeepSpeed engine as the recipe says (ZeRO stage, precision, optimizer, schedule).

    ``plan`` and ``config`` are computed here unless the caller already has them (the trainer does).
    """
    rank, world_size = init_distributed()
    import deepspeed

    registry = registry or registry_of(recipe)
    plan = plan or batch_plan(recipe, world_size)
    config = config or deepspeed_config(recipe, plan)
    model.activation_checkpointing = recipe.train.activation_checkpointing
    model.to(device())
    optimizer = make_optimizer(model, recipe, registry)
    scheduler = make_scheduler(optimizer, recipe.train, registry)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config,
        dist_init_required=False)
    if not engine.zero_optimization():
        if world_size == 1:
            # without ZeRO the engine all-reduces every gradient after backward (flatten, reduce,
            # copy back), which on one rank changes nothing: about 3% of a small CPU step
            engine.enable_backward_allreduce = False
        if not engine.fp16_enabled() and not engine.bfloat16_enabled():
            engine.clip_fp32_gradients = types.MethodType(_clip_fp32_gradients, engine)
    if recipe.train.compile:
        # compile the module inside the engine, so parameter names (and checkpoints) stay unprefixed
        engine.compile()
    return Engine(engine, optimizer, scheduler, config, plan, rank, world_size)


def engine_step(engine, next_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]], grad_accum: int,
                aux: dict | None = None) -> torch.Tensor:
    """One optimizer step over ``grad_accum`` micro batches; the mean cross-entropy, still on the device.

    The objective is the cross-entropy plus the components' auxiliary losses (a mixture of
    experts' load balancing), added before backward so that DeepSpeed scales, accumulates and
    reduces them like the rest; ``aux``, if given, receives each one's mean. No host sync here:
    the caller reads the numbers once per step.
    """
    total = None
    for _ in range(grad_accum):
        x, y = next_batch()
        _, loss, terms = engine(x, y, return_aux=True)
        objective = loss + sum(terms.values()) if terms else loss
        engine.backward(objective)  # scaled by 1/grad_accum; all-reduced across ranks at the boundary
        engine.step()  # a no-op until the boundary, then clip, optimizer step, schedule step
        total = loss.detach() if total is None else total + loss.detach()
        if aux is not None:
            for name, value in terms.items():
                aux[name] = aux.get(name, 0.0) + value.detach() / grad_accum
    return total / grad_accum


def full_fp32_state_dict(engine) -> dict[str, torch.Tensor]:
    """The model's weights as fp32 CPU tensors under their module names; a collective on every rank.

    ZeRO 1-3 and the bf16/fp16 optimizers keep fp32 master weights (partitioned across ranks
    for ZeRO); DeepSpeed's ``safe_get_full_fp32_param`` gathers them. Plain fp32 parameters are
    the weights themselves.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    module = engine.module
    out: dict[str, torch.Tensor] = {}
    for name, p in module.named_parameters():  # tied weights appear once (under their first name)
        full = safe_get_full_fp32_param(p)
        out[name] = (p.detach() if full is None else full).float().cpu().clone()
    params = set(dict(module.named_parameters(remove_duplicate=False)))
    for name, t in module.state_dict().items():  # persistent buffers
        if name not in params:
            out[name] = t.detach().float().cpu().clone() if t.is_floating_point() else t.detach().cpu().clone()
    return out
