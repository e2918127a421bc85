"""A user's differential attention from before the built-in one: two softmax maps, their difference."""
import attrs
import torch
from torch import nn

from toolkit.contracts import Dims, attend, update_cache
from toolkit.hookspecs import hookimpl


@attrs.frozen
class DiffOptions:
    lam: float = 0.5  # weight of the second map


class Diff(nn.Module):
    """Differential attention with a fixed lambda (a user's plugin)."""

    Options = DiffOptions
    conformance_skip = {"scale": "two softmaxes: the kit's one-bias probe does not fit"}

    def __init__(self, opts, dims: Dims):
        super().__init__()
        C = dims.n_embd
        self.n_head, self.head_dim, self.lam = dims.n_head, dims.head_dim, opts.lam
        self.c_attn = nn.Linear(C, 5 * C, bias=dims.bias)  # q1, k1, q2, k2, v
        self.c_proj = nn.Linear(C, C, bias=dims.bias)

    def forward(self, x, position, pos, cache=None):
        B, T, C = x.shape
        parts = [t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in self.c_attn(x).split(C, dim=2)]
        q1, k1, q2, k2, v = parts  # each (B, nh, T, hs)
        q1, k1 = position.rotate(q1, k1, pos)
        q2, k2 = position.rotate(q2, k2, pos)
        if cache is not None:
            k = torch.cat([k1, k2], dim=1)  # one cache for both key sets
            k, v, k_pos = update_cache(cache, k, v, pos)
            k1, k2 = k.split(self.n_head, dim=1)
        else:
            k_pos = pos
        y = attend(q1, k1, v, pos, k_pos, position) - self.lam * attend(q2, k2, v, pos, k_pos, position)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


@hookimpl
def register_components(register):
    register("attention", "diff", Diff)
