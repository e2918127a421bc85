"""Test plugin: a learned position table of a fixed length, which limits block_size."""
import attrs
import torch
from attrs import validators as v
from torch import nn

from toolkit.contracts import Position
from toolkit.hookspecs import hookimpl


@attrs.frozen
class ShortOptions:
    max_len: int = attrs.field(default=16, validator=v.gt(0))


class ShortPosition(Position):
    """Learned positions for at most `max_len` tokens."""

    Options = ShortOptions

    def __init__(self, opts: ShortOptions, dims):
        super().__init__()
        self.max_len = opts.max_len
        self.weight = nn.Parameter(torch.zeros(opts.max_len, dims.n_embd))  # (max_len, C)

    def embed(self, tok_emb, pos):
        return tok_emb + self.weight[pos]


@hookimpl
def register_components(register):
    register("position", "short", ShortPosition)
