"""Built-in blocks: where the norms and the residual connections sit around attention and the MLP.

Contract: factory(opts, dims) -> module; forward(x, position, pos, cache=None, state=None) -> x. A block builds
this layer's attention, norms and MLP with ``dims.part(family, ...)`` (the layer's own choices when
a recipe gives them), keeps GPT-2's names (ln_1, attn, ln_2, mlp) so weights load by name, and says
with ``final_norm`` whether the model needs a norm after the last block. Each hands the per-forward
state to the parts that ask for it (toolkit.contracts, "State between layers").

    pre_norm    x + attn(ln_1(x)); x + mlp(ln_2(x))                         (GPT-2, Llama)
    post_norm   ln_1(x + attn(x)); ln_2(x + mlp(x))                         (Vaswani et al. 2017)
    parallel    x + attn(ln_1(x)) + mlp(ln_1(x)), or ln_2 for the MLP      (GPT-J, PaLM; GPT-NeoX)
    sandwich    x + post_ln_1(attn(ln_1(x))); x + post_ln_2(mlp(ln_2(x)))   (Gemma 2; OLMo 2 with pre = false)
"""
from __future__ import annotations

import attrs
from torch import nn

from toolkit.contracts import Dims, state_for
from toolkit.errors import ConfigError
from toolkit.hookspecs import hookimpl
from toolkit.registry import NoOptions


class PreNorm(nn.Module):
    """Pre-norm residual block (GPT-2): the residual stream stays un-normalised, which keeps deep stacks trainable."""

    Options = NoOptions
    final_norm = True
    reads_state = False  # hands the state on to its parts, reads none of it: the recipe probe runs one layer of each choice

    def __init__(self, opts, dims: Dims):
        super().__init__()
        self.ln_1 = dims.part("norm", dims.n_embd, role="attention")
        self.attn = dims.part("attention")
        self.ln_2 = dims.part("norm", dims.n_embd, role="mlp")
        self.mlp = dims.part("mlp")

    def forward(self, x, position, pos, cache=None, state=None):
        x = x + self.attn(self.ln_1(x), position, pos, cache, **state_for(self.attn, state))
        return x + self.mlp(self.ln_2(x), **state_for(self.mlp, state))


class PostNorm(PreNorm):
    """Post-norm residual block (Vaswani et al. 2017): normalise after each residual add."""

    final_norm = False  # the block already ends in a norm

    def forward(self, x, position, pos, cache=None, state=None):
        x = self.ln_1(x + self.attn(x, position, pos, cache, **state_for(self.attn, state)))
        return self.ln_2(x + self.mlp(x, **state_for(self.mlp, state)))


@attrs.frozen
class ParallelOptions:
    # one norm feeding both branches (GPT-J, PaLM) or one each (GPT-NeoX's use_parallel_residual)
    shared_norm: bool = True


class Parallel(nn.Module):
    """Parallel block (GPT-J; PaLM, Chowdhery et al. 2022): attention and MLP read the same input, added together."""

    reads_state = False  # hands the state on only
    Options = ParallelOptions
    final_norm = True

    def __init__(self, opts: ParallelOptions, dims: Dims):
        super().__init__()
        self.ln_1 = dims.part("norm", dims.n_embd, role="attention")
        self.attn = dims.part("attention")
        self.ln_2 = None if opts.shared_norm else dims.part("norm", dims.n_embd, role="mlp")
        self.mlp = dims.part("mlp")

    def forward(self, x, position, pos, cache=None, state=None):
        h = self.ln_1(x)
        return (x + self.attn(h, position, pos, cache, **state_for(self.attn, state))
                + self.mlp(h if self.ln_2 is None else self.ln_2(x), **state_for(self.mlp, state)))


@attrs.frozen
class SandwichOptions:
    pre: bool = True  # a norm on each branch's input (Gemma 2); OLMo 2 has none
    post: bool = True  # a norm on each branch's output before the residual add (both)


class Sandwich(nn.Module):
    """Norms around each branch, before and/or after it (Gemma 2, Team 2024; OLMo 2, OLMo et al. 2024)."""

    reads_state = False  # hands the state on only
    Options = SandwichOptions
    final_norm = True

    def __init__(self, opts: SandwichOptions, dims: Dims):
        super().__init__()
        if not (opts.pre or opts.post):
            raise ConfigError(["a sandwich block needs pre or post norms (both off is no norm at all)"])
        C = dims.n_embd
        self.ln_1 = dims.part("norm", C, role="attention") if opts.pre else nn.Identity()
        self.attn = dims.part("attention")
        self.post_ln_1 = dims.part("norm", C, role="attention") if opts.post else nn.Identity()
        self.ln_2 = dims.part("norm", C, role="mlp") if opts.pre else nn.Identity()
        self.mlp = dims.part("mlp")
        self.post_ln_2 = dims.part("norm", C, role="mlp") if opts.post else nn.Identity()

    def forward(self, x, position, pos, cache=None, state=None):
        x = x + self.post_ln_1(self.attn(self.ln_1(x), position, pos, cache, **state_for(self.attn, state)))
        return x + self.post_ln_2(self.mlp(self.ln_2(x), **state_for(self.mlp, state)))


@hookimpl
def register_components(register):
    register("block", "pre_norm", PreNorm)
    register("block", "post_norm", PostNorm)
    register("block", "parallel", Parallel)
    register("block", "sandwich", Sandwich)
