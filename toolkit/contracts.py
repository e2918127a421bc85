"""What each component family must do. Plugin authors: start here.

Every factory is called with its structured options and a :class:`Dims` describing the model::

    attention: factory(opts, dims)        -> module; forward(x, position, pos, cache=None) -> y
    norm:      factory(opts, dims, dim)   -> module; forward(x) -> x, normalising the last dim of size `dim`
    position:  factory(opts, dims)        -> a Position (below)
    mlp:       factory(opts, dims)        -> module; forward(x) -> y
    block:     factory(opts, dims)        -> module; forward(x, position, pos, cache=None, state=None) -> x, one
               residual layer that builds its attention, norms and MLP with ``dims.part(family, ...)``

**Per layer.** Attention, norm, MLP, block and position may differ from layer to layer
(``[model.layers.<name>]`` in a recipe; a layer's own position acts through rotate and score_bias only,
the model hands it to that layer's block as ``position``: embed happens once, for the model). Their factories get ``dims.layer``, the index of the layer they are built for (0 ..
n_layer - 1; None for the final norm), so per-layer schedules are data (litgpt's ``block_idx``); a
norm also gets ``dims.role``: "attention", "mlp", "final" or "qk", where it sits.

Shapes: ``x`` and ``y`` are (B, T, C) hidden states, C = dims.n_embd; ``pos`` is a (T,) LongTensor
of absolute positions of the T tokens in ``x`` (0..T-1 in training, offsets when decoding with a
cache).

**Positions act in three places**, and attention never asks which kind it has: it calls all three
hooks of the :class:`Position` it is given, and the ones a position kind does not use are identities.

1. ``embed(tok_emb, pos)`` adds to the token embeddings (learned, sinusoidal), called once by the model;
2. ``rotate(q, k, pos)`` rotates queries and keys per head (RoPE), called by attention before caching k,
   over the dimensions it is handed: all of each head, or only a rotary part (decoupled RoPE in MLA);
3. ``score_bias(q_pos, k_pos, n_head)`` returns an additive (n_head, Tq, Tk) bias for the attention
   scores (ALiBi), or None, for the number of heads the attention asks for (attend asks for as many
   as its queries have). A position with such a bias may also give it in closed form, ``score_mod``,
   a FlexAttention score_mod ``(score, b, h, q_idx, kv_idx) -> score``, so that a fused kernel never
   builds the dense tensor; without one, attention falls back to ``score_bias``.

:func:`attend` does the causal attention arithmetic (masking, bias, cache-aware positions, fused
SDPA and FlexAttention paths and an explicit math path) so an attention plugin mostly projects q, k, v
and calls it.

**KV cache.** ``cache`` is a per-layer dict owned by the attention module (the model creates one
empty dict per block and passes it on every decoding call); store whatever you need in it,
e.g. ``cache["k"], cache["v"], cache["pos"]``. :func:`update_cache` does the usual append.

**Counting.** Every component may define ``flops_per_token(seq_len) -> int``, its *forward* FLOPs
per token; :func:`flops_per_token` supplies the default (2 FLOPs per weight of each ``nn.Linear``),
which is exact for matmul-only modules. Attention adds its score and value products itself.

**Validation.** Options classes validate single values (attrs validators). A factory that needs
the model's shape to decide (``n_kv_head`` must divide ``n_head``) raises
:class:`toolkit.errors.ConfigError` from ``__init__``: recipe validation builds every component
once on the ``meta`` device and reports that message at ``$.model.<family>`` with the others.

**Initialisation.** The model applies GPT-2's init to every ``nn.Linear`` and ``nn.Embedding``
(normal, std 0.02, zero bias) and scales linear layers named ``c_proj`` (the projections back into
the residual stream) by 1/sqrt(2 * n_layer), as GPT-2 does. Other parameters keep the init their
module gives them (norms: ones and zeros). A component that wants its own init defines
``reset_parameters()``: the model calls it on every component after the default init.

**Optimisation hints.** ``hint(param, weight_decay=False)`` exempts a parameter from weight decay
(identity-initialised mixing matrices, gains), ``hint(param, lr_scale=0.1)`` scales its learning
rate; the built-in optimizers honour both. Without a hint, parameters of two or more dimensions
decay and the rest do not (nanoGPT).

**Parametrization.** ``[model.parametrization]`` chooses how init, learning rates and two
multipliers depend on the model's width (:class:`Parametrization`; built-ins in
``plugins/parametrization.py``): "standard" changes nothing, "mup" is the maximal update
parametrization (Yang et al. 2021, "Tensor Programs V", Table 3 for Adam) relative to a base width.
The model does the generic part for every component, plugins included: after all init, it compares
each parameter's shape with the same model's at the base width, and a parameter with two or more
dims that grow (a hidden matrix) gets its init scaled by 1/sqrt(fan-in multiplier) and
``hint(lr_scale=1/multiplier)`` (times any lr_scale it had); embeddings, biases and gains (one dim
that grows) keep theirs, and the logits are multiplied by base_width / n_embd. What a component does
itself: an attention passes ``scale=dims.attention_scale(head_dim, own_scale)`` to :func:`attend`
(None under "standard", so the fused kernel's 1/sqrt(d) as ever; 1/d up to the base's constant under
"mup"). Rescaling multiplies whatever init a component gave, so a zero init stays zero, and a matrix
over heads or experts (no dim grows with width) is left alone. The built-in attentions (mha, gqa,
mqa, sliding_window, gated, mla, diff) pass the scale; MLPs, MoE, norms and blocks need nothing.

**Auxiliary losses.** A component that adds to the training objective (a mixture of experts'
load-balancing loss) sets ``self.aux_losses = {name: scalar tensor}`` in every forward, already
weighted (empty when there is nothing to add); declaring ``aux_losses: dict = {}`` in the class is
optional (the model gives every component an empty dict before each forward).
The model sums each name over layers and returns the terms; the training step adds them to the
cross-entropy before backward, so gradient accumulation, loss scaling and ZeRO apply, and
metrics.jsonl logs each as ``aux/<name>``. The logged ``loss`` stays the cross-entropy.

**Looking inside.** Inside :func:`observing_attention` (the model's ``observe_attention()``),
:func:`attend` takes its explicit math path and records each call's probabilities
softmax(QK^T * scale + mask + bias), (B, nh, Tq, Tk), for the layer running; outside, it runs as
ever (one test of a module global, nothing else). An attention that computes its probabilities
itself, without attend, offers them by calling :func:`record_attention` when :func:`observing` is
true. An attention whose output is not one softmax map times V (differential attention: two maps)
defines ``attention_map(maps) -> (B, h, Tq, Tk)``, combining what it recorded in one forward, in call
order, into the map it really applies to its values. While observing, a head may also be masked
(its attend output zeroed), which is how head importance is measured.

**State between layers.** Some designs pass something from layer to layer beyond the residual
stream: value residual (ResFormer, Zhou et al. 2024: every layer mixes its values with the first
layer's), modded-nanogpt's x0 shortcut, value embeddings, U-net skips, hyper-connections. For these
the model creates a small per-forward ``state``, a plain dict, for every forward and every decoding
step. A block, attention or MLP asks for it by declaring a ``state`` keyword in its forward
(``forward(x, position, pos, cache=None, state=None)``, MLP ``forward(x, state=None)``); the model
finds that once when it is built (:func:`takes_state`), and hands the dict to every block that asks;
a block hands it to its parts with ``**state_for(self.attn, state)`` (the built-in blocks do). The
model puts ``state["idx"]`` (B, T) token ids and ``state["x0"]`` (B, T, C), the first block's input,
in it; components add entries by name (``state["v1"] = v``) and read what earlier layers added.
The rules that keep it right under activation checkpointing, ``torch.compile(fullgraph=True)`` and
the KV cache:

- each layer gets its own shallow copy of the state, holding what the layers before it wrote, and
  its writes reach only later layers; so a recomputed layer (activation checkpointing) sees the same
  contents as in its first forward, and "write it if nobody has yet" means "the first such layer";
- write new tensors, never change one in the state in place (``state["s"] = state["s"] + y``,
  not ``+=``): earlier layers hold the same tensor, and their recompute would see the change;
- while decoding, the state is the step's: it holds the current tokens only (values before
  ``update_cache``), never the cached past; keep what later steps need in your layer's ``cache``;
- keep no reference to the state or its tensors between forwards (on ``self``): each forward's is new.

The conformance kit's ``state`` check runs on components that declare it (:func:`check_state` in
:mod:`toolkit.testing.conformance`).

**Training progress.** A component whose option follows a schedule (a sliding window that grows
during training) may define ``set_progress(step, max_steps)``: the trainer calls it on every module
that has it before each optimizer step (:func:`set_progress`). Derive everything from ``step``, so a
resumed run continues where it stopped, and store nothing in the state dict; in eval mode (evaluation,
``generate``) and in a model that never trained use the option's final value.

**Metrics.** A component may define ``metrics() -> {name: float or 0-dim tensor}`` (an expert's
load, a learned lambda, ...): the trainer asks for them every ``log_interval`` steps, so keep what
they need from the last forward (detached) rather than computing in every step.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import math
from typing import Callable

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .families import BACKENDS  # the values of an attention's backend option (see attend)


@attrs.frozen
class Dims:
    """The model's shape, handed to every component factory."""

    n_embd: int
    n_head: int
    n_layer: int
    block_size: int
    vocab_size: int
    dropout: float = 0.0
    bias: bool = True
    # build(family, spec_or_kind, dims, *args) builds another registered component (e.g. a qk-norm)
    build: object = attrs.field(default=None, eq=False, repr=False)
    head_size: int | None = None  # the width of one attention head when it is not n_embd / n_head (Gemma)
    layer: int | None = None  # the layer a per-layer component is built for; None for the final norm
    role: str | None = None  # where a norm sits: "attention", "mlp", "final", "qk"
    # this layer's choice (a Spec) in each per-layer family, and how the model records what it built
    parts: dict = attrs.field(factory=dict, eq=False, repr=False)
    record: object = attrs.field(default=None, eq=False, repr=False)
    parametrization: object = attrs.field(default=None, eq=False, repr=False)  # the model's; None: standard

    def attention_scale(self, head_dim: int | None = None, scale: float | None = None) -> float | None:
        """The factor on q.k an attention hands to attend: its own ``scale`` (None: 1/sqrt(head_dim)) as the
        model's parametrization adjusts it; None means attend's default, 1/sqrt(head_dim)."""
        if self.parametrization is None:
            return scale
        return self.parametrization.attention_scale(head_dim or self.head_dim, scale)

    def part(self, family: str, *args, role: str | None = None):
        """Build this layer's ``family`` component (a block builds its attention, norms and MLP so)."""
        dims = attrs.evolve(self, role=role) if role is not None else self
        module = self.build(family, self.parts[family], dims, *args)
        if self.record is not None:
            self.record(family, self.parts[family].kind, module, self.layer)
        return module

    @property
    def head_dim(self) -> int:
        return self.head_size or self.n_embd // self.n_head


class Position(nn.Module):
    """Base class for positional components. Override the hooks your scheme uses."""

    #: the longest sequence this scheme can encode, or None for no limit
    max_len: int | None = None
    #: whether this class's score_bias (and score_mod) take ``n_head``: positions written before the
    #: head count was asked do not. Found once per class, when it is defined, so that compiled code
    #: reads a constant instead of tracing inspect.signature.
    score_takes_n_head: bool = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.score_takes_n_head = "n_head" in inspect.signature(cls.score_bias).parameters

    def embed(self, tok_emb: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """(B, T, C) token embeddings -> (B, T, C); default: unchanged."""
        return tok_emb

    def rotate(self, q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q (B, nh, T, hs), k (B, nkv, T, hs) at positions pos (T,) -> rotated q, k; default: unchanged."""
        return q, k

    def score_bias(self, q_pos: torch.Tensor, k_pos: torch.Tensor, n_head: int | None = None) -> torch.Tensor | None:
        """Additive attention-score bias (n_head, Tq, Tk) for the given positions, or None; ``n_head`` is
        the head count the attention asks for (None: the model's)."""
        return None

    def score_mod(self, q_pos: torch.Tensor, k_pos: torch.Tensor, n_head: int | None = None) -> Callable | None:
        """score_bias as a FlexAttention score_mod, or None (then attend uses the dense score_bias).

        The function maps (score, b, h, q_idx, kv_idx) -> score + bias, where q_idx and kv_idx index
        q_pos (Tq,) and k_pos (Tk,); it must add exactly what score_bias returns.
        """
        return None

    def flops_per_token(self, seq_len: int) -> int:
        return 0


class Parametrization:
    """How init, learning rates and the attention and output multipliers depend on width.

    This base is the standard parametrization (GPT-2's init, one learning rate, 1/sqrt(d) attention):
    every hook leaves the model as it is.
    """

    def attention_scale(self, head_dim: int, scale: float | None = None) -> float | None:
        """The factor on q.k for heads ``head_dim`` wide, given the attention's own (None: 1/sqrt(head_dim))."""
        return scale

    def output_multiplier(self) -> float | None:
        """What the logits are multiplied by; None: nothing."""
        return None

    def apply(self, model: nn.Module, base_shapes: Callable[[int], dict[str, tuple[int, ...]]]) -> None:
        """After every init: rescale ``model``'s parameters and hint their learning rates. ``base_shapes(width)``
        builds the same model at n_embd = width (on meta) and returns its parameters' shapes by name."""


def takes_state(module: nn.Module) -> bool:
    """Whether ``module``'s forward declares a ``state`` parameter (it asks for the per-forward state)."""
    forward = getattr(type(module), "forward", None)
    try:
        return forward is not None and "state" in inspect.signature(forward).parameters
    except (TypeError, ValueError):  # a builtin without a signature
        return False


def new_state(idx: torch.Tensor, x0: torch.Tensor) -> dict:
    """A forward's state as the model creates it: the token ids (B, T) and the first block's input (B, T, C)."""
    return {"idx": idx, "x0": x0}


def state_for(module: nn.Module, state: dict | None) -> dict:
    """``{"state": state}`` if ``module`` asks for the state, else ``{}``: call a part as
    ``self.attn(h, position, pos, cache, **state_for(self.attn, state))``. The model marks every
    component once when it is built, so compiled code reads a constant here, never a signature."""
    asks = getattr(module, "_takes_state", None)
    if asks is None:  # a module not built by a Transformer
        asks = takes_state(module)
    return {"state": state} if asks and state is not None else {}


def set_progress(model: nn.Module, step: int, max_steps: int) -> None:
    """Tell every module of ``model`` that defines ``set_progress`` that ``step`` of ``max_steps`` is next."""
    for module in model.modules():
        hook = getattr(module, "set_progress", None)
        if callable(hook) and module is not model:
            hook(step, max_steps)


def acts_per_layer(position: Position) -> bool:
    """Whether a position can be chosen per layer: it must not add to the embeddings (``embed`` runs
    once, before the first layer); rotate and score_bias act inside each layer's attention."""
    return type(position).embed is Position.embed


def hint(param: nn.Parameter, *, weight_decay: bool | None = None, lr_scale: float | None = None) -> nn.Parameter:
    """Tell the optimizer how to treat ``param``: ``weight_decay`` on or off, its ``lr_scale``."""
    hints = dict(getattr(param, "optim_hints", {}))
    if weight_decay is not None:
        hints["weight_decay"] = weight_decay
    if lr_scale is not None:
        hints["lr_scale"] = float(lr_scale)
    param.optim_hints = hints
    return param


def decay_groups(params: list[nn.Parameter], weight_decay: float, lr: float | None = None) -> list[dict]:
    """nanoGPT's AdamW groups: decay matrices and embeddings (dim >= 2), not biases or norm gains,
    unless a component's :func:`hint` says otherwise; a hinted lr_scale gets a
    group of its own at lr * lr_scale."""
    groups: dict[tuple[bool, float], list] = {(True, 1.0): [], (False, 1.0): []}
    for p in params:
        hints = getattr(p, "optim_hints", {})
        key = (hints.get("weight_decay", p.dim() >= 2), hints.get("lr_scale", 1.0))
        groups.setdefault(key, []).append(p)
    out = []
    for (decay, scale), members in groups.items():
        group = {"params": members, "weight_decay": weight_decay if decay else 0.0}
        if scale != 1.0:
            if lr is None:
                raise ValueError("a parameter has an lr_scale hint: give decay_groups the base lr")
            group["lr"] = lr * scale
        out.append(group)
    return out


def param_groups(model: nn.Module, weight_decay: float, lr: float | None = None) -> list[dict]:
    """:func:`decay_groups` of every trainable parameter of ``model`` (tied weights once)."""
    return decay_groups([p for p in model.parameters() if p.requires_grad], weight_decay, lr)


def flops_per_token(module: nn.Module, seq_len: int) -> int:
    """Forward FLOPs per token of a module: its own ``flops_per_token`` if it has one, else 2 per Linear weight."""
    own = getattr(type(module), "flops_per_token", None)
    if own is not None:
        return int(module.flops_per_token(seq_len))
    return sum(2 * m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def update_cache(cache: dict | None, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor):
    """Append this step's k, v (B, nkv, T, hs) and positions (T,) to ``cache``; return all keys, values, positions."""
    if cache is None:
        return k, v, pos
    if "k" in cache:
        k = torch.cat([cache["k"], k], dim=2)  # (B, nkv, T_past + T, hs)
        v = torch.cat([cache["v"], v], dim=2)
        pos = torch.cat([cache["pos"], pos])
    cache["k"], cache["v"], cache["pos"] = k, v, pos
    return k, v, pos


# -- looking inside ---------------------------------------------------------------------------
class AttentionObserver:
    """What attend() does while observing: records probabilities per layer, zeroes masked heads' outputs."""

    def __init__(self, record: bool = True, masked: set[tuple[int, int]] | None = None):
        self.record_maps, self.masked = record, set(masked or ())
        self.layer: int | None = None  # the layer running now (the model's block hooks set it)
        self.maps: dict[int | None, list[torch.Tensor]] = {}  # layer -> its last forward's maps, in call order
        self.attended: set[int | None] = set()  # layers whose heads went through attend (so can be masked)

    def enter_layer(self, layer: int | None) -> None:
        self.layer = layer
        self.maps[layer] = []  # a new forward through this layer replaces the last one's maps

    def record(self, probs: torch.Tensor) -> None:
        if self.record_maps:
            self.maps.setdefault(self.layer, []).append(probs.detach())

    def mask_heads(self, y: torch.Tensor) -> torch.Tensor:
        """y (B, nh, Tq, hv) with the masked heads of the running layer zeroed."""
        self.attended.add(self.layer)
        heads = [h for layer, h in self.masked if layer == self.layer and h < y.size(1)]
        if not heads:
            return y
        keep = torch.ones(y.size(1), dtype=y.dtype, device=y.device)
        keep[heads] = 0
        return y * keep[:, None, None]


#: the observer while observing_attention() is active; None (the training path) otherwise
_observer: AttentionObserver | None = None


@contextlib.contextmanager
def observing_attention(observer: AttentionObserver | None = None):
    """While inside, attend() runs its math path through ``observer`` (a new one by default)."""
    global _observer
    previous, _observer = _observer, observer or AttentionObserver()
    try:
        yield _observer
    finally:
        _observer = previous


def observing() -> bool:
    """Whether attention probabilities are being recorded: an attention not using attend() then calls record_attention."""
    return _observer is not None and _observer.record_maps


def record_attention(probs: torch.Tensor) -> None:
    """Offer this layer's attention probabilities (B, nh, Tq, Tk), for an attention that does not use attend()."""
    if _observer is not None:
        _observer.record(probs)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    position: Position | None = None,
    *,
    dropout: float = 0.0,
    window: int | None = None,
    softcap: float | None = None,
    scale: float | None = None,
    backend: str = "sdpa",
) -> torch.Tensor:
    """Causal attention of q (B, nh, Tq, hs) over k, v (B, nkv, Tk, hv) -> (B, nh, Tq, hv).

    A query at position p sees keys at positions in (p - window, p]. ``nkv`` may divide ``nh``
    (grouped-query attention, Ainslie et al. 2023): each group of nh/nkv query heads shares one
    key/value head. The position's score bias is asked for these ``nh`` heads. ``softcap`` caps the
    scaled logits smoothly at +-softcap, ``softcap * tanh(s / softcap)`` (Gemma 2; Bello et al.
    2016), which no SDPA kernel can do: FlexAttention folds it into its score_mod where flex is
    chosen and runs, else the math path spells it out. ``scale`` multiplies q.k instead of
    1/sqrt(hs) (Gemma 2 27B: query_pre_attn_scalar**-0.5 with hs 128 and a scalar of 144).
    Backends, all with the same outputs up to float rounding:

    ``"sdpa"``  the fused kernel that fits: ``F.scaled_dot_product_attention`` with ``is_causal``
                (flash-eligible) for plain causal attention; FlexAttention where SDPA would need an
                explicit mask or bias and :func:`prefer_flex` says flex is faster here; else SDPA
                with an explicit (Tq, Tk) mask.
    ``"flex"``  FlexAttention (Dong et al. 2024) always, where it can run (:func:`flex_runs`: no
                dropout, no backward on CPU), else as "sdpa".
    ``"math"``  softmax(QK^T / sqrt(d) + bias + mask) V spelled out (Vaswani et al. 2017, eq. 1),
                for reading and checking.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r} (expected one of {', '.join(BACKENDS)})")
    if _observer is not None:  # looking inside: only the math path has the probabilities to show
        backend = "math"
    n_head, n_kv = q.size(1), k.size(1)
    heads = {"n_head": n_head} if position is not None and position.score_takes_n_head else {}
    # k_pos is q_pos exactly when nothing is cached (update_cache hands the same tensor back): a
    # fresh sequence, so the mask depends on indices only (as is_causal assumes)
    fresh = k_pos is q_pos
    bias, biased = None, False
    flex_chosen = backend == "flex" or (backend == "sdpa" and prefer_flex(q, fresh))
    if flex_chosen and flex_runs(q, k, v, dropout, fresh=fresh):
        mod = position.score_mod(q_pos, k_pos, **heads) if position is not None else None
        if mod is None and position is not None:
            bias, biased = _score_bias(position, q_pos, k_pos, n_head), True
        # by choice, flex with whatever is asked; automatically only where SDPA cannot fuse and a
        # bias (if any) comes in closed form: a dense bias is paid for already, SDPA takes it as well
        if backend == "flex" or softcap is not None or (bias is None and (mod is not None or window is not None)):
            if bias is not None:
                mod = dense_score_mod(bias)
            return flex_attend(q, k, v, q_pos, k_pos, capped_score_mod(mod, softcap), window=window, fresh=fresh,
                               scale=scale)
    if not biased and position is not None:
        bias = _score_bias(position, q_pos, k_pos, n_head)
    # Plain causal self-attention over a fresh sequence: let SDPA build the mask (flash-eligible).
    if backend != "math" and softcap is None and bias is None and window is None and fresh:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scale,
                                              enable_gqa=n_kv != n_head)
    visible = k_pos[None, :] <= q_pos[:, None]  # (Tq, Tk) causal
    if window is not None:
        visible = visible & (k_pos[None, :] > q_pos[:, None] - window)
    mask = torch.zeros(visible.shape, dtype=q.dtype, device=q.device).masked_fill(~visible, float("-inf"))
    if bias is not None:
        mask = mask + bias.to(q.dtype)  # (nh, Tq, Tk)
    if backend != "math" and softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale,
                                              enable_gqa=n_kv != n_head)
    if n_kv != n_head:
        k = k.repeat_interleave(n_head // n_kv, dim=1)  # (B, nh, Tk, hs)
        v = v.repeat_interleave(n_head // n_kv, dim=1)
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)) if scale is None else scale)  # (B, nh, Tq, Tk)
    if softcap is not None:
        att = softcap * torch.tanh(att / softcap)
    att = torch.softmax(att + mask, dim=-1)
    if _observer is not None:
        _observer.record(att)  # the probabilities, before any dropout
    att = F.dropout(att, p=dropout, training=dropout > 0)
    if _observer is not None:
        return _observer.mask_heads(att @ v)
    return att @ v  # (B, nh, Tq, hv)


def _score_bias(position: Position, q_pos: torch.Tensor, k_pos: torch.Tensor, n_head: int) -> torch.Tensor | None:
    """``position.score_bias`` for ``n_head`` heads; a position written before the head count was asked
    (no ``n_head``) gives the model's heads, which would broadcast silently against fewer (differential
    attention asks for n_head / 2), so a mismatch is refused in one line."""
    if position.score_takes_n_head:
        return position.score_bias(q_pos, k_pos, n_head=n_head)
    bias = position.score_bias(q_pos, k_pos)
    if bias is not None and bias.size(0) not in (1, n_head):
        raise ConfigError(f"position {type(position).__name__!r}: score_bias gave a bias for {bias.size(0)} heads where "
                          f"the attention asks for {n_head}; give score_bias an n_head argument and return that many "
                          f"heads (toolkit.contracts.Position)")
    return bias


def capped_score_mod(mod: Callable | None, softcap: float | None) -> Callable | None:
    """``mod`` after capping the score at +-softcap (Gemma 2's attention logit soft-capping), for FlexAttention."""
    if softcap is None:
        return mod

    def capped(score, b, h, q_idx, kv_idx):
        score = softcap * torch.tanh(score / softcap)
        return score if mod is None else mod(score, b, h, q_idx, kv_idx)

    return capped


# -- FlexAttention ------------------------------------------------------------------------------
# FlexAttention (torch.nn.attention.flex_attention; Dong et al. 2024, "Flex Attention: A Programming
# Model for Generating Optimized Attention Kernels") compiles a mask (mask_mod, made block-sparse by
# create_block_mask, so fully masked blocks are skipped) and a score modification (score_mod) into one
# fused kernel: a sliding window or ALiBi costs no (Tq, Tk) tensor in memory.

#: whether FlexAttention may run at all (the conformance kit turns it off to count FLOPs, which
#: FlopCounterMode cannot see inside flex's higher-order op)
FLEX_ENABLED = True

#: compile flex_attention when the model itself runs eagerly (uncompiled, flex materialises the full
#: score matrix through a reference implementation); tests that only check the arithmetic turn it off
FLEX_COMPILE = True


def flex_runs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float, *, fresh: bool = True) -> bool:
    """Whether FlexAttention can run this call: it has no dropout, and (torch 2.13) no backward on CPU
    or MPS, and inside a compiled model on CPU no step over a KV cache (inductor fails to lower flex
    with the cache's positions in its score_mod: a C++ compile error, or a LoweringException with ALiBi)."""
    if dropout > 0 or q.device.type == "meta" or not FLEX_ENABLED:  # meta (inspect): flex cannot trace shapes only
        return False
    if not fresh and q.device.type == "cpu" and torch.compiler.is_compiling():
        return False
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    return not (needs_grad and q.device.type in ("cpu", "mps"))


def prefer_flex(q: torch.Tensor, fresh: bool) -> bool:
    """For backend "sdpa": run FlexAttention where SDPA would need an explicit mask or bias?

    On CUDA, for fresh sequences (training, prefill): flex skips masked blocks and never builds the
    (Tq, Tk) mask or bias, where SDPA's flash kernel cannot take a mask at all. Decoding steps (a few
    queries over a cache) keep SDPA: their mask is tiny, and a block mask per layer per token costs
    more than it saves. On CPU, never: measured in bench/RESULTS.md ("FlexAttention on CPU").
    """
    return fresh and q.device.type == "cuda"


def dense_score_mod(bias: torch.Tensor) -> Callable:
    """A score_mod adding a dense (nh or 1, Tq, Tk) bias, for positions without a closed-form score_mod."""
    if bias.size(0) == 1:
        shared = bias[0]  # (Tq, Tk), the same for every head

        def add_shared(score, b, h, q_idx, kv_idx):
            return score + shared[q_idx, kv_idx].to(score.dtype)

        return add_shared

    def add_per_head(score, b, h, q_idx, kv_idx):
        return score + bias[h, q_idx, kv_idx].to(score.dtype)

    return add_per_head


def _window_mask_mod(window: int | None) -> Callable:
    """Causal (and banded) mask over indices: query i sees keys j with i - window < j <= i."""

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    def banded(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < window)

    return causal if window is None else banded


@functools.lru_cache(maxsize=32)
def _cached_block_mask(T: int, window: int | None, device: torch.device):
    """The block mask of a fresh sequence of T tokens: the same for every layer and step, so built once."""
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(_window_mask_mod(window), None, None, T, T, device=device)


@functools.lru_cache(maxsize=1)
def _compiled_flex() -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    # Static shapes: training's never change. With dynamic ones, inductor's CPU flex kernel fails to
    # build (torch 2.13: "cur_kvSplitSize5 was not declared"). So decoding with backend "flex" compiles
    # once per cache length, up to Dynamo's recompile limit, then runs flex's reference implementation.
    return torch.compile(flex_attention, dynamic=False)


def _masked_score_mod(score_mod: Callable | None, q_pos: torch.Tensor, k_pos: torch.Tensor,
                      window: int | None) -> Callable:
    """score_mod, then -inf where a key is not visible: after the query, or ``window`` or more before it."""

    def masked(score, b, h, q_idx, kv_idx):
        qp, kp = q_pos[q_idx], k_pos[kv_idx]
        seen = kp <= qp
        if window is not None:
            seen = seen & (kp > qp - window)
        if score_mod is not None:
            score = score_mod(score, b, h, q_idx, kv_idx)
        return torch.where(seen, score, -float("inf"))

    return masked


def flex_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                score_mod: Callable | None = None, *, window: int | None = None, fresh: bool = False,
                scale: float | None = None) -> torch.Tensor:
    """Causal (banded if ``window``) FlexAttention of q (B, nh, Tq, hs) over k, v (B, nkv, Tk, hs), no dropout."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    Tq, Tk = q.size(2), k.size(2)
    compiling = torch.compiler.is_compiling()
    if fresh:  # indices are positions up to an offset
        if compiling:  # traced into the graph; the cache would be a Python side effect
            block_mask = create_block_mask(_window_mask_mod(window), None, None, Tq, Tk, device=q.device)
        else:
            block_mask = _cached_block_mask(Tq, window, q.device)
    else:  # queries at an offset over cached keys (a rolling window's cache is not even contiguous)
        # Decoding: a few queries over the cache have few blocks to skip, so the mask goes into the
        # score_mod and no block mask is built (eagerly, building one per layer per token costs more
        # than the attention; compiled, inductor's CPU code for it fails to build in torch 2.13).
        score_mod, block_mask = _masked_score_mod(score_mod, q_pos, k_pos, window), None
    # on a CPU, flex's reference implementation: inductor's standalone CPU flex kernel gave NaN and
    # wrong values on an AVX2-only CPU (torch 2.13, every mask and bias; tests/test_flex.py), and
    # backend "sdpa" never picks flex on a CPU anyway (prefer_flex)
    flex = flex_attention if compiling or not FLEX_COMPILE or q.device.type == "cpu" else _compiled_flex()
    return flex(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=q.size(1) != k.size(1))
