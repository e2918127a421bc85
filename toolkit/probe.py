"""The model a recipe describes, built on the meta device: does every component build and keep its
shapes, and what it counts (parameters, FLOPs per token). Shapes without storage, so it is instant.

:func:`load_buildable` is :func:`toolkit.recipe.load_recipe` with these checks: what every command
that builds or trains a model loads a recipe with.
"""
from __future__ import annotations

from pathlib import Path

import attrs
import torch
from torch import nn

from . import families
from .contracts import Parametrization, Position, acts_per_layer, new_state, state_for, takes_state
from .errors import ConfigError, Problem
from .model import Transformer, embed_per_layer_refusal, model_dims
from .plugin_manager import is_path_spec
from .recipe import ModelConfig, Recipe, load_recipe, registry_of, select_layers
from .recipe.compose import _display
from .registry import Registry


def load_buildable(path: str | Path, overrides: list[str] | tuple[str, ...] = (),
                   plugins: list[str] | tuple[str, ...] = ()) -> Recipe:
    """:func:`toolkit.recipe.load_recipe`, and every component of the model built on meta and probed
    (:func:`model_problems`): ConfigError with every problem, one line each, prefixed with the recipe path."""
    return load_recipe(path, overrides, plugins, model_check=model_problems)


def model_problems(model: ModelConfig, registry: Registry) -> list[Problem]:
    """Build each model component once on the meta device, for the model and for each layer group:
    a factory that refuses its options for this model's shape raises ConfigError (e.g. gqa's
    n_kv_head must divide n_head); a position reports the longest sequence it can encode as ``max_len``.
    Then probe the shapes (:func:`_probe_model`). A problem each, at its ``$.model...`` path."""
    build = registry.build_in
    out: list[Problem] = []
    # (recipe path, family, spec, the layer it is first used at) for the model's choices and each group's
    choices = []
    for family in ("parametrization", *families.PER_LAYER):  # blocks last: they build the others again
        choices.append((("model", family), family, getattr(model, family), 0))
        for name, group in model.layers.items():
            if family in families.PER_LAYER and getattr(group, family) is not None:
                first = select_layers(group.at, model.n_layer)[0]
                choices.append((("model", "layers", name, family), family, getattr(group, family), first))
    built, said = {}, set()
    for path, family, spec, layer in choices:
        dims = model_dims(model, build, layer)
        args = {"norm": (model.n_embd,)}.get(family, ())
        try:
            with torch.device("meta"):
                built[path] = build(family, spec, attrs.evolve(dims, parts={**dims.parts, family: spec}), *args)
        except ConfigError as exc:  # a block says again what its parts said: once is enough
            out += [Problem(path, line) for line in exc.lines if line not in said]
            said.update(exc.lines)
            continue
        except Exception as exc:  # noqa: BLE001 - a factory that fails: the plugin's problem, said at its path
            if _exc_line(exc) not in said:  # a block fails again for its failing part: once is enough
                out.append(Problem(path, f"{_named(registry, family, spec.kind)} failed to build: {_exc_line(exc)}"))
                said.add(_exc_line(exc))
            continue
        wanted = {"position": Position, "parametrization": Parametrization}.get(family, nn.Module)
        if not isinstance(built[path], wanted):
            named = "torch.nn.Module" if wanted is nn.Module else f"toolkit.contracts.{wanted.__name__}"
            out.append(Problem(path, f"{_named(registry, family, spec.kind)} built {type(built[path]).__name__}, "
                                     f"not a {named}"))
        elif family == "position" and path != ("model", "position") and not acts_per_layer(built[path]):
            out.append(Problem(path, embed_per_layer_refusal(spec.kind)))
    limit = getattr(built.get(("model", "position")), "max_len", None)
    if isinstance(limit, int) and model.block_size > limit:
        out.append(Problem(("model", "block_size"), f"position '{model.position.kind}' encodes at most {limit} "
                                                     f"positions, got block_size {model.block_size}"))
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


def _probe_model(model: ModelConfig, registry: Registry) -> list[Problem]:
    """Build the model's blocks on the meta device and run one forward of (PROBE_B, PROBE_T) tokens
    through each: a component whose forward fails, or returns another shape than its contract says,
    is reported at ``$.model.<family>`` naming its plugin.

    Layers that choose the same components behave alike, so one layer of each choice is probed (and
    the first and last), unless a component takes the per-forward state: then every layer, in order
    (a layer may read what an earlier one wrote there). Data-dependent operations (a mixture of experts' routing) cannot run
    on meta; such a probe is inconclusive and says nothing.
    """
    B, T, C = PROBE_B, min(PROBE_T, model.block_size), model.n_embd
    build = registry.build_in
    running: list[tuple[str, str, int | None]] = []  # the components whose forward is on the stack
    bad: list[Problem] = []

    def at(family, kind, layer, message):
        named = _named(registry, family, kind) + ("" if layer is None else f" at layer {layer}")
        return Problem(("model", family), f"{named}: {message}")

    def hooked(family, kind, module, layer):
        part = (family, kind, layer)

        def after(_, args, output):
            running.pop()
            want = tuple(args[0].shape) if args and isinstance(args[0], torch.Tensor) else None
            got = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            if want is not None and got != want:
                bad.append(at(*part, f"forward returned {got if isinstance(got, str) else f'shape {got}'} "
                                     f"for input {want}; the contract is (B, T, C) -> (B, T, C)"))
                raise _ProbeFailed
        module.register_forward_pre_hook(lambda *_: running.append(part))
        module.register_forward_hook(after)

    def build_blocks(layers) -> list[nn.Module]:
        blocks = []
        for layer in layers:
            parts: list = []
            block = build("block", model.spec_at("block", layer),
                          model_dims(model, build, layer, lambda *part: parts.append(part)))
            for part in [("block", model.spec_at("block", layer).kind, block, layer), *parts]:
                hooked(*part)
            blocks.append(block)
        return blocks

    first: dict[str, int] = {}
    for i in range(model.n_layer):
        first.setdefault(repr([model.spec_at(f, i) for f in families.PER_LAYER]), i)
    some = sorted({*first.values(), 0, model.n_layer - 1})  # a 1024-layer recipe: 2 blocks, not 1024
    pos = torch.arange(T, device="meta")  # (T,)
    try:
        with torch.device("meta"):
            position = build("position", model.position, model_dims(model, build))
            blocks = build_blocks(some)
            # a component that reads the state may read what an earlier layer wrote: then every layer, in order
            reads = any(takes_state(m) and getattr(m, "reads_state", True) for b in blocks for m in b.modules())
            if len(some) < model.n_layer and reads:
                blocks = build_blocks(range(model.n_layer))
        x = position.embed(torch.zeros((B, T, C), device="meta"), pos)  # (B, T, C)
        if tuple(x.shape) != (B, T, C):
            return [at("position", model.position.kind, None, f"embed returned shape {tuple(x.shape)} "
                                                               f"for ({B}, {T}, {C}) token embeddings")]
        state = new_state(torch.zeros((B, T), dtype=torch.long, device="meta"), x)
        for block in blocks:  # outside the device context: plain meta kernels, no mode overhead
            block(x, position, pos, None, **state_for(block, state))
    except _ProbeFailed:
        return bad
    except Exception as exc:  # noqa: BLE001 - the innermost component running is the one that failed
        if isinstance(exc, NotImplementedError) or "meta" in str(exc).lower() or not running:
            return []  # an operation meta tensors cannot do (or not a component's): inconclusive
        return [at(*running[-1], f"forward failed: {_exc_line(exc)}")]
    return []


class _ProbeFailed(Exception):
    """Raised by a probe hook to stop the forward at the first wrong shape."""


# -- counting -------------------------------------------------------------------------------------
def build_meta_model(recipe: Recipe) -> Transformer:
    """The recipe's model with shapes but no storage (instant, even for big models)."""
    with torch.device("meta"):
        return Transformer(recipe.model, registry_of(recipe))


def model_counts(recipe: Recipe) -> tuple[int, int]:
    """All parameters (tied embeddings once) and forward FLOPs per token at the full context,
    from the model built on the meta device (no memory, no init time)."""
    total = build_meta_model(recipe).component_report(recipe.model.block_size)[-1]
    return int(total["params"]), int(total["flops_per_token"])


def estimated_params(recipe: Recipe) -> int:
    """The model's parameters, counted on the meta device from one block of each distinct layer
    choice (times its layers) plus embeddings, position and final norm: a model of a thousand wide
    layers would take minutes to build whole, even on meta."""
    return sum(p.numel() * times for _, p, times in estimated_named_params(recipe))


def estimated_named_params(recipe: Recipe) -> list[tuple[str, torch.Tensor, int]]:
    """(name, meta tensor, how many layers have it) for every parameter, as :func:`estimated_params` counts them."""
    m, registry = recipe.model, registry_of(recipe)
    build = registry.build_in
    layers: dict[str, list[int]] = {}  # one layer index and the count of each distinct choice
    for i in range(m.n_layer):
        layers.setdefault(repr([m.spec_at(f, i) for f in families.PER_LAYER]), [i, 0])[1] += 1
    out = []
    with torch.device("meta"):
        for i, n in layers.values():
            block = build("block", m.spec_at("block", i), model_dims(m, build, i))
            out += [(f"transformer.h.{i}.{name}", p, n) for name, p in block.named_parameters()]
        out += [(f"transformer.wpe.{name}", p, 1)
                for name, p in build("position", m.position, model_dims(m, build)).named_parameters()]
        out += [(f"transformer.ln_f.{name}", p, 1)
                for name, p in model_dims(m, build).part("norm", m.n_embd, role="final").named_parameters()]
        heads = ["transformer.wte.weight"] + ([] if m.tie_embeddings else ["lm_head.weight"])
        out += [(name, torch.empty(m.vocab_size, m.n_embd), 1) for name in heads]
    return out

