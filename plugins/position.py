"""Built-in positional components. Contract: toolkit.contracts.Position (embed / rotate / score_bias)."""
from __future__ import annotations

import torch
from torch import nn

from toolkit.contracts import Dims, Position
from toolkit.hookspecs import hookimpl
from toolkit.registry import NoOptions


class LearnedPosition(Position):
    """Learned absolute position embeddings added to token embeddings (GPT-2's `wpe`)."""

    Options = NoOptions

    def __init__(self, opts: NoOptions, dims: Dims):
        super().__init__()
        self.max_len = dims.block_size
        self.weight = nn.Parameter(torch.empty(dims.block_size, dims.n_embd))  # (block_size, C)
        nn.init.normal_(self.weight, mean=0.0, std=0.02)

    def embed(self, tok_emb, pos):
        return tok_emb + self.weight[pos]  # (B, T, C) + (T, C)


@hookimpl
def register_components(register):
    register("position", "learned", LearnedPosition)
