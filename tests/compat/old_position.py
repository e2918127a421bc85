"""A user's ALiBi-style position from before score_bias was asked for a head count: a bias for the model's heads."""
import attrs
import torch

from toolkit.contracts import Position
from toolkit.hookspecs import hookimpl


@attrs.frozen
class LinearBiasOptions:
    max_slope: float = 0.5


class LinearBias(Position):
    """A linear distance penalty per head, slopes max_slope / 2**h (a user's plugin)."""

    Options = LinearBiasOptions

    def __init__(self, opts, dims):
        super().__init__()
        slopes = opts.max_slope / 2.0 ** torch.arange(dims.n_head)
        self.register_buffer("slopes", slopes, persistent=False)

    def score_bias(self, q_pos, k_pos):  # the old signature: no n_head
        return -self.slopes[:, None, None] * (q_pos[:, None] - k_pos[None, :]).clamp(min=0).float()


@hookimpl
def register_components(register):
    register("position", "linear_bias", LinearBias)
