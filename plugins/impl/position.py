"""The code of toolkit.plugins.position's parts, imported when one is built (their options and docs are there)."""
from __future__ import annotations

import math

import torch
from torch import nn

from toolkit.errors import ConfigError
from toolkit.contracts import Dims, Position
from toolkit.plugins.position import RopeOptions, SinusoidalOptions
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


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature term, 0.1 * mscale * ln(factor) + 1 (1 for factor <= 1; Peng et al. 2023, eq. 22)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_inv_freq(opts: RopeOptions, rd: int, device=None, seq_len: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 inverse frequencies (rd/2,) of ``rd`` rotated dims, scaled as ``opts.scaling`` says.

    ``seq_len`` (a 0-dim tensor) is the length the frequencies are for: only "dynamic" reads it.
    Each formula is transformers' (modeling_rope_utils), so imported checkpoints match to rounding.
    """
    exponents = torch.arange(0, rd, 2, dtype=torch.int64, device=device).float() / rd  # (rd/2,): 2i/rd
    kind, factor = opts.scaling, opts.factor
    inv_freq = 1.0 / (opts.theta ** exponents)  # (rd/2,)
    if kind == "dynamic":  # NTK-aware: beyond original_max_len, raise the base so the frequencies span seq_len
        if seq_len is None:
            return inv_freq
        orig = opts.original_max_len
        base = opts.theta * ((factor * seq_len / orig) - (factor - 1)) ** (rd / (rd - 2))  # 0-dim, fp32
        return torch.where(seq_len > orig, 1.0 / (base ** exponents), inv_freq)  # no host sync for the test
    if kind == "linear":  # position interpolation: positions / factor, i.e. frequencies / factor
        return inv_freq / factor
    if kind == "llama3":
        orig = opts.original_max_len
        low_wavelen, high_wavelen = orig / opts.low_freq_factor, orig / opts.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)  # long wavelengths: interpolate
        smooth = (orig / wavelen - opts.low_freq_factor) / (opts.high_freq_factor - opts.low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    if kind == "yarn":  # NTK-by-parts: interpolate dims that rotate less than beta_slow times, keep those over beta_fast
        orig = opts.original_max_len

        def dim_of(rotations):  # the dimension that turns `rotations` times over orig positions
            return (rd * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(opts.theta))

        low, high = dim_of(opts.beta_fast), dim_of(opts.beta_slow)
        if opts.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, rd - 1)
        if low == high:
            high += 0.001  # transformers: no division by zero
        ramp = torch.clamp((torch.arange(rd // 2, dtype=torch.float32, device=device) - low) / (high - low), 0, 1)
        pos_freqs = opts.theta ** exponents
        extrapolate = 1 - ramp  # 1: keep the frequency, 0: interpolate it
        return (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv_freq


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(..., hs) -> (..., hs): [x1, x2] -> [-x2, x1], pairing dimension i with i + hs/2 (HF Llama's layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryPosition(Position):
    """Rotary position embeddings (Su et al. 2021): rotate queries and keys so q.k depends on distance only."""

    Options = RopeOptions
    yarn_mscale = staticmethod(yarn_mscale)  # for importers, which reach the component through the registry

    def __init__(self, opts: RopeOptions, dims: Dims):
        super().__init__()
        if opts.fraction == 1.0 and dims.head_dim % 2:
            raise ConfigError([f"position rope needs an even head dim, got n_embd/n_head = {dims.head_dim}"])
        if self.rotary_dims(dims.head_dim, opts.fraction) < 2:
            raise ConfigError([f"position rope: fraction {opts.fraction} of head dim {dims.head_dim} rotates no pair"])
        needs_len = opts.scaling in ("dynamic", "yarn", "llama3")
        if needs_len and opts.original_max_len is None:
            raise ConfigError([f"position rope: scaling {opts.scaling!r} needs original_max_len (the pretraining context)"])
        if opts.scaling == "llama3" and opts.high_freq_factor <= opts.low_freq_factor:
            raise ConfigError([f"position rope: high_freq_factor ({opts.high_freq_factor}) must exceed "
                               f"low_freq_factor ({opts.low_freq_factor})"])
        self.opts = opts
        self.theta, self.fraction = opts.theta, opts.fraction
        # yarn scales cos and sin (hence q.k by its square); the others leave them as they are
        self.mscale = 1.0
        if opts.scaling == "yarn":
            self.mscale = opts.attention_factor if opts.attention_factor is not None else yarn_mscale(opts.factor)

    @staticmethod
    def rotary_dims(head_dim: int, fraction: float) -> int:
        """How many of a head's dimensions rotate: an even number (pairs), as GPT-NeoX rounds."""
        return int(head_dim * fraction) // 2 * 2

    def cos_sin(self, pos: torch.Tensor, rd: int) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 cos and sin tables (T, rd) for positions pos (T,), laid out as HF Llama's rotary embedding.

        Dynamic NTK sizes its base by the longest position in this call (floored at original_max_len),
        as transformers does per forward: with a KV cache, keys keep the rotation of the step that
        computed them, exactly as transformers' cached generation.
        """
        seq_len = pos.max() + 1 if self.opts.scaling == "dynamic" else None
        inv_freq = rope_inv_freq(self.opts, rd, pos.device, seq_len)  # (rd/2,)
        freqs = pos.float()[:, None] * inv_freq[None, :]  # (T, rd/2): angle of pair i at each position
        emb = torch.cat((freqs, freqs), dim=-1)  # (T, rd): pair i occupies dims i and i + rd/2
        if self.mscale != 1.0:
            return emb.cos() * self.mscale, emb.sin() * self.mscale
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
