"""The code of toolkit.plugins.block's parts, imported when one is built (their options and docs are there)."""
from __future__ import annotations

from torch import nn

from toolkit.contracts import Dims, state_for
from toolkit.errors import ConfigError
from toolkit.plugins.block import ParallelOptions, SandwichOptions
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
