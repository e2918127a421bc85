"""Conformance kit: does a component keep its family's contract (:mod:`toolkit.contracts`)?

Run it from your plugin package's own tests, in either of two ways; both run the same checks.

**One call**, anywhere (a test, a notebook, a CI script); it runs every check and raises one
:class:`ConformanceError` that lists each failed check on its own line::

    from toolkit.testing import conformance

    def test_my_attention_conforms():
        conformance.check_component("attention", "my_attention", options={"n_groups": 2})

**A pytest class**, one test per check, so a failure names the behaviour that broke::

    from toolkit.testing import ComponentConformance

    class TestMyAttention(ComponentConformance):
        family = "attention"
        name = "my_attention"
        options = {"n_groups": 2}      # optional: the component's defaults otherwise
        plugins = ["my_attention.py"]  # optional: plugin files or modules to load first
        model = {"n_head": 8}          # optional: change the tiny test model's shape

Installed plugin packages (entry-point group ``playattention``) are loaded anyway. Components
are looked up in the process-wide registry, or in the ``registry`` you pass to check_component.

Each check builds the component inside a tiny GPT (:data:`TINY_MODEL`: 2 layers, 4 heads,
n_embd 32, block 48, vocab 97) whose other parts are the :data:`DEFAULT_PARTNERS` (mha, layernorm,
learned, gelu, pre_norm blocks), so a norm, a position or an MLP is tested where it lives. The
checks, in order:

    described        registered with a one-line description (its docstring's first line)
    counts           reports parameters and int forward FLOPs per token >= 0, non-decreasing in seq_len
    shape_and_dtype  keeps its family's shapes and the dtype, in fp32 and in bf16
    position_hooks   attention: calls position.rotate and position.score_bias (directly or through
                     attend) with the right positions, cached ones included, and uses what they return
    causal           changing the tokens after position t never changes the outputs at positions <= t
    kv_cache         cached decoding, token by token and in chunks, gives the full forward's outputs
    gradients        every parameter gets a finite gradient; each of the component's own is non-zero
    state_dict       saving and loading into a differently initialised model reproduces outputs exactly
    deterministic    the same seed gives the same weights, and the same outputs with dropout on
    partners         shape, causal and kv_cache with every registered position kind
                     (for a position: with every registered attention)
    post_norm        shape, causal and kv_cache in the post-norm block layout (Vaswani et al. 2017)
    backends         components with a `backend` option: "sdpa" and "math" give the same outputs
    flops            flops_per_token(T) is within 5% of what torch's FlopCounterMode counts for one
                     token decoded at context T (the attention arithmetic spelled out as matmuls)
    scale            attention: logits are q.k / sqrt(head dim) (q.k/sqrt(d) handed in as a score bias
                     with q zeroed gives the same output); opt out with conformance_skip (below)
    engine           two optimizer steps through a one-rank CPU DeepSpeed engine at ZeRO 0 and 1
                     (DeepSpeed broadcasts, flattens and partitions every parameter)
    aux_losses       a component that declares aux_losses sets finite 0-dim tensors every forward,
                     and their gradient reaches its parameters
    per_layer        shape, causal and kv_cache where only the last layer uses it; a block builds
                     the parts its layer chose
    state            a component that asks for the per-forward state changes none of its tensors in
                     place, and activation checkpointing and torch.compile(fullgraph=True) give the
                     plain forward's loss and gradients
    compile          torch.compile gives the eager outputs (only with compile=True: CPU compiles are slow)

A component for which a check cannot apply says so with a class attribute
``conformance_skip = {"scale": "the reason"}``; the kit skips that check and names the reason. Where
that depends on the options, make it a function of them (a staticmethod) returning that dict, e.g.
``{"position_hooks": "no position on this layer"} if not opts.rotate else {}``.

Tolerances are fp32's (atol 1e-5, rtol 1e-4) except where the text says "exactly".
"""
from __future__ import annotations

import atexit
import contextlib
import copy
import io
import os
import re
import shutil
import tempfile
import traceback
import unittest.mock
from pathlib import Path
from typing import Callable

import math
import warnings

import attrs
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import cattrs

from toolkit import contracts, families
from toolkit.converter import format_errors, make_converter
from toolkit.contracts import Position, acts_per_layer, flops_per_token, new_state, state_for
from toolkit.data import prepare
from toolkit.engine import build_engine, engine_step, make_scheduler
from toolkit.evaluate import EvalContext
from toolkit.families import SPEC_TYPES
from toolkit.model import ModelConfig, Transformer
from toolkit.plugin_manager import load_registry
from toolkit.recipe import DataConfig, DeepSpeedConfig, Recipe, TrainConfig
from toolkit.registry import Registry
from toolkit.tokenizer import ASSETS, load_tokenizer

#: the tiny model every check builds the component into (ModelConfig fields): 48 positions, so a
#: causal leak or a cache that forgets after 20 tokens shows, and past any sliding window the tests use
TINY_MODEL = dict(vocab_size=97, block_size=48, n_layer=2, n_head=4, n_embd=32, dropout=0.0)
#: the other three components of that model
DEFAULT_PARTNERS = {"attention": "mha", "norm": "layernorm", "position": "learned", "mlp": "gelu",
                    "block": "pre_norm"}
BATCH = 2
ATOL, RTOL = 1e-5, 1e-4


class ConformanceError(AssertionError):
    """A component broke its contract; the message says which checks failed and how."""


@attrs.frozen
class Subject:
    """The component under test and how to build a tiny model around it."""

    family: str
    name: str
    options: object  # an instance of the component's options class
    registry: Registry
    model: dict = attrs.Factory(dict)  # ModelConfig overrides

    @property
    def label(self) -> str:
        return f"{self.family} {self.name!r}"

    def config(self, **changes) -> ModelConfig:
        """The tiny model's config with this component; ``changes`` override fields (partners, layout, ...)."""
        fields = {**TINY_MODEL, **DEFAULT_PARTNERS, **self.model, self.family: SPEC_TYPES[self.family](self.name, self.options)}
        fields.update(changes)
        return ModelConfig(**fields)

    def build(self, seed: int = 0, **changes) -> Transformer:
        torch.manual_seed(seed)
        return Transformer(self.config(**changes), self.registry)

    def module_paths(self, model: Transformer) -> list[str]:
        """Where this component sits in ``model`` (module names, from its family's ``locations``)."""
        names = dict(model.named_modules())
        paths = []
        for pattern in families.family(self.family).locations:  # "*": one name part (a layer index, ...)
            regex = re.compile(re.escape(pattern).replace(r"\*", r"[^.]+") + "$")
            paths += [p for p in names if regex.match(p) and p not in paths]
        # only modules this component built (a post-norm model has an nn.Identity for ln_f)
        comp = self.registry.get(self.family, self.name)
        factory = comp.factory if isinstance(comp.factory, type) else None
        return [p for p in paths if factory is None or isinstance(names[p], factory)]

    def modules(self, model: Transformer) -> list[nn.Module]:
        return [model.get_submodule(p) for p in self.module_paths(model)]


def _typed_options(family: str, name: str, comp, options, registry: Registry):
    """``options`` as the component's options class: its defaults for None, a dict structured by the
    converter, an instance kept; ConformanceError saying what is wrong otherwise."""
    if options is None or isinstance(options, comp.options):
        try:
            return options if options is not None else comp.options()
        except TypeError as exc:
            raise ConformanceError(f"{family} {name!r}: its options have no defaults, pass options=...: {exc}") from None
    if isinstance(options, dict):
        try:
            return make_converter(registry).structure(options, comp.options)
        except (cattrs.BaseValidationError, ValueError, TypeError) as exc:
            lines = format_errors(exc, "options") if isinstance(exc, cattrs.BaseValidationError) else [str(exc)]
            raise ConformanceError(f"{family} {name!r}: invalid options: " + "; ".join(lines)) from None
    raise ConformanceError(f"{family} {name!r}: options must be a dict or {comp.options.__name__}, "
                           f"got {type(options).__name__}")


def make_subject(family: str, name: str, options=None, registry: Registry | None = None, *,
                 plugins: list[str] | tuple[str, ...] = (), model: dict | None = None) -> Subject:
    """Look the component up and structure its options; a readable ConformanceError if either fails."""
    if family not in families.MODEL_FAMILIES:
        raise ConformanceError(f"unknown component family {family!r} (families: "
                               f"{', '.join([*families.MODEL_FAMILIES, *PART_CHECKS])})")
    if registry is None:
        registry = load_registry(list(plugins))
    elif plugins:
        raise ConformanceError("pass either registry or plugins, not both (load the plugins into your registry first)")
    elif not isinstance(registry, Registry):
        raise ConformanceError(f"registry must be a toolkit.registry.Registry, got {type(registry).__name__}")
    comp = registry.get(family, name)  # UnknownComponentError names the registered ones
    opts = _typed_options(family, name, comp, options, registry)
    return Subject(family, name, opts, registry, dict(model or {}))


# -- helpers -------------------------------------------------------------------------------------
@contextlib.contextmanager
def single_thread():
    """Run tiny models on one intra-op thread: more threads only add synchronisation, and on a busy
    machine their spin-waits make a 1 ms forward take hundreds of ms."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def tokens(subject: Subject, T: int | None = None, seed: int = 0) -> torch.Tensor:
    cfg = subject.config()
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (BATCH, T or cfg.block_size), generator=g)


def _where(diff: torch.Tensor) -> str:
    idx = tuple(int(i) for i in torch.nonzero(diff == diff.max())[0])
    return f"max abs difference {diff.max().item():.3g} at index {idx}"


def assert_same(got: torch.Tensor, want: torch.Tensor, what: str, exact: bool = False) -> None:
    """Raise ConformanceError describing the largest mismatch between two tensors."""
    if got.shape != want.shape:
        raise ConformanceError(f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    got, want = got.detach().float(), want.detach().float()
    if exact:
        if not torch.equal(got, want):
            raise ConformanceError(f"{what}: not identical ({_where((got - want).abs().nan_to_num(float('inf')))})")
        return
    if not torch.isfinite(got).all():
        raise ConformanceError(f"{what}: non-finite values")
    if not torch.allclose(got, want, atol=ATOL, rtol=RTOL):
        raise ConformanceError(f"{what}: {_where((got - want).abs())} (atol {ATOL}, rtol {RTOL})")


def decode(model: Transformer, idx: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    """Logits (B, T, V) from feeding idx through a KV cache in chunks of the given sizes."""
    cache = [{} for _ in model.transformer.h]
    out, start = [], 0
    for n in chunks:
        logits, _ = model(idx[:, start:start + n], cache=cache, start_pos=start)  # (B, n, V)
        out.append(logits)
        start += n
    return torch.cat(out, dim=1)


def chunk_sizes(T: int) -> list[int]:
    """Uneven chunks covering T tokens: a prefill, single tokens, and longer runs."""
    sizes, pattern = [], [5, 1, 1, 3, 4]
    while sum(sizes) < T:
        sizes.append(min(pattern[len(sizes) % len(pattern)], T - sum(sizes)))
    return sizes


def _state(module: nn.Module, x: torch.Tensor) -> dict:
    """The keyword that hands a fresh per-forward state to a module called on its own, if it asks for one."""
    return state_for(module, new_state(torch.zeros(x.shape[:2], dtype=torch.long), x))


# -- the checks ----------------------------------------------------------------------------------
def check_described(subject: Subject, **_) -> None:
    comp = subject.registry.get(subject.family, subject.name)
    if not comp.doc.strip():
        raise ConformanceError("no description: give the factory a docstring whose first line says what it is")


def check_counts(subject: Subject, **_) -> None:
    model = subject.build()
    T = model.config.block_size
    for path, module in zip(subject.module_paths(model), subject.modules(model)):
        counts = []
        for seq_len in (1, max(1, T // 2), T, 4 * T):
            n = flops_per_token(module, seq_len)
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ConformanceError(f"{path}: flops_per_token({seq_len}) must be an int >= 0, got {n!r}")
            counts.append(n)
        if counts != sorted(counts):
            raise ConformanceError(f"{path}: flops_per_token decreases with seq_len (1, T/2, T, 4T -> {counts})")
    for row in model.component_report(T):
        if not all(isinstance(row[k], int) and row[k] >= 0 for k in ("params", "flops_per_token")):
            raise ConformanceError(f"component_report row {row} has a count that is not an int >= 0")


def _check_module_shapes(subject: Subject, model: Transformer, dtype: torch.dtype) -> None:
    """The family contract on the component itself (not only through the model)."""
    cfg = model.config
    B, T, C, nh, hs = BATCH, cfg.block_size, cfg.n_embd, cfg.n_head, cfg.n_embd // cfg.n_head
    x = torch.randn(B, T, C, generator=torch.Generator().manual_seed(1)).to(dtype)
    pos = torch.arange(T)
    module = subject.modules(model)[0]
    position = model.transformer.wpe
    if subject.family == "position":
        if not isinstance(module, Position):
            raise ConformanceError(f"builds a {type(module).__name__}, not a toolkit.contracts.Position")
        checks = [("embed(tok_emb, pos)", module.embed(x, pos), x)]
        q = torch.randn(B, nh, T, hs).to(dtype)
        for n_kv in sorted({nh, 1}):  # keys may have fewer heads than queries (GQA, MQA)
            k = torch.randn(B, n_kv, T, hs).to(dtype)
            q_rot, k_rot = module.rotate(q, k, pos)
            checks += [(f"rotate(q, k) with {n_kv} key heads: q", q_rot, q), (f"rotate(q, k) with {n_kv} key heads: k", k_rot, k)]
        # a cached step: 3 new queries over all T keys
        bias = module.score_bias(pos[-3:], pos)
        if bias is not None:
            if tuple(bias.shape) not in ((nh, 3, T), (1, 3, T)):
                raise ConformanceError(f"score_bias(q_pos[3], k_pos[{T}]) has shape {tuple(bias.shape)}, expected ({nh}, 3, {T})")
            if not torch.isfinite(bias).all():
                raise ConformanceError("score_bias has non-finite values (leave masking to attend)")
    elif subject.family in ("attention", "block"):
        checks = [("forward(x, position, pos)", module(x, position, pos, **_state(module, x)), x)]
    else:  # norm, mlp: (B, T, C) -> (B, T, C)
        checks = [("forward(x)", module(x), x)]
    for what, got, like in checks:
        if got.shape != like.shape or got.dtype != like.dtype:
            raise ConformanceError(f"{what} in {dtype}: got {tuple(got.shape)} {got.dtype}, "
                                   f"expected {tuple(like.shape)} {like.dtype}")


def check_shape_and_dtype(subject: Subject, *, dtypes=(torch.float32, torch.bfloat16), **changes) -> None:
    for dtype in dtypes:
        model = subject.build(**changes).to(dtype).eval()
        idx = tokens(subject)
        with torch.no_grad():
            _check_module_shapes(subject, model, dtype)
            logits, _ = model(idx)
        want = (*idx.shape, model.config.vocab_size)
        if tuple(logits.shape) != want or logits.dtype != dtype:
            raise ConformanceError(f"model logits in {dtype}: got {tuple(logits.shape)} {logits.dtype}, expected {want} {dtype}")
        if not torch.isfinite(logits.float()).all():
            raise ConformanceError(f"model logits in {dtype} are not finite")


class SpyPosition(Position):
    """A Position that records how attention calls its hooks, and can perturb what they return."""

    def __init__(self, perturb: str | None = None):
        super().__init__()
        self.perturb, self.calls = perturb, []

    def rotate(self, q, k, pos):
        self.calls.append(("rotate", tuple(q.shape), tuple(k.shape), pos.tolist()))
        if self.perturb == "rotate":  # a fixed, non-trivial change to q and k: the output must change
            g = torch.Generator().manual_seed(5)
            q = q + torch.randn(q.shape, generator=g).to(q.dtype)
            k = k + torch.randn(k.shape, generator=g).to(k.dtype)
        return q, k

    def score_bias(self, q_pos, k_pos):
        self.calls.append(("score_bias", q_pos.tolist(), k_pos.tolist()))
        if self.perturb == "score_bias":  # attend to the current token only
            return -1e4 * (q_pos[:, None] - k_pos[None, :]).abs().float()[None]  # (1, Tq, Tk)
        return None


def check_position_hooks(subject: Subject, **_) -> None:
    if subject.family != "attention":
        return
    model = subject.build().eval()
    attn = subject.modules(model)[0]
    T, C = model.config.block_size, model.config.n_embd
    x = torch.randn(BATCH, T, C, generator=torch.Generator().manual_seed(2))
    pos = torch.arange(T)
    with torch.no_grad():
        spy = SpyPosition()
        plain = attn(x, spy, pos, **_state(attn, x))
        rotates = [c for c in spy.calls if c[0] == "rotate"]
        biases = [c for c in spy.calls if c[0] == "score_bias"]
        if len(rotates) != 1 or rotates[0][3] != pos.tolist() or rotates[0][1][2] != T or rotates[0][2][2] != T:
            raise ConformanceError(f"expected one call position.rotate(q (B, nh, {T}, hs), k (B, nkv, {T}, hs), pos), "
                                   f"got {rotates or 'none'}")
        if not biases or any(c[1] != pos.tolist() or c[2] != pos.tolist() for c in biases):
            raise ConformanceError(f"expected position.score_bias(q_pos, k_pos) with the {T} positions "
                                   f"(attend calls it), got {biases or 'no call'}")
        for hook in ("rotate", "score_bias"):
            if torch.allclose(attn(x, SpyPosition(perturb=hook), pos, **_state(attn, x)).float(), plain.float()):
                raise ConformanceError(f"the output ignores what position.{hook} returns")
        # decoding: the hooks see the new positions, and score_bias every cached key position
        spy, cache, split = SpyPosition(), {}, T - 6
        attn(x[:, :split], spy, pos[:split], cache, **_state(attn, x[:, :split]))
        spy.calls.clear()
        attn(x[:, split:], spy, pos[split:], cache, **_state(attn, x[:, split:]))
        rotate_pos = [c[3] for c in spy.calls if c[0] == "rotate"]
        bias_pos = [(c[1], c[2]) for c in spy.calls if c[0] == "score_bias"]
        new = pos[split:].tolist()
        if rotate_pos != [new]:
            raise ConformanceError(f"with a cache holding {split} tokens, rotate got positions {rotate_pos}, expected [{new}]")
        if not bias_pos or any(q != new or k[-len(new):] != new or k != sorted(k) for q, k in bias_pos):
            raise ConformanceError(f"with a cache holding {split} tokens, score_bias got (q_pos, k_pos) {bias_pos}: "
                                   f"expected q_pos {new} and k_pos the cached positions followed by these")


def check_causal(subject: Subject, **changes) -> None:
    model = subject.build(**changes).eval()
    idx = tokens(subject)
    T, V = idx.size(1), model.config.vocab_size
    with torch.no_grad():
        base, _ = model(idx)
        for t in sorted({0, T // 2, T - 2}):
            changed = idx.clone()
            changed[:, t + 1:] = (idx[:, t + 1:] + 1 + torch.arange(T - t - 1)) % V  # every later token differs
            out, _ = model(changed)
            assert_same(out[:, : t + 1], base[:, : t + 1], f"outputs at positions <= {t} changed when only tokens after {t} did")


def check_kv_cache(subject: Subject, **changes) -> None:
    model = subject.build(**changes).eval()
    idx = tokens(subject)
    T = idx.size(1)
    with torch.no_grad():
        full, _ = model(idx)
        assert_same(decode(model, idx, [1] * T), full, "token-by-token cached decoding vs the full forward")
        sizes = chunk_sizes(T)
        assert_same(decode(model, idx, sizes), full, f"cached decoding in chunks {sizes} vs the full forward")


def check_gradients(subject: Subject, **_) -> None:
    model = subject.build().train()
    idx, targets = tokens(subject, seed=1), tokens(subject, seed=2)
    _, loss = model(idx, targets)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    if missing:
        raise ConformanceError(f"no gradient reached {', '.join(missing)}")
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    if bad:
        raise ConformanceError(f"non-finite gradients in {', '.join(bad)}")
    zero = []
    for path, module in zip(subject.module_paths(model), subject.modules(model)):
        zero += [f"{path}.{n}" for n, p in module.named_parameters() if p.requires_grad and not p.grad.abs().sum() > 0]
    if zero:
        raise ConformanceError(f"gradients are all zero for {', '.join(zero)} (is the parameter used in forward?)")


def check_state_dict(subject: Subject, **_) -> None:
    saved, fresh = subject.build(seed=1).eval(), subject.build(seed=2).eval()
    buf = io.BytesIO()
    torch.save(saved.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    result = fresh.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ConformanceError(f"state_dict does not load into a fresh model: missing {result.missing_keys}, "
                               f"unexpected {result.unexpected_keys}")
    idx = tokens(subject)
    with torch.no_grad():
        assert_same(fresh(idx)[0], saved(idx)[0], "outputs after a state_dict save/load round trip", exact=True)


def check_deterministic(subject: Subject, **_) -> None:
    a, b = subject.build(seed=3, dropout=0.1), subject.build(seed=3, dropout=0.1)
    sa, sb = a.state_dict(), b.state_dict()
    differ = [k for k in sa if k not in sb or not torch.equal(sa[k], sb[k])]
    if differ:
        raise ConformanceError(f"two builds under the same seed have different {', '.join(differ)}")
    idx = tokens(subject)
    with torch.no_grad():
        assert_same(b.eval()(idx)[0], a.eval()(idx)[0], "eval outputs of two builds under the same seed", exact=True)
        a.train()
        torch.manual_seed(4)
        first, _ = a(idx)
        torch.manual_seed(4)
        second, _ = a(idx)
        assert_same(second, first, "training-mode outputs (dropout 0.1) under the same seed", exact=True)


def _behaviour(subject: Subject, **changes) -> None:
    check_shape_and_dtype(subject, dtypes=(torch.float32,), **changes)
    check_causal(subject, **changes)
    check_kv_cache(subject, **changes)


def partner_family(family: str) -> str:
    """Which family a component is crossed with: positions and blocks with every attention, the rest with every position."""
    return "attention" if family in ("position", "block") else "position"


def check_partners(subject: Subject, **_) -> None:
    other = partner_family(subject.family)
    failures, tried = [], 0
    for kind in subject.registry.names(other):
        comp = subject.registry.get(other, kind)
        try:
            comp.options()
        except TypeError:
            continue  # a partner without default options: we cannot choose them for it
        tried += 1
        try:
            _behaviour(subject, **{other: SPEC_TYPES[other](kind)})
        except Exception as exc:  # noqa: BLE001 - collect every partner's failure
            failures.append(f"    with {other} {kind!r}: {_describe(exc)}")
    if failures:
        raise ConformanceError(f"fails with {len(failures)} of {tried} {other} kinds:\n" + "\n".join(failures))


def check_post_norm(subject: Subject, **_) -> None:
    if subject.family != "block":  # a block is its own layout
        _behaviour(subject, block=SPEC_TYPES["block"]("post_norm"))


def check_backends(subject: Subject, **_) -> None:
    if "backend" not in attrs.fields_dict(type(subject.options)):
        return
    variants = {}
    for backend in ("sdpa", "math"):
        try:
            variants[backend] = attrs.evolve(subject.options, backend=backend)
        except (ValueError, TypeError):
            pass
    if len(variants) < 2:
        return
    idx = tokens(subject)
    other = partner_family(subject.family)
    for kind in subject.registry.names(other) if subject.family == "attention" else [None]:
        changes = {other: SPEC_TYPES[other](kind)} if kind else {}
        outs = {}
        for backend, opts in variants.items():
            sub = attrs.evolve(subject, options=opts)
            model = sub.build(**changes).eval()
            with torch.no_grad():
                outs[backend] = (model(idx)[0], decode(model, idx, chunk_sizes(idx.size(1))))
        with_ = f" with {other} {kind!r}" if kind else ""
        assert_same(outs["math"][0], outs["sdpa"][0], f"backend 'math' vs 'sdpa'{with_}: full forward")
        assert_same(outs["math"][1], outs["sdpa"][1], f"backend 'math' vs 'sdpa'{with_}: cached decoding")


def check_compile(subject: Subject, *, backend: str = "inductor", **changes) -> None:
    import torch._dynamo

    model = subject.build(**changes).eval()
    idx = tokens(subject)
    torch._dynamo.reset()  # a fresh cache: never fall back to eager after too many recompiles
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        want, _ = model(idx)
        got, _ = compiled(idx)
    torch._dynamo.reset()
    assert_same(got, want, f"torch.compile(backend={backend!r}) vs eager outputs")


def check_flops(subject: Subject, *, rtol: float = 0.05, **_) -> None:
    """flops_per_token(T) against torch's FlopCounterMode on one decoded token at context T."""
    model = subject.build().eval()
    idx = tokens(subject)
    T = idx.size(1)
    counter, cache = FlopCounterMode(display=False, depth=None), [{} for _ in model.transformer.h]
    # the math backend spells attention out as matmuls, which the counter sees (fused SDPA and flex it does not)
    flex, contracts.FLEX_ENABLED = contracts.FLEX_ENABLED, False
    try:
        with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
            model(idx[:, :-1], cache=cache)  # the prefill
            with counter:
                model(idx[:, -1:], cache=cache, start_pos=T - 1)  # one token at context T
    finally:
        contracts.FLEX_ENABLED = flex
    counted = {name.removeprefix(f"{type(model).__name__}."): sum(ops.values())
               for name, ops in counter.get_flop_counts().items()}
    for path, module in zip(subject.module_paths(model), subject.modules(model)):
        measured = counted.get(path, 0) / idx.size(0)  # per token (one token per sequence)
        if subject.family == "block" and getattr(type(module), "flops_per_token", None) is None:
            claimed = sum(flops_per_token(part, T) for part in module.children())  # what its parts say
        else:
            claimed = flops_per_token(module, T)
        if abs(claimed - measured) > rtol * max(measured, 1):
            raise ConformanceError(f"{path}: flops_per_token({T}) = {claimed:,}, but a decoded token at context {T} "
                                   f"does {measured:,.0f} matmul FLOPs (FlopCounterMode; within {rtol:.0%})")


class ScaleProbe(Position):
    """Records the q and k attention hands to rotate; replayed, it zeroes q and hands q.k/sqrt(d) back as
    the score bias, so attention that scales its logits by 1/sqrt(d) gives the recorded output again."""

    def __init__(self):
        super().__init__()
        self.q = self.k = None
        self.replay = False

    def rotate(self, q, k, pos):
        if not self.replay:
            self.q, self.k = q, k
            return q, k
        return torch.zeros_like(q), k

    def score_bias(self, q_pos, k_pos):
        if not self.replay:
            return None
        q, k = self.q.float(), self.k.float()  # (1, nh, T, hs), (1, nkv, T, hs)
        k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)  # (1, nh, T, hs)
        return (q @ k.transpose(-2, -1))[0] / math.sqrt(q.size(-1))  # (nh, T, T)


def check_scale(subject: Subject, **_) -> None:
    """Attention scales q.k by 1/sqrt(head dim) (Vaswani et al. 2017, eq. 1)."""
    if subject.family != "attention":
        return
    if getattr(subject.options, "softcap", None) is not None:  # the scale is what it is with the cap off
        subject = attrs.evolve(subject, options=attrs.evolve(subject.options, softcap=None))
    model = subject.build().eval()
    attn = subject.modules(model)[0]
    T, C = model.config.block_size, model.config.n_embd
    x = torch.randn(1, T, C, generator=torch.Generator().manual_seed(3))  # one sequence: a bias has no batch axis
    probe = ScaleProbe()
    with torch.no_grad():
        recorded = attn(x, probe, torch.arange(T), **_state(attn, x))
        probe.replay = True
        replayed = attn(x, probe, torch.arange(T), **_state(attn, x))
    assert_same(replayed, recorded, "the output with q.k/sqrt(d) handed in as a score bias (q zeroed) vs the plain "
                "output: the logits are not scaled by 1/sqrt(head dim)")


def _tiny_recipe(subject: Subject, stage: int) -> Recipe:
    return Recipe(model=subject.config(), train=TrainConfig(micro_batch=BATCH, max_steps=2, warmup_steps=0, lr=1e-3),
                  deepspeed=DeepSpeedConfig(zero_stage=stage), plugins=[])


def check_engine(subject: Subject, **_) -> None:
    """Two optimizer steps through a one-rank CPU DeepSpeed engine at ZeRO 0 and ZeRO 1."""
    idx, targets = tokens(subject, seed=1), tokens(subject, seed=2)
    for stage in (0, 1):
        recipe = _tiny_recipe(subject, stage)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            engine = build_engine(subject.build(), recipe, registry=subject.registry).engine
            for _ in range(2):
                loss = engine_step(engine, lambda: (idx, targets), 1)
        if not torch.isfinite(loss):
            raise ConformanceError(f"ZeRO {stage}: the loss after two engine steps is {loss.item()}")


def check_aux_losses(subject: Subject, **_) -> None:
    """A component that adds auxiliary losses sets finite scalars every forward, and they reach its parameters."""
    model = subject.build().train()
    _, loss, aux = model(tokens(subject, seed=1), tokens(subject, seed=2), return_aux=True)
    if not any(getattr(m, "aux_losses", None) for m in subject.modules(model)):
        return  # this component added none
    bad = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__ for k, v in aux.items()
           if not isinstance(v, torch.Tensor) or v.dim() != 0 or not torch.isfinite(v)}
    if bad:
        raise ConformanceError(f"aux_losses must be finite 0-dim tensors, got {bad}")
    if aux:
        sum(aux.values()).backward()
        own = [p for m in subject.modules(model) for p in m.parameters()]
        if not any(p.grad is not None and p.grad.abs().sum() > 0 for p in own):
            raise ConformanceError(f"the auxiliary losses {sorted(aux)} give no gradient to the component's parameters")


def check_per_layer(subject: Subject, **_) -> None:
    """Builds for every layer index (and as the final norm), and works where only some layers use it."""
    if subject.family not in families.PER_LAYER:
        return
    if subject.family == "position" and not acts_per_layer(subject.build().transformer.wpe):
        return  # it adds to the embeddings, once for the model: no layer may choose it (model.py refuses)
    spec = SPEC_TYPES[subject.family](subject.name, subject.options)
    partner = SPEC_TYPES[subject.family](DEFAULT_PARTNERS.get(subject.family, "pre_norm"))
    n = TINY_MODEL["n_layer"]
    groups = {"some": {"at": [n - 1], subject.family: spec}}
    _behaviour(subject, **{subject.family: partner, "layers": groups})
    if subject.family == "block":  # a block builds the attention its layer chose, not one of its own
        other = "mqa" if DEFAULT_PARTNERS["attention"] != "mqa" else "mha"
        model = subject.build(layers={"other": {"at": [n - 1], "attention": other}})
        want = subject.registry.get("attention", other).factory
        got = model.transformer.h[n - 1].attn
        if isinstance(want, type) and type(got) is not want:
            raise ConformanceError(f"layer {n - 1} chose attention {other!r}, but the block built a {type(got).__name__} "
                                   "(build the layer's parts with dims.part(family))")


def _watch_state_writes(model: Transformer) -> tuple[list[str], list]:
    """Hooks on every block that note each state tensor changed in place while the block ran."""
    found, handles = [], []
    for i, block in enumerate(model.transformer.h):
        before: dict = {}

        def pre(_m, _args, kwargs, before=before):
            state = kwargs.get("state") or {}
            before.clear()
            before.update({k: (v, v._version) for k, v in state.items() if isinstance(v, torch.Tensor)})

        def post(_m, _args, kwargs, _out, i=i, before=before):
            for key, (tensor, version) in before.items():
                if tensor._version != version:
                    found.append(f"layer {i} changed state[{key!r}] in place: earlier layers hold the same tensor, "
                                 f"and recomputing them (activation checkpointing) sees the change; store a new "
                                 f"tensor (state[{key!r}] = state[{key!r}] + y, not +=)")

        handles += [block.register_forward_pre_hook(pre, with_kwargs=True),
                    block.register_forward_hook(post, with_kwargs=True)]
    return found, handles


def check_state(subject: Subject, **_) -> None:
    """A component that asks for the per-forward state (a ``state`` keyword in forward) keeps its rules
    (toolkit.contracts, "State between layers"): it changes no state tensor in place, and activation
    checkpointing and torch.compile(fullgraph=True) give the plain forward's loss and gradients.
    (Cached decoding, where a step's state holds the current tokens only, is the kv_cache check.)"""
    model = subject.build().train()
    if not any(getattr(m, "_takes_state", False) for m in subject.modules(model)):
        return
    idx, targets = tokens(subject, seed=1), tokens(subject, seed=2)
    found, handles = _watch_state_writes(model)
    try:
        _, loss = model(idx, targets)
    finally:
        for h in handles:
            h.remove()
    if found:
        raise ConformanceError(found[0])
    loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model.activation_checkpointing = True
    _, again = model(idx, targets)
    again.backward()
    assert_same(again, loss, "the loss with activation checkpointing vs without")
    for n, p in model.named_parameters():
        if n in want:
            assert_same(p.grad, want[n], f"the gradient of {n} with activation checkpointing (layers recomputed in "
                        f"backward) vs without")
    model.activation_checkpointing = False
    import torch._dynamo

    torch._dynamo.reset()
    try:
        compiled = torch.compile(model.eval(), backend="eager", fullgraph=True)
        with torch.no_grad():
            got, _ = compiled(idx)
            plain, _ = model(idx)
    except Exception as exc:  # noqa: BLE001 - a graph break is an error under fullgraph
        raise ConformanceError(f"torch.compile(fullgraph=True) of a model using it: {_describe(exc)}") from None
    finally:
        torch._dynamo.reset()
    assert_same(got, plain, "torch.compile(fullgraph=True) vs eager outputs")


#: every check by name, in the order they run
CHECKS: dict[str, Callable] = {
    "described": check_described,
    "counts": check_counts,
    "shape_and_dtype": check_shape_and_dtype,
    "position_hooks": check_position_hooks,
    "causal": check_causal,
    "kv_cache": check_kv_cache,
    "gradients": check_gradients,
    "state_dict": check_state_dict,
    "deterministic": check_deterministic,
    "partners": check_partners,
    "post_norm": check_post_norm,
    "backends": check_backends,
    "flops": check_flops,
    "scale": check_scale,
    "engine": check_engine,
    "aux_losses": check_aux_losses,
    "per_layer": check_per_layer,
    "state": check_state,
    "compile": check_compile,
}


def _describe(exc: BaseException) -> str:
    """One line for an exception: a ConformanceError's message, or type, message and where it was raised."""
    if isinstance(exc, ConformanceError):
        return str(exc)
    text = (str(exc).strip().splitlines() or [""])[0]
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f"{os.sep}torch{os.sep}" not in f.filename]
    where = f" ({os.path.basename(frames[-1].filename)}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {text}{where}"


def skip_reason(subject: Subject, check: str) -> str | None:
    """Why the component opts out of ``check`` (its class's ``conformance_skip``), or None."""
    factory = subject.registry.get(subject.family, subject.name).factory
    skips = getattr(factory, "conformance_skip", {})
    if callable(skips):  # a function of the options: an attention with rope = false rotates nothing
        skips = skips(subject.options)
    return dict(skips or {}).get(check)


def run_check(subject: Subject, check: str, **kwargs) -> None:
    """Run one check; raise ConformanceError('<family> <name> <check>: ...') if it fails."""
    if skip_reason(subject, check):
        return
    try:
        with single_thread():
            CHECKS[check](subject, **kwargs)
    except Exception as exc:  # noqa: BLE001 - every failure becomes one readable line
        raise ConformanceError(f"{subject.label} fails {check}: {_describe(exc)}") from exc


def check_component(family: str, name: str, options=None, registry: Registry | None = None, *,
                    plugins: list[str] | tuple[str, ...] = (), model: dict | None = None,
                    checks: list[str] | tuple[str, ...] | None = None, compile: bool = False,
                    compile_backend: str = "inductor") -> list[str]:
    """Run the conformance checks on one registered component; return the names of those run.

    ``options``: a dict (structured like a recipe table) or an options instance, else the defaults.
    ``checks``: names from :data:`CHECKS` (default: all but ``compile``, which ``compile=True`` adds).
    Raises :class:`ConformanceError` listing every failed check.
    """
    if family in PART_CHECKS:  # an optimizer, schedule or evaluator: its own checks (end of this file)
        return check_part(family, name, options, registry, plugins=plugins, checks=checks)
    subject = make_subject(family, name, options, registry, plugins=plugins, model=model)
    names = list(checks) if checks is not None else [c for c in CHECKS if c != "compile" or compile]
    unknown = [c for c in names if c not in CHECKS]
    if unknown:
        raise ConformanceError(f"unknown checks {unknown} (known: {', '.join(CHECKS)})")
    try:
        subject.build()
    except Exception as exc:  # noqa: BLE001 - nothing else can run
        raise ConformanceError(f"{subject.label} does not build in a tiny model: {_describe(exc)}") from exc
    failures = []
    names = [c for c in names if not skip_reason(subject, c)]
    for check in names:
        kwargs = {"backend": compile_backend} if check == "compile" else {}
        try:
            with single_thread():
                CHECKS[check](subject, **kwargs)
        except Exception as exc:  # noqa: BLE001
            failures.append(f"  {check}: {_describe(exc)}")
    if failures:
        opts = f" ({subject.options})" if attrs.fields(type(subject.options)) else ""
        raise ConformanceError(f"{subject.label}{opts} failed {len(failures)} of {len(names)} "
                               f"conformance checks:\n" + "\n".join(failures))
    return names


# -- the parts outside the model: optimizers, schedules, evaluators ------------------------------
# check_component("optimizer" | "schedule" | "evaluator", name, ...) runs these instead of the model
# checks above: each part is built the way the trainer builds it, around the same tiny model.

#: the train settings of every optimizer and schedule check (decay over 100 steps after 10 of warmup)
KIT_TRAIN = dict(micro_batch=BATCH, max_steps=100, warmup_steps=10, lr=1e-3, min_lr=1e-4, weight_decay=0.1)


@attrs.frozen
class PartSubject:
    """An optimizer, schedule or evaluator under test: its spec, the registry, and the tiny model's recipe."""

    family: str
    name: str
    options: object
    registry: Registry

    @property
    def label(self) -> str:
        return f"{self.family} {self.name!r}"

    @property
    def spec(self):
        return SPEC_TYPES[self.family](self.name, self.options)

    def recipe(self, stage: int = 0, **train) -> Recipe:
        """The tiny model's recipe with this part chosen (an optimizer or schedule; evaluators are built apart)."""
        chosen = {self.family: self.spec} if self.family in ("optimizer", "schedule") else {}
        fields = {**TINY_MODEL, **DEFAULT_PARTNERS}
        return Recipe(model=ModelConfig(**fields), train=TrainConfig(**{**KIT_TRAIN, **chosen, **train}),
                      deepspeed=DeepSpeedConfig(zero_stage=stage), plugins=[])

    def model(self, seed: int = 0, vocab_size: int | None = None) -> Transformer:
        torch.manual_seed(seed)
        cfg = self.recipe().model
        return Transformer(attrs.evolve(cfg, vocab_size=vocab_size) if vocab_size else cfg, self.registry)


def make_part_subject(family: str, name: str, options=None, registry: Registry | None = None, *,
                      plugins: list[str] | tuple[str, ...] = ()) -> PartSubject:
    """make_subject for an optimizer, schedule or evaluator: the component and its structured options."""
    if registry is None:
        registry = load_registry(list(plugins))
    elif plugins:
        raise ConformanceError("pass either registry or plugins, not both (load the plugins into your registry first)")
    comp = registry.get(family, name)
    opts = _typed_options(family, name, comp, options, registry)
    return PartSubject(family, name, opts, registry)


def _nonzero(model: nn.Module) -> nn.Module:
    """``model`` with every weight moved off zero (biases start at zero, where decay shows nothing)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    return model


def _optimizer(subject: PartSubject, model: nn.Module, **train) -> torch.optim.Optimizer:
    return subject.registry.build(subject.spec, model, subject.recipe(**train))


def _step_with(model: nn.Module, optimizer: torch.optim.Optimizer, grads: dict[str, torch.Tensor] | None) -> None:
    """One optimizer step with the given gradient of every parameter (zeros where ``grads`` is None)."""
    for name, p in model.named_parameters():
        p.grad = torch.zeros_like(p) if grads is None else grads[name].clone()
    optimizer.step()


def _random_grads(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(p.shape, generator=g) for name, p in model.named_parameters()}


def _moved(before: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach() - before[name] for name, p in model.named_parameters()}


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def check_optimizer_hints(subject: PartSubject, **_) -> None:
    """hint(weight_decay=...) turns decay off and on, hint(lr_scale=s) scales the update by s.

    Decay is seen in a step with zero gradients, where an Adam-like update is zero and only decoupled
    decay moves a weight; the lr scale in a step with the same random gradients with and without the hint.
    """
    plain = _nonzero(subject.model())
    before = _weights(plain)
    _step_with(plain, _optimizer(subject, plain), None)
    decayed = {n for n, d in _moved(before, plain).items() if d.abs().max() > 0}
    names = [n for n, _ in plain.named_parameters()]
    hinted = _nonzero(subject.model())
    params = dict(hinted.named_parameters())
    # every parameter it decays by default, hinted off; every vector it leaves alone (gains, biases:
    # their rate is train.weight_decay, as for nanoGPT's matrices), hinted on
    off = [n for n in names if n in decayed]
    on = [n for n in names if n not in decayed and params[n].dim() == 1]
    for n in off:
        contracts.hint(params[n], weight_decay=False)
    for n in on:
        contracts.hint(params[n], weight_decay=True)
    before = _weights(hinted)
    _step_with(hinted, _optimizer(subject, hinted), None)
    moved = _moved(before, hinted)
    if still := [n for n in off if moved[n].abs().max() > 0]:
        raise ConformanceError(f"{still[0]} has hint(weight_decay=False), but a step with zero gradients still "
                               f"decayed it ({len(still)} such parameters)")
    if unmoved := [n for n in on if not moved[n].abs().max() > 0]:
        raise ConformanceError(f"{unmoved[0]} has hint(weight_decay=True), but a step with zero gradients left it "
                               f"unchanged ({len(unmoved)} such parameters)")
    # lr_scale: a matrix and a vector of the first block (the update is linear in the lr)
    scale = 0.25
    probes = [next(n for n in names if n.startswith("transformer.h.") and params[n].dim() == d) for d in (2, 1)]
    deltas = []
    for with_hint in (False, True):
        model = subject.model()
        if with_hint:
            ps = dict(model.named_parameters())
            for n in probes:
                contracts.hint(ps[n], lr_scale=scale)
        before = _weights(model)
        _step_with(model, _optimizer(subject, model, weight_decay=0.0), _random_grads(model, 1))
        deltas.append(_moved(before, model))
    for n in probes:
        want, got = scale * deltas[0][n], deltas[1][n]
        if not torch.allclose(got, want, atol=1e-7, rtol=1e-3):
            ratio = (got.norm() / deltas[0][n].norm().clamp_min(1e-30)).item()
            raise ConformanceError(f"{n} has hint(lr_scale={scale}), but its first update is {ratio:.3g} x the "
                                   f"unhinted one (expected {scale})")
    unhinted = [n for n in names if n not in probes]
    for n in unhinted:
        assert_same(deltas[1][n], deltas[0][n], f"the update of {n}, not hinted, when other parameters have an lr_scale")


def check_optimizer_state_dict(subject: PartSubject, **_) -> None:
    """Two steps, a save, a load into a fresh optimizer over a fresh copy: the third step is the same exactly."""
    model = subject.model()
    opt = _optimizer(subject, model)
    for seed in (1, 2):
        _step_with(model, opt, _random_grads(model, seed))
    saved_opt, saved_model = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
    fresh = subject.model(seed=5)
    fresh.load_state_dict(saved_model)
    fresh_opt = _optimizer(subject, fresh)
    fresh_opt.load_state_dict(saved_opt)
    grads = _random_grads(model, 3)
    _step_with(model, opt, grads)
    _step_with(fresh, fresh_opt, grads)
    for (name, p), q in zip(model.named_parameters(), fresh.parameters()):
        assert_same(q, p, f"{name} after a step resumed from the optimizer's state_dict vs an uninterrupted step",
                    exact=True)


def check_optimizer_engine(subject: PartSubject, **_) -> None:
    """Two steps through a one-rank CPU DeepSpeed engine at ZeRO 1 and 2 (flat fp32 partitions instead of
    the model's parameters), or at ZeRO 0 where the optimizer's check_recipe refuses those stages."""
    check = subject.registry.get("optimizer", subject.name).check_recipe
    stages = [s for s in (1, 2) if not (check and check(subject.options, subject.recipe(stage=s)))] or [0]
    probe = Subject("attention", DEFAULT_PARTNERS["attention"], None, subject.registry)
    idx, targets = tokens(probe, seed=1), tokens(probe, seed=2)
    for stage in stages:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            model = subject.model()
            before = _weights(model)
            engine = build_engine(model, subject.recipe(stage=stage), registry=subject.registry).engine
            for _ in range(2):
                loss = engine_step(engine, lambda: (idx, targets), 1)
        if not torch.isfinite(loss):
            raise ConformanceError(f"ZeRO {stage}: the loss after two engine steps is {loss.item()}")
        if all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters()):
            raise ConformanceError(f"ZeRO {stage}: two engine steps changed no parameter")


def check_schedule_values(subject: PartSubject, **_) -> None:
    """Every step's learning rate, through warmup, decay and past its end, is a finite float >= 0."""
    train = subject.recipe().train
    lr_of = subject.registry.build(subject.spec, train)
    for step in range(train.max_steps + 20):
        lr = lr_of(step)
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
            raise ConformanceError(f"step {step}: the learning rate is {lr!r}, expected a finite number >= 0")


def check_schedule_resume(subject: PartSubject, **_) -> None:
    """The lr at step s is the same from a schedule that ran steps 0..s-1 and from one built afresh (as a
    resumed run builds it, its LambdaLR state loaded), whatever order it is asked in."""
    train = subject.recipe().train
    ran = subject.registry.build(subject.spec, train)
    through = [ran(s) for s in range(train.max_steps + 5)]
    for s in (0, train.warmup_steps, train.max_steps // 2, train.max_steps, train.max_steps + 3):
        again = subject.registry.build(subject.spec, train)(s)
        if again != through[s]:
            raise ConformanceError(f"step {s}: {through[s]!r} after stepping through 0..{s - 1}, but {again!r} from a "
                                   "schedule built afresh (a resumed run): compute the lr from the step, keep no count")
    # through the trainer's LambdaLR: its state_dict round trip into a fresh one gives the same lr
    model = subject.model()
    opt = torch.optim.SGD(model.parameters(), lr=train.lr)
    sched = make_scheduler(opt, train, subject.registry)
    s = train.max_steps // 2
    for _ in range(s):
        opt.step()
        sched.step()
    state = copy.deepcopy(sched.state_dict())
    fresh_opt = torch.optim.SGD(subject.model().parameters(), lr=train.lr)
    fresh = make_scheduler(fresh_opt, train, subject.registry)
    fresh.load_state_dict(state)
    fresh_opt.param_groups[0]["lr"] = fresh.get_last_lr()[0]
    if not math.isclose(fresh_opt.param_groups[0]["lr"], opt.param_groups[0]["lr"], rel_tol=1e-12):
        raise ConformanceError(f"step {s}: lr {opt.param_groups[0]['lr']!r}, but {fresh_opt.param_groups[0]['lr']!r} "
                               "after the scheduler's state_dict was loaded into a fresh one")


# evaluators: a tiny prepared dataset (the start of tiny Shakespeare, char tokens) and two ranks simulated
_KIT_DATA: dict = {}


def kit_data(registry: Registry) -> tuple[Path, object]:
    """(prepared folder, its tokenizer): 20,000 characters of tiny Shakespeare, prepared once per process."""
    if "prepared" not in _KIT_DATA:
        folder = Path(tempfile.mkdtemp(prefix="playattention-kit-"))
        atexit.register(shutil.rmtree, folder, True)
        text = folder / "corpus.txt"
        text.write_text((ASSETS / "tinyshakespeare.txt").read_text()[:20_000])
        data = DataConfig(dataset="kit", paths=[str(text)], prepared_dir=str(folder / "prepared"))
        _KIT_DATA["prepared"] = prepare(data, registry=registry, progress=False)
    prepared = _KIT_DATA["prepared"]
    return prepared, load_tokenizer(prepared, registry)


@attrs.frozen
class RankReplay(EvalContext):
    """An EvalContext for one of two ranks run one after the other in this process: each reduction
    (sum, mean, max) records this rank's value and answers with the combined value from ``answers``,
    once the kit has both ranks' values for it (until then, its own)."""

    answers: tuple = ()
    values: list = attrs.field(factory=list)

    def _reduce(self, value, op: str) -> torch.Tensor:
        t = torch.as_tensor(value, dtype=torch.float64, device=self.device).clone()
        self.values.append((op, t))
        n = len(self.values) - 1
        return self.answers[n].clone() if n < len(self.answers) else t

    def sum(self, value):
        return self._reduce(value, "sum")

    def max(self, value):
        return self._reduce(value, "max")


#: the collectives an evaluator must not call itself: two simulated ranks have no process group
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_object", "broadcast", "broadcast_object_list", "reduce",
               "gather", "scatter", "barrier")


def _evaluate(subject: PartSubject, model: nn.Module, ctx: EvalContext) -> dict[str, float]:
    def refuse(*args, **kwargs):
        raise ConformanceError("it calls torch.distributed itself; combine ranks with ctx.sum, ctx.mean and "
                               "ctx.max, which every rank calls in the same order")

    with contextlib.ExitStack() as stack:
        if ctx.world_size > 1:
            for name in COLLECTIVES:
                stack.enter_context(unittest.mock.patch.object(torch.distributed, name, refuse))
        return {k: float(v) for k, v in subject.registry.build(subject.spec, ctx)(model).items()}


def check_evaluator_ranks(subject: PartSubject, **_) -> None:
    """Finite float metrics, and the same numbers on one rank and on two (ctx.shard, ctx.sum, ctx.mean, ctx.max).

    The two ranks run one after the other in this process: a reduction's answer is known once both
    ranks reached it, so they are run again until every reduction is answered (no processes, no gloo).
    """
    prepared, tok = kit_data(subject.registry)
    model = subject.model(vocab_size=tok.vocab_size).eval()
    recipe = subject.recipe()
    recipe = attrs.evolve(recipe, model=attrs.evolve(recipe.model, vocab_size=tok.vocab_size), eval=[subject.spec])
    ctx = dict(recipe=recipe, registry=subject.registry, tokenizer=tok, prepared=prepared, device=torch.device("cpu"))
    with torch.no_grad():
        one = _evaluate(subject, model, EvalContext(**ctx))
        bad = {k: v for k, v in one.items() if not math.isfinite(v)}
        if not one or bad:
            raise ConformanceError(f"one rank: expected a dict of finite metrics, got {bad or one}")
        answers: list[torch.Tensor] = []
        for _ in range(64):
            ranks = [RankReplay(**ctx, rank=r, world_size=2, answers=tuple(answers)) for r in (0, 1)]
            outs = [_evaluate(subject, model, c) for c in ranks]
            calls = [[op for op, _ in c.values] for c in ranks]
            if calls[0] != calls[1]:
                raise ConformanceError(f"the two ranks reduce differently ({calls[0]} vs {calls[1]}): a real run waits "
                                       "for ever; every rank must call ctx.sum/mean/max the same times in the same order")
            if len(answers) == len(calls[0]):
                break
            (op, a), (_, b) = ranks[0].values[len(answers)], ranks[1].values[len(answers)]
            if a.shape != b.shape:
                raise ConformanceError(f"reduction {len(answers) + 1}: the ranks give shapes {tuple(a.shape)} and "
                                       f"{tuple(b.shape)}")
            answers.append(a + b if op == "sum" else torch.maximum(a, b))
        else:
            raise ConformanceError("more than 64 reductions: not a fixed sequence")
    if outs[0] != outs[1]:
        raise ConformanceError(f"the two ranks return different metrics: {outs[0]} vs {outs[1]}")
    for k in one:
        if k not in outs[0] or not math.isclose(outs[0][k], one[k], rel_tol=1e-5, abs_tol=1e-6):
            raise ConformanceError(f"{k}: {one[k]:.6g} on one rank, {outs[0].get(k)!r} on two (each rank's share "
                                   "combined with ctx.sum/ctx.mean/ctx.max)")


#: the checks of each family outside the model, by name, in the order they run
PART_CHECKS: dict[str, dict[str, Callable]] = {
    "optimizer": {"described": check_described, "hints": check_optimizer_hints,
                  "state_dict": check_optimizer_state_dict, "engine": check_optimizer_engine},
    "schedule": {"described": check_described, "values": check_schedule_values, "resume": check_schedule_resume},
    "evaluator": {"described": check_described, "ranks": check_evaluator_ranks},
}


def check_part(family: str, name: str, options=None, registry: Registry | None = None, *,
               plugins: list[str] | tuple[str, ...] = (), checks: list[str] | tuple[str, ...] | None = None) -> list[str]:
    """check_component for an optimizer, schedule or evaluator (:data:`PART_CHECKS`); the names of the checks run."""
    subject = make_part_subject(family, name, options, registry, plugins=plugins)
    known = PART_CHECKS[family]
    names = list(checks) if checks is not None else list(known)
    unknown = [c for c in names if c not in known]
    if unknown:
        raise ConformanceError(f"unknown {family} checks {unknown} (known: {', '.join(known)})")
    names = [c for c in names if not skip_reason(subject, c)]
    failures = []
    for check in names:
        try:
            with single_thread():
                known[check](subject)
        except Exception as exc:  # noqa: BLE001
            failures.append(f"  {check}: {_describe(exc)}")
    if failures:
        raise ConformanceError(f"{subject.label} failed {len(failures)} of {len(names)} conformance checks:\n"
                               + "\n".join(failures))
    return names
