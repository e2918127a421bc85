"""TOML recipes: the typed schema, composition (``extends``, ``--set``) and validation.

A recipe is one TOML file structured by the one converter (:func:`toolkit.config.make_converter`)
into the frozen attrs classes below. :func:`load_recipe` resolves it in this order:

1. read the file; ``extends = "base.toml"`` (relative to the file) reads the base first, recursively,
   and deep-merges the file onto it: tables merge, arrays and scalars replace. Two exceptions:
   a table whose ``kind`` changes is replaced whole (the old component's options are dropped), and
   ``plugins`` accumulate (a base's components stay loadable). ``name`` and ``description`` describe
   one file and are not inherited; ``name`` defaults to the file's stem.
2. apply ``--set key.path=value`` overrides (values in TOML syntax; a bare word is a string), merged
   the same way, so ``--set model.attention.kind=gqa`` drops the old kind's options.
3. load the plugins (paths relative to the recipe file that names them), then structure and
   validate everything, collecting every problem, one line each, prefixed with the recipe path.
"""
from __future__ import annotations

import copy
import datetime
import importlib.util
import json
import os
import re
import stat
import sys
from pathlib import Path
from typing import Any, Literal

import attrs
import tomli_w
import torch
from attrs import validators as v
from cattrs.errors import ClassValidationError
from torch import nn

from . import families
from .config import (ValueTypeError, _show, build, errors_to_lines, format_errors, make_converter, path_key,
                     structure_fields)
from .contracts import Position, acts_per_layer, new_state, state_for
from .errors import ConfigError, PluginLoadError
from .families import components
from .model import ModelConfig, embed_per_layer_refusal, select_layers
from .plugin_manager import is_path_spec, load_registry, refusal
from .registry import Registry

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def _betas(_, attribute, value):
    if not all(0.0 <= b < 1.0 for b in value):
        raise ValueError(f"must be two numbers in [0, 1), got [{', '.join(repr(b) for b in value)}]")


@attrs.frozen
@components("data")  # the families toolkit/families.py places in [data]: a field each
class DataConfig:
    """Where tokens come from: a dataset of text files, a tokenizer and a validation split."""

    # a registered dataset ("tinyshakespeare" ships with the package) or a name of your own for `paths`
    dataset: str = "tinyshakespeare"
    # input files (.txt, .jsonl, .parquet) or folders of them, or a datasets save_to_disk folder; empty: the dataset
    paths: list[str] = attrs.Factory(list)
    # prepared token shards; default data/<dataset>-<tokenizer> under the working directory
    prepared_dir: str | None = None
    val_fraction: float = attrs.field(default=0.1, validator=[v.gt(0.0), v.lt(1.0)])
    # the column of .parquet files and datasets folders, and the JSONL field, that holds the text
    text_column: str = "text"


@attrs.frozen
class WandbConfig:
    """A Weights & Biases run of the training run (the run folder's name, under ``project``)."""

    project: str = "playattention"
    # "offline" writes the run under <run folder>/wandb and needs no network (`wandb sync` uploads it later)
    mode: Literal["offline", "online", "disabled"] = "offline"
    entity: str | None = None
    tags: list[str] = attrs.Factory(list)


@attrs.frozen
class TrackersConfig:
    """Experiment trackers that get every metrics.jsonl line too (rank 0; toolkit/trackers.py)."""

    tensorboard: bool = False  # event files in <run folder>/tensorboard (pip install 'playattention[tensorboard]')
    wandb: WandbConfig | None = None  # a table turns it on (pip install 'playattention[wandb]')
    csv: bool = False  # <run folder>/metrics.csv, one column per metric


#: the package each tracker needs, and the extra that installs it
TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}


def _tracker_checks(trackers: TrackersConfig | None) -> list[str]:
    """A tracker that is on but whose package is not installed: one line naming the extra to install."""
    out = []
    for name, (module, extra) in TRACKER_PACKAGES.items():
        on = getattr(trackers, name, None)
        if on and importlib.util.find_spec(module) is None:
            out.append(f"$.train.trackers.{name}: needs the {module} package, which is not installed: "
                       f"pip install 'playattention[{extra}]'")
    return out


@attrs.frozen
@components("train")  # the families toolkit/families.py places in [train]: a field each
class TrainConfig:
    """The optimisation: batch arithmetic, schedule, evaluation, sampling, checkpoints."""

    micro_batch: int = attrs.field(default=12, validator=v.gt(0))
    # give either grad_accum or tokens_per_step (= micro_batch * block_size * grad_accum * world size)
    grad_accum: int | None = attrs.field(default=None, validator=v.optional(v.gt(0)))
    tokens_per_step: int | None = attrs.field(default=None, validator=v.optional(v.gt(0)))
    max_steps: int = attrs.field(default=2000, validator=v.gt(0))
    lr: float = attrs.field(default=1e-3, validator=v.gt(0.0))
    min_lr: float = attrs.field(default=1e-4, validator=v.ge(0.0))
    warmup_steps: int = attrs.field(default=100, validator=v.ge(0))
    # steps over which lr decays to min_lr; default max_steps
    decay_steps: int | None = attrs.field(default=None, validator=v.optional(v.gt(0)))
    weight_decay: float = attrs.field(default=0.1, validator=v.ge(0.0))
    betas: tuple[float, float] = attrs.field(default=(0.9, 0.95), validator=_betas)
    grad_clip: float = attrs.field(default=1.0, validator=v.ge(0.0))  # 0 disables clipping
    eval_interval: int = attrs.field(default=250, validator=v.gt(0))
    eval_batches: int = attrs.field(default=20, validator=v.gt(0))
    sample_interval: int = attrs.field(default=0, validator=v.ge(0))  # 0: sample at the end only
    checkpoint_interval: int = attrs.field(default=0, validator=v.ge(0))  # 0: at the end only
    keep_checkpoints: int = attrs.field(default=3, validator=v.gt(0))
    # also keep the checkpoint with the lowest val loss (RUN@best), saved at each evaluation that improves it
    keep_best: bool = False
    log_interval: int = attrs.field(default=10, validator=v.gt(0))
    seed: int = 1337
    compile: bool = False
    activation_checkpointing: bool = False
    out_dir: str = "runs"
    trackers: TrackersConfig = attrs.Factory(TrackersConfig)  # [train.trackers]: TensorBoard, W&B, CSV


@attrs.frozen
class DeepSpeedConfig:
    """ZeRO data parallelism. ``config`` is merged last, verbatim, into the DeepSpeed config."""

    zero_stage: int = attrs.field(default=0, validator=v.in_((0, 1, 2, 3)))
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    offload: Literal["none", "cpu"] = "none"  # "cpu": optimizer states and step on the host (stages 2, 3)
    config: dict[str, Any] = attrs.Factory(dict)


#: the lowest temperature above 0 (greedy). Sampling divides the fp32 logits by it: at 1e-4 logits
#: up to 3e34 stay finite (1e-308 or 1e-40 turn any logit into inf, and the softmax into NaN), and two
#: logits 0.01 apart already differ e^100-fold in probability, so a lower one could only be greedy
MIN_TEMPERATURE = 1e-4


def _temperature(_, attribute, value):
    if not (value == 0 or value >= MIN_TEMPERATURE):
        raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE} (logits / temperature must stay "
                         f"finite in fp32), got {value!r}")


@attrs.frozen
class GenerateConfig:
    """Sampling for periodic and final samples (and the default of `playattention generate`)."""

    prompts: list[str] = attrs.Factory(lambda: ["\n"])
    max_new_tokens: int = attrs.field(default=500, validator=v.gt(0))
    temperature: float = attrs.field(default=0.8, validator=_temperature)
    # 0 disables top-k (TOML has no null to unset it)
    top_k: int | None = attrs.field(default=200, validator=v.optional(v.ge(0)))
    top_p: float | None = attrs.field(default=None, validator=v.optional([v.gt(0.0), v.le(1.0)]))
    seed: int = 1337


@attrs.frozen
@components("")  # eval: the evaluators run at every evaluation (toolkit.families)
class Recipe:
    name: str = "recipe"
    description: str = ""
    plugins: list[str] = attrs.Factory(list)
    model: ModelConfig = attrs.Factory(ModelConfig)
    data: DataConfig = attrs.Factory(DataConfig)
    train: TrainConfig = attrs.Factory(TrainConfig)
    deepspeed: DeepSpeedConfig = attrs.Factory(DeepSpeedConfig)
    generate: GenerateConfig = attrs.Factory(GenerateConfig)


# -- reading and composing ------------------------------------------------------------------------
#: the largest recipe file read (a recipe is a few KiB; this refuses /dev/zero and generated junk early)
MAX_RECIPE_BYTES = 1 << 20
#: the deepest nesting of tables and arrays in a recipe or a --set value (a real recipe nests 5 deep)
MAX_DEPTH = 32
#: the longest chain of ``extends`` (a recipe, its base, the base's base, ...)
MAX_EXTENDS = 32
#: the most entries of a recipe's ``plugins`` array
MAX_PLUGINS = 64


def read_toml(path: str | Path) -> dict:
    """Parse a TOML file; invalid TOML is a ConfigError naming file, line and column.

    Only a regular file of at most MAX_RECIPE_BYTES nesting at most MAX_DEPTH levels is read: a
    FIFO would block forever, a device never end, and a deep nest overflow the parser's stack.
    """
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; fstat then refuses it
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except IsADirectoryError:
        raise ConfigError([f"{path}: is a folder, not a recipe file"]) from None
    except (OSError, ValueError) as exc:  # ValueError: a null byte in the path
        raise ConfigError([f"{path}: cannot read recipe file: {getattr(exc, 'strerror', None) or exc}"]) from None
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise ConfigError([f"{path}: is a folder, not a recipe file"])
        if not stat.S_ISREG(mode):
            raise ConfigError([f"{path}: not a regular file ({_file_kind(mode)}); a recipe is a TOML file"])
        try:
            raw = f.read(MAX_RECIPE_BYTES + 1)
        except OSError as exc:
            raise ConfigError([f"{path}: cannot read recipe file: {exc.strerror or exc}"]) from None
    if len(raw) > MAX_RECIPE_BYTES:
        raise ConfigError([f"{path}: larger than {MAX_RECIPE_BYTES // 1024} KiB, the limit for a recipe file"])
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except tomllib.TOMLDecodeError as exc:
        text = str(exc)
        m = re.search(r"\(at line (\d+), column (\d+)\)", text)
        where = f"{path}:{m[1]}:{m[2]}" if m else f"{path}"
        reason = re.sub(r"\s*\(at line \d+, column \d+\)", "", text).strip() or "parse error"
        raise ConfigError([f"{where}: invalid TOML: {reason[0].lower() + reason[1:]}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: invalid TOML: not UTF-8 text ({exc.reason} at byte {exc.start})"]) from None
    except RecursionError:  # the parser recurses once per level of an inline array or table
        raise ConfigError([f"{path}: {_too_deep()}"]) from None
    deep = too_deep(data)
    if deep:
        raise ConfigError([f"{path}: {deep}"])
    return data


def _file_kind(mode: int) -> str:
    kinds = [(stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISSOCK, "a socket")]
    return next((name for test, name in kinds if test(mode)), "not a plain file")


def _too_deep(where: str = "$") -> str:
    return f"{where}: nested more than {MAX_DEPTH} levels deep (tables and arrays), the limit for a recipe"


def too_deep(value: Any, root: str = "$") -> str | None:
    """A problem line if ``value`` nests tables and arrays more than MAX_DEPTH levels, else None (no recursion)."""
    stack = [(value, root, 0)]
    while stack:
        item, where, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth >= MAX_DEPTH:
                return _too_deep(where if len(where) <= 80 else where[:77] + "...")
            pairs = item.items() if isinstance(item, dict) else enumerate(item)
            for k, sub in pairs:
                stack.append((sub, f"{where}[{k}]" if isinstance(item, list) else f"{where}.{path_key(k)}", depth + 1))
    return None


def recipe_file(path: str | Path) -> Path:
    """The recipe file for ``path``: the file itself, or ``recipe.toml`` inside a run folder."""
    p = Path(path)
    if p.is_dir():
        if (p / "recipe.toml").is_file():
            return p / "recipe.toml"
        raise ConfigError([f"{path}: a folder without a recipe.toml (not a run folder)"])
    if not p.exists():
        raise ConfigError([f"{path}: no such recipe file"])
    return p


def _normalise_components(data: dict) -> None:
    """``attention = "gqa"`` is shorthand for ``[model.attention] kind = "gqa"``: merge tables, not strings."""
    for fam in families.FAMILIES:
        if fam.where is None or fam.many:
            continue
        table = data.get(fam.section) if fam.section else data
        if isinstance(table, dict) and isinstance(table.get(fam.key), str):
            table[fam.key] = {"kind": table[fam.key]}


def deep_merge(base: dict, over: dict) -> dict:
    """``over`` merged onto ``base`` (new dict): tables merge, anything else replaces.

    A table whose ``kind`` differs between the two is replaced whole, so the options of the old
    component do not leak into the new one.
    """
    out = copy.deepcopy(base)
    for key, value in over.items():
        old = out.get(key)
        if isinstance(value, dict) and isinstance(old, dict):
            if "kind" in value and "kind" in old and value["kind"] != old["kind"]:
                out[key] = copy.deepcopy(value)
            else:
                out[key] = deep_merge(old, value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _leaves(data: dict, prefix: tuple = ()):
    for key, value in data.items():
        if isinstance(value, dict) and value:
            yield from _leaves(value, (*prefix, key))
        else:
            yield (*prefix, key)


def _display(path: Path) -> str:
    """A path as short as it can be: relative to the working directory when below it."""
    try:
        rel = os.path.relpath(path)
    except ValueError:  # another drive (Windows)
        return str(path)
    return str(Path(path).resolve()) if rel.startswith("..") else rel


@attrs.define
class _Sources:
    """Which file or --set gave each key (for ``(from base.toml)`` on error lines)."""

    by_key: dict[tuple, str] = attrs.Factory(dict)

    def record(self, data: dict, source: str | None) -> None:
        for key in _leaves(data):
            if source is None:
                self.by_key.pop(key, None)
            else:
                self.by_key[key] = source

    def lookup(self, keys: tuple) -> str | None:
        for n in range(len(keys), 0, -1):
            if keys[:n] in self.by_key:
                return self.by_key[keys[:n]]
        return None


@attrs.define
class _Reading:
    """State of one :func:`resolve_data`: the recipe as the user named it, sources, errors so far."""

    top: str  # the recipe path as given, the prefix of every error line
    top_file: Path  # resolved
    sources: _Sources
    errors: list[str] = attrs.Factory(list)

    def origin(self, path: Path) -> str | None:
        """None for the recipe itself, else how to name a base file on an error line."""
        return None if path.resolve() == self.top_file else _display(path)

    def line(self, path: Path, text: str) -> str:
        origin = self.origin(path)
        return f"{self.top}: {text}" + (f" (from {origin})" if origin else "")


def _read_layers(path: Path, ctx: _Reading, chain: list[Path]) -> dict:
    """The merged data of ``path`` and everything it extends (recoverable errors collected in ctx)."""
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(_display(p) for p in [*chain[chain.index(resolved):], resolved])
        raise ConfigError([f"{ctx.top}: extends cycle: {cycle}"])
    if len(chain) >= MAX_EXTENDS:
        raise ConfigError([f"{ctx.top}: extends chain longer than {MAX_EXTENDS} files, the limit "
                           f"(at {_display(path)})"])
    data = read_toml(path)
    _normalise_components(data)

    plugins = data.get("plugins", [])
    if problem := _plugins_problem(plugins):
        ctx.errors.append(ctx.line(path, problem))
        data.pop("plugins")
    elif plugins:  # relative to the file that names them, so a recipe works from any directory
        data["plugins"] = [str((path.parent / p).resolve()) if is_path_spec(p) else p for p in plugins]

    base_name = data.pop("extends", None)
    base: dict = {}
    if isinstance(base_name, str):
        base_path = path.parent / base_name
        if not base_path.is_file():
            raise ConfigError([ctx.line(path, f"$.extends: no such file \"{base_name}\" (looked for {_display(base_path)})")])
        base = _read_layers(base_path, ctx, [*chain, resolved])
        for key in ("name", "description"):  # they describe one file
            base.pop(key, None)
    elif base_name is not None:
        ctx.errors.append(ctx.line(path, f"$.extends: expected a file name (string), got {_show(base_name)}"))
    merged = deep_merge(base, data)
    merged_plugins = list(dict.fromkeys([*base.get("plugins", []), *data.get("plugins", [])]))
    if merged_plugins:
        merged["plugins"] = merged_plugins
    ctx.sources.record(data, ctx.origin(path))
    return merged


def _plugins_problem(plugins: Any) -> str | None:
    """What is wrong with a ``plugins`` value (``$.plugins...: problem``), or None."""
    if not isinstance(plugins, list) or not all(isinstance(p, str) for p in plugins):
        return f"$.plugins: expected an array of strings, got {_show(plugins)}"
    if len(plugins) > MAX_PLUGINS:
        return f"$.plugins: {len(plugins)} plugins, more than the limit of {MAX_PLUGINS}"
    for i, p in enumerate(plugins):
        if "\0" in p or not p.strip():
            return f"$.plugins[{i}]: not a plugin file or module name: {_show(p)}"
    return None


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=3e-4"`` -> (["train", "lr"], 0.0003). A value that is not TOML is a plain string."""
    key, sep, raw = text.partition("=")
    keys = [k.strip() for k in key.strip().split(".")]
    shown = _show(text)[1:-1]  # escaped: a newline in a value stays on one line
    if not sep or not all(keys):
        raise ConfigError([f"--set {shown}: expected KEY.PATH=VALUE, e.g. --set train.lr=3e-4"])
    if len(keys) > MAX_DEPTH:
        raise ConfigError([f"--set {shown[:60]}...: {len(keys)} keys deep, more than the limit of {MAX_DEPTH}"])
    try:
        value = tomllib.loads(f"value = {raw.strip()}")["value"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()  # --set model.attention.kind=gqa: a bare word means the string
    except RecursionError:
        raise ConfigError([f"--set {'.'.join(keys)}=...: {_too_deep('the value')}"]) from None
    deep = too_deep(value, "the value")
    if deep:
        raise ConfigError([f"--set {'.'.join(keys)}=...: {deep}"])
    return keys, value


def overrides_table(overrides: list[str] | tuple[str, ...], sources: _Sources | None = None) -> dict:
    """All ``--set`` overrides as one nested table (a later one wins over an earlier one)."""
    table: dict = {}
    for text in overrides:
        keys, value = parse_override(text)
        node = table
        for i, k in enumerate(keys[:-1]):
            if k in node and not isinstance(node[k], dict):
                raise ConfigError([f"--set {text}: {'.'.join(keys[: i + 1])} was set to a value by an earlier --set"])
            node = node.setdefault(k, {})
        node[keys[-1]] = value
        if sources is not None:
            leaf: dict = {keys[-1]: value}
            for k in reversed(keys[:-1]):
                leaf = {k: leaf}
            sources.record(leaf, f"--set {text}")
    _normalise_components(table)
    return table


def _top(path: str | Path) -> tuple[Path, str]:
    """The recipe file and how error lines name it (as the user typed it, or the run folder's recipe.toml)."""
    file = recipe_file(path)
    return file, (str(path) if file == Path(path) else _display(file))


def resolve_data(path: str | Path, overrides=(), plugins=(), *, _sources: _Sources | None = None) -> dict:
    """The recipe's plain data after ``extends`` and ``--set``, before structuring (plugin paths absolute)."""
    file, top = _top(path)
    ctx = _Reading(top, file.resolve(), _sources if _sources is not None else _Sources())
    data = _read_layers(file, ctx, [])
    if "name" not in data:  # a run folder's recipe.toml always has one (recipe show writes it)
        data["name"] = file.stem
    data = deep_merge(data, overrides_table(overrides, ctx.sources))
    named = data.get("plugins", [])
    if isinstance(named, list) and all(isinstance(p, str) for p in named):
        # file layers made theirs absolute already; --set and --plugin ones are relative to here
        specs = [*named, *plugins]
        if problem := _plugins_problem(specs):
            raise ConfigError([*ctx.errors, f"{top}: {problem}"])
        if specs:
            data["plugins"] = list(dict.fromkeys(str(Path(p).resolve()) if is_path_spec(p) else p for p in specs))
    if ctx.errors:
        raise ConfigError(ctx.errors)
    return data


# -- structuring and validation -------------------------------------------------------------------
SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "deepspeed": DeepSpeedConfig,
            "generate": GenerateConfig}


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = (), plugins: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, resolve and validate a recipe file (or a run folder's recipe.toml).

    ``overrides`` are ``--set`` strings (``"train.lr=3e-4"``), ``plugins`` extra plugin files or
    modules (``--plugin``). Raises :class:`toolkit.config.ConfigError` with every problem, one line
    each, prefixed with the recipe path.
    """
    sources = _Sources()
    data = resolve_data(path, overrides, plugins, _sources=sources)
    recipe, lines = validate(data)
    if lines:
        raise ConfigError([f"{_top(path)[1]}: {_with_source(line, sources)}" for line in lines])
    return recipe


def load_for_reading(path: str | Path, overrides=(), plugins=()) -> tuple[Recipe | None, dict, list[str]]:
    """(recipe, its plain data, a line per plugin file not loaded) for commands that only show a recipe.

    A plugin file that may not run here (:func:`toolkit.plugin_manager.refusal`) is not imported:
    the data is then the recipe as written (``extends`` and ``--set`` applied), unchecked, since
    checking its components' options would run the plugin; the recipe is None.
    """
    data = resolve_data(path, overrides, plugins)
    held = [(i, p, why) for i, p in enumerate(data.get("plugins", []))
            if is_path_spec(p) and (why := refusal(Path(p)))]
    if not held:
        recipe = load_recipe(path, overrides, plugins)
        return recipe, recipe_to_dict(recipe), []
    return None, data, [f"$.plugins[{i}]: plugin \"{p}\" not loaded: {why}; the recipe is shown as written, unchecked "
                        f"(--trust-plugins loads and checks it)" for i, p, why in held]


_PATH_TOKEN = re.compile(r"\.([^.\[]+)")


def _with_source(line: str, sources: _Sources) -> str:
    """Append ``(from base.toml)`` or ``(from --set ...)`` to a line whose value came from elsewhere."""
    path, sep, _ = line.partition(": ")
    if not sep or not path.startswith("$"):
        return line
    source = sources.lookup(tuple(_PATH_TOKEN.findall(path.split("[")[0])))
    return f"{line} (from {source})" if source else line


def validate(data: dict) -> tuple[Recipe | None, list[str]]:
    """Structure resolved recipe data and run the cross-field checks: (recipe, []) or (None, every problem).

    Each section is structured on its own, so a section that fails still lends its valid fields
    to the checks that span sections (the batch arithmetic needs the model's block_size).
    """
    if not set(data) - {"name", "description", "plugins"}:
        # an empty file (or one of comments) would otherwise train the default GPT-2 124M: surely not what was meant
        return None, ["$: an empty recipe, no [model] table: nothing to train (write one, or extend a recipe that has one)"]
    lines: list[str] = []
    data = _spell_out_default_components(dict(data))
    registry, plugin_lines = _registry_for(data.get("plugins", []))
    lines += plugin_lines
    converter = make_converter(registry)

    kwargs, errors = structure_fields(converter, {k: val for k, val in data.items() if k not in SECTIONS}, Recipe)
    lines += errors_to_lines(errors)
    values: dict[str, dict] = {}  # each section's valid field values, defaults filled in
    for name, cls in SECTIONS.items():
        if name not in data:
            values[name] = attrs.asdict(cls(), recurse=False)
            continue
        root = f"$.{name}"
        try:
            fields, errors = structure_fields(converter, data[name], cls)
        except ValueTypeError as exc:  # `model = 3`
            lines.append(f"{root}: {exc}")
            continue
        lines += errors_to_lines(errors, root)
        defaults = {f.name: f.default.factory() if isinstance(f.default, attrs.Factory) else f.default
                    for f in attrs.fields(cls) if f.default is not attrs.NOTHING}
        failed = set(data[name]) - set(fields)
        values[name] = {k: val for k, val in {**defaults, **fields}.items() if k not in failed}
        if not errors:
            try:
                kwargs[name] = build(cls, fields)
            except ClassValidationError as exc:  # a refused combination, e.g. n_embd % n_head
                lines += format_errors(exc, root)
    model = kwargs.get("model")  # None: the model section failed
    lines += _cross_checks(values, model, registry)
    if lines:
        return None, lines
    recipe = build(Recipe, kwargs)
    lines = _component_recipe_checks(recipe, registry)
    return (None, lines) if lines else (recipe, [])


def _spell_out_default_components(data: dict) -> dict:
    """Every chosen component as a table, defaults included, so every spec carries its options
    instance: a recipe equals the one loaded back from its `recipe show` text."""
    for fam in families.FAMILIES:
        if fam.where is None or fam.many:
            continue
        if fam.section:
            if not isinstance(data.setdefault(fam.section, {}), dict):
                continue  # `model = 3`: reported by structuring
            data[fam.section] = {fam.key: {"kind": fam.default}, **data[fam.section]}
        else:
            data = {fam.key: {"kind": fam.default}, **data}
    return data


def _registry_for(plugins) -> tuple[Registry, list[str]]:
    """The registry of the recipe's plugins, and a line for each plugin that cannot be loaded."""
    lines, good = [], []
    for i, spec in enumerate(plugins if isinstance(plugins, list) else []):
        if not isinstance(spec, str):
            continue  # reported by structuring
        try:
            load_registry([spec])
        except PluginLoadError as exc:
            reason = str(exc).split(" failed: ", 1)[-1]
            shown = _display(Path(spec)) if is_path_spec(spec) else spec
            lines.append(f"$.plugins[{i}]: cannot load plugin \"{shown}\": {reason}")
            continue
        good.append(spec)
    return load_registry(good), lines


def registry_of(recipe: Recipe) -> Registry:
    """The registry a recipe's components come from: built-ins, installed packages and its plugins."""
    return load_registry(recipe.plugins)


def _cross_checks(s: dict[str, dict], model: ModelConfig | None, registry: Registry) -> list[str]:
    """Checks that need several values: components vs the model's shape, batch arithmetic, schedule."""
    m, t, ds = (s.get(k, {}) for k in ("model", "train", "deepspeed"))
    out: list[str] = []

    def have(section: dict, *keys: str) -> bool:
        return all(k in section for k in keys)

    sizes = _size_checks(s)
    out += sizes
    if model is not None and not sizes:  # a model of a million layers is not built, not even on meta
        out += _model_component_checks(model, registry)
    out += _deepspeed_config_checks(ds.get("config"))

    # batch arithmetic at world size 1 (`playattention inspect --world-size N` checks other sizes)
    if have(t, "micro_batch", "tokens_per_step", "grad_accum") and have(m, "block_size"):
        mb, T, tps, ga = t["micro_batch"], m["block_size"], t["tokens_per_step"], t["grad_accum"]
        if tps is not None:
            per = mb * T
            if tps % per:
                out.append(f"$.train.tokens_per_step: {tps} is not divisible by micro_batch * block_size "
                           f"= {mb} * {T} = {per} (the tokens of one micro batch)")
            elif ga is not None and ga != tps // per:
                out.append(f"$.train.grad_accum: {ga} disagrees with tokens_per_step / (micro_batch * block_size) "
                           f"= {tps} / ({mb} * {T}) = {tps // per}; give only one of them")
    if have(t, "lr", "min_lr") and t["min_lr"] > t["lr"]:
        out.append(f"$.train.min_lr: must be <= lr ({t['lr']!r}), got {t['min_lr']!r}")
    if have(t, "warmup_steps", "decay_steps") and t["decay_steps"] is not None and t["decay_steps"] <= t["warmup_steps"]:
        out.append(f"$.train.decay_steps: must be > warmup_steps ({t['warmup_steps']}), got {t['decay_steps']}")
    out += _tracker_checks(t.get("trackers"))
    if have(ds, "offload", "zero_stage") and ds["offload"] == "cpu" and ds["zero_stage"] < 2:
        out.append(f"$.deepspeed.offload: \"cpu\" needs zero_stage 2 or 3, got zero_stage {ds['zero_stage']}")
    return out


#: the largest value of each integer that sizes the model or a batch (GPT-3 175B: 96 layers of 12288)
SIZE_LIMITS = {("model", "n_layer"): 1024, ("model", "n_head"): 1024, ("model", "n_embd"): 65536,
               ("model", "block_size"): 1 << 20, ("model", "vocab_size"): 1 << 22, ("train", "micro_batch"): 1 << 16}


def _size_checks(s: dict[str, dict]) -> list[str]:
    out = []
    for (section, key), limit in SIZE_LIMITS.items():
        value = s.get(section, {}).get(key)
        if isinstance(value, int) and value > limit:
            out.append(f"$.{section}.{key}: must be <= {limit:,}, got {value:,} (the limit on a size)")
    return out


#: keys of [deepspeed.config] that the toolkit sets from the recipe: given there too, the two would
#: disagree (DeepSpeed asserts at train time, or silently takes one), so they are refused at validation
TOOLKIT_DS_KEYS = {
    ("train_batch_size",): "train.micro_batch, train.grad_accum (or train.tokens_per_step) and the ranks",
    ("train_micro_batch_size_per_gpu",): "train.micro_batch",
    ("gradient_accumulation_steps",): "train.grad_accum (or train.tokens_per_step)",
    ("gradient_clipping",): "train.grad_clip",
    ("optimizer",): "train.optimizer",
    ("scheduler",): "train.schedule",
    ("zero_optimization", "stage"): "deepspeed.zero_stage",
    ("zero_optimization", "offload_optimizer"): "deepspeed.offload",
    ("bf16", "enabled"): "deepspeed.precision",
    ("fp16", "enabled"): "deepspeed.precision",
    ("torch_autocast", "enabled"): "deepspeed.precision",
}


def _deepspeed_config_checks(config: Any) -> list[str]:
    """A line for each [deepspeed.config] key that the toolkit sets itself, naming the recipe key to use."""
    if not isinstance(config, dict):
        return []
    out = []
    for keys, recipe_key in TOOLKIT_DS_KEYS.items():
        node: Any = config
        for k in keys:
            node = node.get(k, _MISSING) if isinstance(node, dict) else _MISSING
        if node is not _MISSING:
            out.append(f"$.deepspeed.config.{'.'.join(keys)}: set by the toolkit from {recipe_key}; "
                       f"set that instead")
    for key in ("bf16", "fp16", "torch_autocast", "zero_optimization"):
        if key in config and not isinstance(config[key], dict):
            out.append(f"$.deepspeed.config.{key}: expected a table, got {_show(config[key])}")
    return out


_MISSING = object()


def recipe_warnings(recipe: Recipe) -> list[str]:
    """Things a recipe does that are allowed but likely not meant, one line each (``$.path: ...``)."""
    t = recipe.train
    out = []
    if t.warmup_steps >= t.max_steps:  # nanoGPT and transformers keep warming up; say so rather than refuse
        out.append(f"$.train.warmup_steps: {t.warmup_steps} is not below max_steps {t.max_steps}: the learning "
                   f"rate warms up over the whole run and reaches {t.max_steps / (t.warmup_steps + 1):.0%} of "
                   f"lr at the last step")
    return out


def _model_component_checks(model: ModelConfig, registry: Registry) -> list[str]:
    """Build each model component once on the meta device, for the model and for each layer group:
    a factory that refuses its options for this model's shape raises ConfigError (e.g. gqa's
    n_kv_head must divide n_head); a position reports the longest sequence it can encode as ``max_len``."""
    build = registry.build_in
    out: list[str] = []
    # (recipe path, family, spec, the layer it is first used at) for the model's choices and each group's
    choices = []
    for family in families.PER_LAYER:  # blocks last: they build the others again
        choices.append((f"$.model.{family}", family, getattr(model, family), 0))
        for name, group in model.layers.items():
            if getattr(group, family) is not None:
                first = select_layers(group.at, model.n_layer)[0]
                choices.append((f"$.model.layers.{name}.{family}", family, getattr(group, family), first))
    built, said = {}, set()
    for path, family, spec, layer in choices:
        dims = model.dims(build, layer)
        args = {"norm": (model.n_embd,)}.get(family, ())
        try:
            with torch.device("meta"):
                built[path] = build(family, spec, attrs.evolve(dims, parts={**dims.parts, family: spec}), *args)
        except ConfigError as exc:  # a block says again what its parts said: once is enough
            out += [f"{path}: {line}" for line in exc.lines if line not in said]
            said.update(exc.lines)
            continue
        except Exception as exc:  # noqa: BLE001 - a factory that fails: the plugin's problem, said at its path
            if _exc_line(exc) not in said:  # a block fails again for its failing part: once is enough
                out.append(f"{path}: {_named(registry, family, spec.kind)} failed to build: {_exc_line(exc)}")
                said.add(_exc_line(exc))
            continue
        wanted = Position if family == "position" else nn.Module
        if not isinstance(built[path], wanted):
            out.append(f"{path}: {_named(registry, family, spec.kind)} built {type(built[path]).__name__}, "
                       f"not {'a toolkit.contracts.Position' if family == 'position' else 'a torch.nn.Module'}")
        elif family == "position" and path != "$.model.position" and not acts_per_layer(built[path]):
            out.append(f"{path}: {embed_per_layer_refusal(spec.kind)}")
    limit = getattr(built.get("$.model.position"), "max_len", None)
    if isinstance(limit, int) and model.block_size > limit:
        out.append(f"$.model.block_size: position '{model.position.kind}' encodes at most {limit} positions, "
                   f"got block_size {model.block_size}")
    if not out:
        out += _probe_model(model, registry)
    return out


def _named(registry: Registry, family: str, kind: str) -> str:
    """``attention 'mine' (from my_attention.py)``: a component and the plugin that registered it."""
    source = registry.get(family, kind).source
    where = _display(Path(source.plugin)) if is_path_spec(source.plugin) else str(source)
    return f"{family} '{kind}' (from {where})"


def _exc_line(exc: BaseException) -> str:
    text = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


#: the batch and sequence length of the shape probe (tiny: the shapes are what it checks)
PROBE_B, PROBE_T = 2, 8


def _probe_model(model: ModelConfig, registry: Registry) -> list[str]:
    """Build the model's blocks on the meta device and run one forward of (PROBE_B, PROBE_T) tokens
    through each: a component whose forward fails, or returns another shape than its contract says,
    is reported at ``$.model.<family>`` naming its plugin.

    Every layer is probed, in order, with one per-forward state (a layer may read what an earlier
    one wrote there). Data-dependent operations (a mixture of experts' routing) cannot run
    on meta; such a probe is inconclusive and says nothing.
    """
    B, T, C = PROBE_B, min(PROBE_T, model.block_size), model.n_embd
    build = registry.build_in
    running: list[tuple[str, str, int | None]] = []  # the components whose forward is on the stack
    bad: list[str] = []

    def where(family, kind, layer):
        return f"$.model.{family}: {_named(registry, family, kind)}" + ("" if layer is None else f" at layer {layer}")

    def hooked(family, kind, module, layer):
        part = (family, kind, layer)

        def after(_, args, output):
            running.pop()
            want = tuple(args[0].shape) if args and isinstance(args[0], torch.Tensor) else None
            got = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            if want is not None and got != want:
                bad.append(f"{where(*part)}: forward returned {got if isinstance(got, str) else f'shape {got}'} "
                           f"for input {want}; the contract is (B, T, C) -> (B, T, C)")
                raise _ProbeFailed
        module.register_forward_pre_hook(lambda *_: running.append(part))
        module.register_forward_hook(after)

    layers = range(model.n_layer)  # every layer: with the per-forward state, a layer may read what earlier ones wrote
    pos = torch.arange(T, device="meta")  # (T,)
    try:
        with torch.device("meta"):
            position = build("position", model.position, model.dims(build))
            blocks = []
            for layer in layers:
                parts: list = []
                block = build("block", model.spec_at("block", layer),
                              model.dims(build, layer, lambda *part: parts.append(part)))
                for part in [("block", model.spec_at("block", layer).kind, block, layer), *parts]:
                    hooked(*part)
                blocks.append(block)
        x = position.embed(torch.zeros((B, T, C), device="meta"), pos)  # (B, T, C)
        if tuple(x.shape) != (B, T, C):
            return [f"{where('position', model.position.kind, None)}: embed returned shape {tuple(x.shape)} "
                    f"for ({B}, {T}, {C}) token embeddings"]
        state = new_state(torch.zeros((B, T), dtype=torch.long, device="meta"), x)
        for block in blocks:  # outside the device context: plain meta kernels, no mode overhead
            block(x, position, pos, None, **state_for(block, state))
    except _ProbeFailed:
        return bad
    except Exception as exc:  # noqa: BLE001 - the innermost component running is the one that failed
        if isinstance(exc, NotImplementedError) or "meta" in str(exc).lower() or not running:
            return []  # an operation meta tensors cannot do (or not a component's): inconclusive
        return [f"{where(*running[-1])}: forward failed: {_exc_line(exc)}"]
    return []


class _ProbeFailed(Exception):
    """Raised by a probe hook to stop the forward at the first wrong shape."""


def chosen_components(recipe: Recipe) -> list[tuple[str, families.Spec]]:
    """(recipe path, spec) of every component the recipe chooses, in the families' order."""
    out = []
    for fam in families.FAMILIES:
        if fam.where is None:
            continue
        holder = getattr(recipe, fam.section) if fam.section else recipe
        value = getattr(holder, fam.key)
        if fam.many:
            out += [(f"$.{fam.where}[{i}]", spec) for i, spec in enumerate(value)]
        else:
            out.append((f"$.{fam.where}", value))
    return out


def _component_recipe_checks(recipe: Recipe, registry: Registry) -> list[str]:
    """Each chosen component's own say on the whole recipe: a factory's ``check_recipe(options, recipe)``
    returns problem lines (``$.path: message``), e.g. an optimizer that needs ZeRO stage 0."""
    out = []
    for _, spec in chosen_components(recipe):
        check = getattr(registry.get(spec.family, spec.kind).factory, "check_recipe", None)
        if check is not None:
            out += list(check(spec.options, recipe))
    return out


# -- writing --------------------------------------------------------------------------------------
def _drop_none(value):
    """TOML has no null: leave unset optional keys out (they resolve to the same defaults)."""
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_drop_none(v) for v in value]
    return value


def recipe_to_dict(recipe: Recipe) -> dict:
    """The fully resolved recipe as plain data (every component's options spelled out)."""
    return _drop_none(make_converter(registry_of(recipe)).unstructure(recipe))


def dump_recipe(recipe: Recipe) -> str:
    """The fully resolved recipe as TOML text; loading it gives back an equal recipe."""
    return tomli_w.dumps(recipe_to_dict(recipe))


# -- comparing ------------------------------------------------------------------------------------
def toml_inline(value: Any) -> str:
    """A value in TOML's inline syntax (what you would write after ``--set key=``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_inline(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{path_key(k)} = {toml_inline(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()  # TOML's own date, time and date-time syntax
    return repr(value)  # numbers: repr spells nan, inf and -inf as TOML does


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """``{"model": {"n_head": 6}}`` -> ``{"model.n_head": 6}`` (arrays stay whole).

    An empty table stays, as the value ``{}``: nothing of ``data`` is lost, and a table one recipe
    lacks and the other has empty is a difference (against a full table, :func:`differences` lists
    the keys that came or went instead)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _key_order(a: dict, b: dict) -> dict:
    """The keys of both, table by table: a's order, then what only b has (so a table's keys stay together)."""
    out: dict = {}
    for key in [*a, *(k for k in b if k not in a)]:
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) or isinstance(vb, dict):
            out[key] = _key_order(va if isinstance(va, dict) else {}, vb if isinstance(vb, dict) else {}) or None
        else:
            out[key] = None
    return out


def diff_recipes(a: Recipe, b: Recipe) -> list[str]:
    """``key: a -> b`` for every resolved key whose value differs (``(unset)`` where one has none)."""
    return diff_data(recipe_to_dict(a), recipe_to_dict(b))


def diff_data(da: dict, db: dict) -> list[str]:
    """:func:`diff_recipes` of two recipes' plain data."""
    return diff_lines(flatten(da), flatten(db), keys=flatten(_key_order(da, db)))


#: a key one side of :func:`differences` does not have
MISSING: Any = object()


def differences(a: dict, b: dict, keys=None) -> list[tuple[str, Any, Any]]:
    """``(key, a's value, b's value)`` for each key of two flat dicts whose values differ (in value or
    type: 1 is not true), MISSING where one has none; in the order of ``keys`` (a's keys, then b's)."""
    keys = [*a, *(k for k in b if k not in a)] if keys is None else keys
    out = []
    for key in keys:
        va, vb = a.get(key, MISSING), b.get(key, MISSING)
        if va == vb and type(va) is type(vb):
            continue
        if MISSING in (va, vb) and {} in (va, vb) and any(k.startswith(key + ".") for k in (b if va == {} else a)):
            continue  # an empty table against the keys of a full one: those keys say what changed
        out.append((key, va, vb))
    return out


def diff_lines(a: dict, b: dict, keys=None, prefix: str = "") -> list[str]:
    """``key: a -> b`` for each of :func:`differences` (``(unset)`` where one has none)."""
    show = lambda v: "(unset)" if v is MISSING else toml_inline(v)  # noqa: E731
    return [f"{prefix}{key}: {show(va)} -> {show(vb)}" for key, va, vb in differences(a, b, keys)]
