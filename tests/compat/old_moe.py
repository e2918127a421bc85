"""A user's soft mixture of two expert MLPs from before the built-in moe."""
import attrs
import torch
from torch import nn

from toolkit.hookspecs import hookimpl


@attrs.frozen
class MoEOptions:
    n_expert: int = 2


class MoE(nn.Module):
    """A dense softmax mixture of expert MLPs (a user's plugin)."""

    Options = MoEOptions

    def __init__(self, opts, dims):
        super().__init__()
        C = dims.n_embd
        self.router = nn.Linear(C, opts.n_expert, bias=False)
        self.c_fc = nn.ModuleList(nn.Linear(C, 2 * C) for _ in range(opts.n_expert))
        self.c_proj = nn.ModuleList(nn.Linear(2 * C, C) for _ in range(opts.n_expert))

    def forward(self, x):
        gates = torch.softmax(self.router(x), dim=-1)  # (B, T, E)
        outs = torch.stack([p(torch.relu(f(x))) for f, p in zip(self.c_fc, self.c_proj)], dim=-1)  # (B, T, C, E)
        return (outs * gates.unsqueeze(2)).sum(-1)


@hookimpl
def register_components(register):
    register("mlp", "moe", MoE)
