"""Every kind of swappable part, declared once.

A *family* is a set of interchangeable parts registered by name: the model's attention, norm,
position and MLP, the optimizer and the learning-rate schedule, the tokenizer, datasets,
evaluators, CLI commands and Hugging Face architectures. Each entry below says which hook registers it, where a recipe chooses
it, the kind a recipe gets when it names none, what its factory is called with, and where the
conformance kit finds it in a model. Everything that lists families reads this table: the hooks
(:mod:`toolkit.hookspecs`), the registry, the recipe schema (:func:`components`), the converter,
checkpoint fingerprints, ablation keys, ``playattention plugins`` and the conformance kit.

Adding a family is one entry here, its field in toolkit/recipe/schema.py if a recipe chooses it
(:func:`components` says so when it is missing), its built-ins in ``plugins/`` and the code that uses what it builds.
"""
from __future__ import annotations

from typing import Any, ClassVar

import attrs

from .errors import RegistryError, did_you_mean

#: One hook per kind of extension (a plugin implements any of them with ``@hookimpl``).
HOOKS = {
    "register_components": "Register model components: ``register(family, name, factory, options=None, doc=None)``.",
    "register_optimizers": "Register optimizers: ``register(name, factory, options=None, doc=None)``.",
    "register_schedules": "Register learning-rate schedules: ``register(name, factory, options=None, doc=None)``.",
    "register_tokenizers": "Register tokenizers: ``register(name, factory, options=None, doc=None)``.",
    "register_datasets": "Register datasets by name: ``register(name, factory, options=None, doc=None)``.",
    "register_evaluators": "Register evaluators: ``register(name, factory, options=None, doc=None)``.",
    "register_commands": "Register CLI commands: ``register(name, factory, options=None, doc=None)``.",
    "register_architectures": "Register Hugging Face architectures: ``register(model_type, adapter, options=None, "
                              "doc=None)``.",
}


@attrs.frozen
class Family:
    """One family of registered parts."""

    name: str
    hook: str  # the hook (HOOKS) that registers it
    where: str | None  # its place in a recipe ("model.attention"); None: not chosen by a recipe
    default: str | None  # the kind a recipe gets when it names none
    contract: str  # what the factory is called with and what it returns (toolkit.contracts has the details)
    in_model: bool = False  # part of the model: it shapes the weights, so a resume may not change it
    per_layer: bool = False  # a recipe may choose it layer by layer ([model.layers.<name>])
    locations: tuple[str, ...] = ()  # module paths in a Transformer ("*" = every layer), for the conformance kit
    many: bool = False  # the recipe holds a list of them ([[eval]])

    @property
    def section(self) -> str:
        """The recipe table that holds it ("" for the top level)."""
        return self.where.rpartition(".")[0] if self.where else ""

    @property
    def key(self) -> str:
        return self.where.rpartition(".")[2] if self.where else ""


FAMILIES: tuple[Family, ...] = (
    Family("attention", "register_components", "model.attention", "mha",
           "factory(opts, dims) -> nn.Module; forward(x, position, pos, cache=None) -> y, x and y (B, T, C); "
           "declare state=None to get the per-forward state",
           in_model=True, per_layer=True, locations=("transformer.h.*.attn",)),
    Family("norm", "register_components", "model.norm", "layernorm",
           "factory(opts, dims, dim) -> nn.Module normalising the last dimension (of size dim)",
           in_model=True, per_layer=True, locations=("transformer.h.*.ln_*", "transformer.h.*.post_ln_*",
                                                     "transformer.ln_f")),
    Family("position", "register_components", "model.position", "learned",
           "factory(opts, dims) -> toolkit.contracts.Position (embed, rotate, score_bias); per layer: rotate, "
           "score_bias only", in_model=True, per_layer=True, locations=("transformer.wpe", "transformer.layer_wpe.*")),
    Family("mlp", "register_components", "model.mlp", "gelu",
           "factory(opts, dims) -> nn.Module; forward(x) -> y, both (B, T, C); declare state=None to get the "
           "per-forward state",
           in_model=True, per_layer=True, locations=("transformer.h.*.mlp",)),
    Family("block", "register_components", "model.block", "pre_norm",
           "factory(opts, dims) -> nn.Module; forward(x, position, pos, cache=None, state=None) -> x; builds "
           "its parts with dims.part(family), hands them the state with **state_for(part, state)", in_model=True,
           per_layer=True, locations=("transformer.h.*",)),
    # not in_model: it builds no module, but its kind and options sit in the model table, so a resume
    # may not change it either (checkpoint fingerprints hash every model.* key)
    Family("parametrization", "register_components", "model.parametrization", "standard",
           "factory(opts, dims) -> toolkit.contracts.Parametrization (init scales, lr multipliers, attention "
           "and output multipliers, as a function of width)"),
    Family("optimizer", "register_optimizers", "train.optimizer", "adamw",
           "factory(opts, model, recipe) -> torch.optim.Optimizer; the schedule scales every group's lr"),
    Family("schedule", "register_schedules", "train.schedule", "cosine",
           "factory(opts, train) -> callable: optimizer step (0-based) -> learning rate"),
    Family("tokenizer", "register_tokenizers", "data.tokenizer", "char",
           "factory(opts, corpus) -> toolkit.tokenizer.Tokenizer; corpus: the training text, or None"),
    Family("dataset", "register_datasets", None, None,
           "factory(opts) -> list of .txt/.jsonl files; chosen by data.dataset when data.paths is empty"),
    Family("evaluator", "register_evaluators", "eval", None,
           "factory(opts, ctx) -> callable: model -> {metric: float}, on every rank (toolkit.evaluate.EvalContext)",
           many=True),
    Family("command", "register_commands", None, None,
           "factory(parser) -> run(args) -> exit status; adds `playattention <name>` (from an installed package)"),
    Family("architecture", "register_architectures", None, None,
           "factory(opts) -> toolkit.hf.Adapter: a config.json model_type's config, tensors and tokenizer, both ways"),
)

#: the values of an attention's ``backend`` option (toolkit.contracts.attend says which runs when): here,
#: not in toolkit.contracts, so the options classes that list them import no torch
BACKENDS = ("sdpa", "flex", "math")

_BY_NAME = {f.name: f for f in FAMILIES}
NAMES: tuple[str, ...] = tuple(_BY_NAME)
MODEL_FAMILIES: tuple[str, ...] = tuple(f.name for f in FAMILIES if f.in_model)
PER_LAYER: tuple[str, ...] = tuple(f.name for f in FAMILIES if f.per_layer)


def family(name: str) -> Family:
    """The family called ``name``; RegistryError with a did-you-mean otherwise."""
    try:
        return _BY_NAME[name]
    except (KeyError, TypeError):
        hint = did_you_mean(name, NAMES) if isinstance(name, str) else None
        extra = f"; did you mean {hint!r}?" if hint else ""
        raise RegistryError(f"unknown component family {name!r}{extra} (families: {', '.join(NAMES)})") from None


def of_hook(hook: str) -> tuple[Family, ...]:
    return tuple(f for f in FAMILIES if f.hook == hook)


# -- a choice of component in a recipe ------------------------------------------------------------
@attrs.frozen
class Spec:
    """A component choice: a registered ``kind`` plus its options.

    Structured from a recipe, ``options`` is an instance of the component's options class. Made in
    Python, it may be None (the component's defaults) or a dict, which the model structures once
    with the recipe converter (:func:`toolkit.converter.resolve_spec`).
    """

    family: ClassVar[str] = ""
    kind: str
    options: Any = None


def _spec_type(name: str) -> type[Spec]:
    cls_name = "".join(part.capitalize() for part in name.split("_")) + "Spec"
    cls = attrs.frozen(type(cls_name, (Spec,), {"family": name, "__module__": __name__,
                                                 "__doc__": f"A choice of {name} (a registered kind) and its options."}))
    globals()[cls_name] = cls  # importable by name: pickles and reprs find it
    return cls


SPEC_TYPES: dict[str, type[Spec]] = {f.name: _spec_type(f.name) for f in FAMILIES}


def spec_type(name: str) -> type[Spec]:
    family(name)  # a did-you-mean for a typo
    return SPEC_TYPES[name]


def as_spec(name: str):
    """A converter for a recipe field of family ``name``: ``"gqa"``, ``{"kind": "gqa", ...}`` or a Spec."""
    cls = SPEC_TYPES[name]

    def convert(value):
        if isinstance(value, str):
            return cls(value)
        if isinstance(value, dict) and "kind" in value:
            rest = {k: v for k, v in value.items() if k != "kind"}
            return cls(value["kind"], rest or None)
        if isinstance(value, Spec) and type(value) is not cls:
            return cls(value.kind, value.options)
        return value

    return convert


def _as_specs(name: str):
    one = as_spec(name)
    return lambda values: [one(v) for v in values] if isinstance(values, (list, tuple)) else values


def component(name: str):
    """The schema field of a recipe's choice in family ``name``, written out in its class so an IDE
    finds it (``attention: Spec = component("attention")``): a Spec defaulting to the family's
    default kind, or a list of them for a family with ``many=True``."""
    fam = family(name)
    if fam.many:
        return attrs.field(factory=list, converter=_as_specs(name))
    return attrs.field(default=SPEC_TYPES[name](fam.default), converter=as_spec(name))


def layer_component(name: str):
    """The field of a layer group's own choice in per-layer family ``name``: None (the model's) or a Spec."""
    one = as_spec(name)
    return attrs.field(default=None, converter=lambda v: None if v is None else one(v))


def components(section: str):
    """Class decorator (before ``@attrs.frozen``) of a schema class that writes out a :func:`component`
    field for each family the table places in ``section``: each gets its family's own Spec type, which
    the converter structures by; a field the class lacks is an error when the module loads."""
    return lambda cls: _typed(cls, {f.key: list[SPEC_TYPES[f.name]] if f.many else SPEC_TYPES[f.name]
                                    for f in FAMILIES if f.where is not None and f.section == section})


def layer_components(cls):
    """The same for a layer group: a :func:`layer_component` field for every per-layer family."""
    return _typed(cls, {name: SPEC_TYPES[name] | None for name in PER_LAYER})


def _typed(cls, types: dict[str, Any]):
    annotations = dict(cls.__dict__.get("__annotations__", {}))
    if missing := [key for key in types if key not in annotations]:
        raise TypeError(f"{cls.__name__} lacks the field of {', '.join(missing)}: toolkit.families.FAMILIES places "
                        f"it there (write `{missing[0]}: Spec = component(...)`)")
    cls.__annotations__ = {**annotations, **types}
    return cls
