"""Built-in positional components. Contract: toolkit.contracts.Position (embed / rotate / score_bias).

    learned     added to embeddings, trained, limited to block_size   (GPT-2)
    sinusoidal  added to embeddings, fixed, no limit                  (Vaswani et al. 2017)
    rope        rotates queries and keys, no limit                   (Su et al. 2021)
    alibi       linear bias on attention scores, no limit            (Press et al. 2021)
    none        nothing: causal masking alone carries order (NoPE)   (Kazemnejad et al. 2023)

The fixed schemes compute their tables from ``pos`` on every call, in fp32: a few sin/cos per
token are nothing next to the projections, there is no length limit to extend and no host-side
bounds check (which would stall a GPU), and casting the model to bf16 cannot degrade them.
"""
from __future__ import annotations

import math

import attrs
import torch
from attrs import validators as v
from torch import nn

from toolkit.errors import ConfigError
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


@attrs.frozen
class SinusoidalOptions:
    # wavelengths form a geometric progression from 2*pi to base*2*pi (10000 in the paper)
    base: float = attrs.field(default=10000.0, validator=v.gt(1.0))
    # amplitude of the encodings. The paper multiplies token embeddings (init std d^-1/2) by sqrt(d)
    # (section 3.4), so tokens and positions both have unit scale. GPT-2's init gives token
    # embeddings std 0.02 instead, so the encodings are scaled to match, keeping the paper's balance;
    # at amplitude 1 they drown the tokens (val loss 3.3 vs 2.3 for learned after 500 CPU steps).
    scale: float = attrs.field(default=0.02, validator=v.gt(0.0))


class SinusoidalPosition(Position):
    """Fixed sinusoidal position encodings added to token embeddings (Vaswani et al. 2017); no length limit."""

    Options = SinusoidalOptions

    def __init__(self, opts: SinusoidalOptions, dims: Dims):
        super().__init__()
        self.base, self.scale, self.n_embd = opts.base, opts.scale, dims.n_embd

    def embed(self, tok_emb, pos):
        # PE(p, 2i) = sin(p / base^(2i/C)), PE(p, 2i+1) = cos(p / base^(2i/C))   (section 3.5)
        C = self.n_embd
        inv_freq = 1.0 / (self.base ** (torch.arange(0, C, 2, device=pos.device, dtype=torch.float32) / C))  # (ceil(C/2),)
        angle = pos.float()[:, None] * inv_freq[None, :]  # (T, ceil(C/2))
        pe = torch.empty(pos.size(0), C, device=pos.device, dtype=torch.float32)  # (T, C)
        pe[:, 0::2] = angle.sin()
        pe[:, 1::2] = angle.cos()[:, : C // 2]  # an odd C has one more sin column than cos
        return tok_emb + (self.scale * pe).to(tok_emb.dtype)  # (B, T, C) + (T, C)


@attrs.frozen
class RopeOptions:
    # base of the rotation frequencies; Llama 1/2 use 10000, Llama 3 500000
    theta: float = attrs.field(default=10000.0, validator=v.gt(1.0))
    # the share of each head's dimensions that rotates, the rest passing through (partial rotary:
    # GPT-NeoX/Pythia rotate 0.25, Phi-2 0.4); the frequencies are over the rotated dimensions
    fraction: float = attrs.field(default=1.0, validator=[v.gt(0.0), v.le(1.0)])


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(..., hs) -> (..., hs): [x1, x2] -> [-x2, x1], pairing dimension i with i + hs/2 (HF Llama's layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryPosition(Position):
    """Rotary position embeddings (Su et al. 2021): rotate queries and keys so q.k depends on distance only."""

    Options = RopeOptions

    def __init__(self, opts: RopeOptions, dims: Dims):
        super().__init__()
        if opts.fraction == 1.0 and dims.head_dim % 2:
            raise ConfigError([f"position rope needs an even head dim, got n_embd/n_head = {dims.head_dim}"])
        if self.rotary_dims(dims.head_dim, opts.fraction) < 2:
            raise ConfigError([f"position rope: fraction {opts.fraction} of head dim {dims.head_dim} rotates no pair"])
        self.theta, self.fraction = opts.theta, opts.fraction

    @staticmethod
    def rotary_dims(head_dim: int, fraction: float) -> int:
        """How many of a head's dimensions rotate: an even number (pairs), as GPT-NeoX rounds."""
        return int(head_dim * fraction) // 2 * 2

    def cos_sin(self, pos: torch.Tensor, rd: int) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 cos and sin tables (T, rd) for positions pos (T,), laid out as HF Llama's rotary embedding."""
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, rd, 2, dtype=torch.int64, device=pos.device).float() / rd))  # (rd/2,)
        freqs = pos.float()[:, None] * inv_freq[None, :]  # (T, rd/2): angle of pair i at each position
        emb = torch.cat((freqs, freqs), dim=-1)  # (T, rd): pair i occupies dims i and i + rd/2
        return emb.cos(), emb.sin()

    def rotate(self, q, k, pos):
        # sized by what attention hands over: a whole head, or only the rotary part of one (MLA)
        rd = self.rotary_dims(q.size(-1), self.fraction)
        if rd % 2 or rd == 0:
            raise ValueError(f"rope cannot rotate {q.size(-1)} dimensions (fraction {self.fraction}): no even part")
        cos, sin = self.cos_sin(pos, rd)  # (T, rd), broadcast over (B, heads, T, rd)

        def turn(x):  # in fp32, cast back after: bf16 rotations of large angles lose the relative-position property
            x_rot, x_pass = x[..., :rd].float(), x[..., rd:]
            turned = (x_rot * cos + rotate_half(x_rot) * sin).to(x.dtype)
            return turned if x_pass.size(-1) == 0 else torch.cat((turned, x_pass), dim=-1)

        return turn(q), turn(k)


def alibi_slopes(n_head: int) -> list[float]:
    """ALiBi's head slopes: a geometric sequence starting at 2^(-8/n); for a non-power-of-2 n, the
    slopes of the closest smaller power of 2 plus every other slope of the next one (Press et al. 2021,
    as in the authors' reference implementation)."""

    def power_of_2(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))  # = 2^(-8/n)
        return [start * start**i for i in range(n)]

    if math.log2(n_head).is_integer():
        return power_of_2(n_head)
    closest = 2 ** math.floor(math.log2(n_head))
    return power_of_2(closest) + alibi_slopes(2 * closest)[0::2][: n_head - closest]


class ALiBiPosition(Position):
    """Attention with linear biases (Press et al. 2021): penalise scores by head slope times distance; no limit."""

    Options = NoOptions

    def __init__(self, opts: NoOptions, dims: Dims):
        super().__init__()
        self.n_head = dims.n_head
        self.register_buffer("slopes", torch.tensor(alibi_slopes(dims.n_head)), persistent=False)  # (nh,)

    def slopes_for(self, n_head: int | None, device) -> torch.Tensor:
        """The slopes of ``n_head`` heads (the count the attention asks for; the model's by default)."""
        if n_head is None or n_head == self.n_head:
            return self.slopes.float()
        return torch.tensor(alibi_slopes(n_head), device=device)

    def score_bias(self, q_pos, k_pos, n_head=None):
        distance = (q_pos[:, None] - k_pos[None, :]).float()  # (Tq, Tk); negative ones are masked anyway
        return -self.slopes_for(n_head, q_pos.device)[:, None, None] * distance  # (nh, Tq, Tk)

    def score_mod(self, q_pos, k_pos, n_head=None):
        slopes = self.slopes_for(n_head, q_pos.device)  # (nh,)

        def alibi(score, b, h, q_idx, kv_idx):  # the same bias, one score at a time (for FlexAttention)
            return score - slopes[h] * (q_pos[q_idx] - k_pos[kv_idx]).float()

        return alibi


class NoPosition(Position):
    """No positional information (NoPE, Kazemnejad et al. 2023): causal masking alone reveals order."""

    Options = NoOptions

    def __init__(self, opts: NoOptions, dims: Dims):
        super().__init__()


@hookimpl
def register_components(register):
    register("position", "learned", LearnedPosition)
    register("position", "sinusoidal", SinusoidalPosition)
    register("position", "rope", RotaryPosition)
    register("position", "alibi", ALiBiPosition)
    register("position", "none", NoPosition)
