"""Structuring a recipe's resolved data into the schema, and the checks that span fields and sections."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Callable

import attrs
from cattrs.errors import ClassValidationError

from .. import families
from ..converter import ValueTypeError, _show, build, field_problems, make_converter, problems_of, structure_fields
from ..errors import PluginLoadError, Problem
from ..plugin_manager import is_path_spec, load_registry
from ..registry import Registry
from .compose import _display
from .schema import DataConfig, DeepSpeedConfig, GenerateConfig, ModelConfig, Recipe, TrackersConfig, TrainConfig

#: a check of the model a recipe describes: (model, registry) -> its problems (at ``$.model...`` paths).
#: Building it needs torch, so the toolkit's (:func:`toolkit.probe.model_problems`) is handed in from above.
ModelCheck = Callable[[ModelConfig, Registry], list[Problem]]

SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "deepspeed": DeepSpeedConfig,
            "generate": GenerateConfig}

#: the package each tracker needs, and the extra that installs it
TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}


def _tracker_checks(trackers: TrackersConfig | None) -> list[Problem]:
    """A tracker that is on but whose package is not installed: a problem naming the extra to install."""
    out = []
    for name, (module, extra) in TRACKER_PACKAGES.items():
        on = getattr(trackers, name, None)
        if on and importlib.util.find_spec(module) is None:
            out.append(Problem(("train", "trackers", name), f"needs the {module} package, which is not installed: "
                                                             f"pip install 'playattention[{extra}]'"))
    return out


def validate(data: dict, model_check: ModelCheck | None = None) -> tuple[Recipe | None, list[Problem]]:
    """Structure resolved recipe data and run the cross-field checks: (recipe, []) or (None, every problem).

    Each section is structured on its own, so a section that fails still lends its valid fields
    to the checks that span sections (the batch arithmetic needs the model's block_size).
    ``model_check`` runs among them when the model section is valid and of a buildable size.
    """
    if not set(data) - {"name", "description", "plugins"}:
        # an empty file (or one of comments) would otherwise train the default GPT-2 124M: surely not what was meant
        return None, [Problem((), "an empty recipe, no [model] table: nothing to train "
                                  "(write one, or extend a recipe that has one)")]
    lines: list[Problem] = []
    data = _spell_out_default_components(dict(data))
    registry, plugin_lines = _registry_for(data.get("plugins", []))
    lines += plugin_lines
    converter = make_converter(registry)

    kwargs, errors = structure_fields(converter, {k: val for k, val in data.items() if k not in SECTIONS}, Recipe)
    lines += field_problems(errors)
    values: dict[str, dict] = {}  # each section's valid field values, defaults filled in
    for name, cls in SECTIONS.items():
        if name not in data:
            values[name] = attrs.asdict(cls(), recurse=False)
            continue
        try:
            fields, errors = structure_fields(converter, data[name], cls)
        except ValueTypeError as exc:  # `model = 3`
            lines.append(Problem((name,), str(exc)))
            continue
        lines += field_problems(errors, (name,))
        defaults = {f.name: f.default.factory() if isinstance(f.default, attrs.Factory) else f.default
                    for f in attrs.fields(cls) if f.default is not attrs.NOTHING}
        failed = set(data[name]) - set(fields)
        values[name] = {k: val for k, val in {**defaults, **fields}.items() if k not in failed}
        if not errors:
            try:
                kwargs[name] = build(cls, fields)
            except ClassValidationError as exc:  # a refused combination, e.g. n_embd % n_head
                lines += problems_of(exc, (name,))
    model = kwargs.get("model")  # None: the model section failed
    lines += _cross_checks(values, model, registry, model_check)
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


def _registry_for(plugins) -> tuple[Registry, list[Problem]]:
    """The registry of the recipe's plugins, and a problem for each plugin that cannot be loaded."""
    lines, good = [], []
    for i, spec in enumerate(plugins if isinstance(plugins, list) else []):
        if not isinstance(spec, str):
            continue  # reported by structuring
        try:
            load_registry([spec])
        except PluginLoadError as exc:
            shown = _display(Path(spec)) if is_path_spec(spec) else spec
            lines.append(Problem(("plugins", i), f"cannot load plugin \"{shown}\": {exc.reason}"))
            continue
        good.append(spec)
    return load_registry(good), lines


def registry_of(recipe: Recipe) -> Registry:
    """The registry a recipe's components come from: built-ins, installed packages and its plugins."""
    return load_registry(recipe.plugins)


def _cross_checks(s: dict[str, dict], model: ModelConfig | None, registry: Registry,
                  model_check: ModelCheck | None = None) -> list[Problem]:
    """Checks that need several values: components vs the model's shape, batch arithmetic, schedule."""
    m, t, ds = (s.get(k, {}) for k in ("model", "train", "deepspeed"))
    out: list[Problem] = []

    def have(section: dict, *keys: str) -> bool:
        return all(k in section for k in keys)

    sizes = _size_checks(s)
    out += sizes
    if model is not None and not sizes and model_check is not None:  # a model of a million layers is not built
        out += model_check(model, registry)
    out += _deepspeed_config_checks(ds.get("config"))

    # batch arithmetic at world size 1 (`playattention inspect --world-size N` checks other sizes)
    if have(t, "micro_batch", "tokens_per_step", "grad_accum") and have(m, "block_size"):
        mb, T, tps, ga = t["micro_batch"], m["block_size"], t["tokens_per_step"], t["grad_accum"]
        if tps is not None:
            per = mb * T
            if tps % per:
                out.append(Problem(("train", "tokens_per_step"), f"{tps} is not divisible by micro_batch * block_size "
                                                                  f"= {mb} * {T} = {per} (the tokens of one micro batch)"))
            elif ga is not None and ga != tps // per:
                out.append(Problem(("train", "grad_accum"), f"{ga} disagrees with tokens_per_step / (micro_batch * "
                                                            f"block_size) = {tps} / ({mb} * {T}) = {tps // per}; "
                                                            f"give only one of them"))
    if have(t, "lr", "min_lr") and t["min_lr"] > t["lr"]:
        out.append(Problem(("train", "min_lr"), f"must be <= lr ({t['lr']!r}), got {t['min_lr']!r}"))
    if have(t, "warmup_steps", "decay_steps") and t["decay_steps"] is not None and t["decay_steps"] <= t["warmup_steps"]:
        out.append(Problem(("train", "decay_steps"),
                           f"must be > warmup_steps ({t['warmup_steps']}), got {t['decay_steps']}"))
    out += _tracker_checks(t.get("trackers"))
    if have(ds, "offload", "zero_stage") and ds["offload"] == "cpu" and ds["zero_stage"] < 2:
        out.append(Problem(("deepspeed", "offload"), f"\"cpu\" needs zero_stage 2 or 3, got zero_stage {ds['zero_stage']}"))
    return out


#: the largest value of each integer that sizes the model or a batch (GPT-3 175B: 96 layers of 12288)
SIZE_LIMITS = {("model", "n_layer"): 1024, ("model", "n_head"): 1024, ("model", "n_embd"): 65536,
               ("model", "block_size"): 1 << 20, ("model", "vocab_size"): 1 << 22, ("train", "micro_batch"): 1 << 16}


def _size_checks(s: dict[str, dict]) -> list[Problem]:
    out = []
    for (section, key), limit in SIZE_LIMITS.items():
        value = s.get(section, {}).get(key)
        if isinstance(value, int) and value > limit:
            out.append(Problem((section, key), f"must be <= {limit:,}, got {value:,} (the limit on a size)"))
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


def _deepspeed_config_checks(config: Any) -> list[Problem]:
    """A problem for each [deepspeed.config] key that the toolkit sets itself, naming the recipe key to use."""
    if not isinstance(config, dict):
        return []
    out = []
    for keys, recipe_key in TOOLKIT_DS_KEYS.items():
        node: Any = config
        for k in keys:
            node = node.get(k, _MISSING) if isinstance(node, dict) else _MISSING
        if node is not _MISSING:
            out.append(Problem(("deepspeed", "config", *keys), f"set by the toolkit from {recipe_key}; set that instead"))
    for key in ("bf16", "fp16", "torch_autocast", "zero_optimization"):
        if key in config and not isinstance(config[key], dict):
            out.append(Problem(("deepspeed", "config", key), f"expected a table, got {_show(config[key])}"))
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


def _component_recipe_checks(recipe: Recipe, registry: Registry) -> list[Problem]:
    """Each chosen component's own say on the whole recipe: its ``check_recipe(options, recipe)``
    (:attr:`toolkit.registry.Component.check_recipe`) returns problems, or problem lines
    (``$.path: message``), e.g. an optimizer that needs ZeRO stage 0."""
    out = []
    for _, spec in chosen_components(recipe):
        check = registry.get(spec.family, spec.kind).check_recipe
        if check is not None:
            out += [p if isinstance(p, Problem) else _line_problem(p) for p in check(spec.options, recipe)]
    return out


def _line_problem(line: str) -> Problem:
    """A plugin's ``$.a.b[0]: message`` line as a problem. Lines are the plugin API that plugins already
    use, so this is the one place a path is read back from text: split at dots and brackets, no regex."""
    where, sep, message = line.partition(": ")
    if not sep or not where.startswith("$.") or '"' in where:
        return Problem(None, line)
    path: list = []
    for part in where[2:].split("."):
        name, *indexes = part.split("[")
        if not name or not all(i.endswith("]") and i[:-1].isdigit() for i in indexes):
            return Problem(None, line)
        path += [name, *(int(i[:-1]) for i in indexes)]
    return Problem(tuple(path), message)
