"""A user's Dynamic Tanh (Zhu et al. 2025) from before the built-in one."""
import attrs
import torch
from torch import nn

from toolkit.hookspecs import hookimpl


@attrs.frozen
class DyTOptions:
    alpha: float = 0.5  # the starting slope inside the tanh


class DyT(nn.Module):
    """DyT: weight * tanh(alpha * x) + bias (a user's plugin)."""

    Options = DyTOptions

    def __init__(self, opts, dims, dim):
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor([opts.alpha]))
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        return self.weight * torch.tanh(self.alpha * x) + self.bias


@hookimpl
def register_components(register):
    register("norm", "dyt", DyT)
