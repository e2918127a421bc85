"""Built-in learning-rate schedules. Contract: factory(opts, train) -> callable: step (0-based) -> lr.

All of them warm up linearly over ``train.warmup_steps`` to ``train.lr`` and then follow their shape
down to ``train.min_lr`` at ``train.decay_steps`` (default ``train.max_steps``):

    cosine    half a cosine                   (Loshchilov & Hutter 2017; nanoGPT, GPT-3)
    linear    a straight line
    constant  stays at lr (min_lr unused)
    wsd       warmup-stable-decay: lr until the last `decay_fraction`, then a short cooldown
              (Hu et al. 2024, MiniCPM; Hägele et al. 2024, whose 1-sqrt cooldown is the default)

The ratio of a schedule to ``train.lr`` multiplies every parameter group's own learning rate.
"""
from __future__ import annotations

import abc
import math

import attrs
from attrs import validators as v

from toolkit.hookspecs import hookimpl
from toolkit.registry import NoOptions


class Schedule(abc.ABC):
    """Linear warmup to lr, then ``coefficient(progress)`` (1 -> 0 over the decay) between lr and min_lr."""

    Options = NoOptions

    def __init__(self, opts, train):
        self.opts = opts
        self.lr, self.min_lr, self.warmup = train.lr, train.min_lr, train.warmup_steps
        self.decay_steps = train.decay_steps or train.max_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup:  # nanoGPT's get_lr: (step + 1) / (warmup + 1), so step 0 is not lr 0
            return self.lr * (step + 1) / (self.warmup + 1)
        if step > self.decay_steps:
            return self.min_lr
        progress = (step - self.warmup) / max(1, self.decay_steps - self.warmup)  # 0 -> 1
        return self.min_lr + self.coefficient(progress) * (self.lr - self.min_lr)

    @abc.abstractmethod
    def coefficient(self, progress: float) -> float:
        """The shape: 1 at the start of the decay, 0 at its end."""


class Cosine(Schedule):
    """Warmup, then cosine decay to min_lr (Loshchilov & Hutter 2017)."""

    def coefficient(self, progress):
        return 0.5 * (1.0 + math.cos(math.pi * progress))


class Linear(Schedule):
    """Warmup, then linear decay to min_lr."""

    def coefficient(self, progress):
        return 1.0 - progress


class Constant(Schedule):
    """Warmup, then a constant lr."""

    def __call__(self, step):
        return super().__call__(step) if step < self.warmup else self.lr

    def coefficient(self, progress):
        return 1.0


@attrs.frozen
class WSDOptions:
    # the share of the steps after warmup spent cooling down (Hägele et al. 2024: 20% matches cosine)
    decay_fraction: float = attrs.field(default=0.2, validator=[v.gt(0.0), v.le(1.0)])
    # the cooldown's shape: "sqrt" is 1 - sqrt(t) (Hägele et al. 2024, Fig. 5), "linear", or "cosine"
    decay: str = attrs.field(default="sqrt", validator=v.in_(("sqrt", "linear", "cosine")))


class WarmupStableDecay(Schedule):
    """Warmup-stable-decay: constant lr, then a short cooldown to min_lr (Hu et al. 2024)."""

    Options = WSDOptions

    def coefficient(self, progress):
        start = 1.0 - self.opts.decay_fraction
        if progress <= start:
            return 1.0
        t = (progress - start) / self.opts.decay_fraction  # 0 -> 1 over the cooldown
        if self.opts.decay == "sqrt":
            return 1.0 - math.sqrt(t)
        if self.opts.decay == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * t))
        return 1.0 - t


@hookimpl
def register_schedules(register):
    register("cosine", Cosine)
    register("linear", Linear)
    register("constant", Constant)
    register("wsd", WarmupStableDecay)
