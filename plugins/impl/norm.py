"""The code of toolkit.plugins.norm's parts, imported when one is built (their options and docs are there)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from toolkit.contracts import Dims
from toolkit.plugins.norm import DyTOptions, LayerNormOptions, RMSNormOptions


class LayerNorm(nn.Module):
    """Layer normalisation (Ba et al. 2016) with an optional bias (PyTorch's has no bias=False before 2.1)."""

    Options = LayerNormOptions

    def __init__(self, opts: LayerNormOptions, dims: Dims, dim: int):
        super().__init__()
        self.eps = opts.eps
        self.weight = nn.Parameter(torch.ones(dim))
        use_bias = dims.bias if opts.bias is None else opts.bias
        self.bias = nn.Parameter(torch.zeros(dim)) if use_bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)

    def flops_per_token(self, seq_len: int) -> int:
        return 0  # elementwise: negligible next to the matmuls, as in the 6N estimate


class RMSNorm(nn.Module):
    """Root-mean-square normalisation (Zhang & Sennrich 2019): no mean subtraction, no bias, as in Llama."""

    Options = RMSNormOptions

    def __init__(self, opts: RMSNormOptions, dims: Dims, dim: int):
        super().__init__()
        self.eps, self.offset = opts.eps, opts.offset
        self.weight = nn.Parameter(torch.full((dim,), 1.0 - opts.offset))  # a scale of 1 at the start

    def forward(self, x):
        # as HF Llama: normalise in fp32 (bf16 squares lose too much), cast back, then scale
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:  # Gemma scales in fp32, then casts
            return (h * (self.offset + self.weight.float())).to(x.dtype)
        return self.weight * h.to(x.dtype)

    def flops_per_token(self, seq_len: int) -> int:
        return 0  # elementwise, like LayerNorm


class DyT(nn.Module):
    """Dynamic Tanh (Zhu et al. 2025): weight * tanh(alpha * x) + bias, a norm with no statistics."""

    # "Transformers without Normalization": alpha is one learned scalar; it squashes the activations
    # as LayerNorm's input-output curve does, without reductions over the features.
    Options = DyTOptions

    def __init__(self, opts: DyTOptions, dims: Dims, dim: int):
        super().__init__()
        start = opts.alpha_attention if dims.role == "attention" else opts.alpha_other
        # shape (1,), not a 0-dim tensor: DeepSpeed's broadcast of parameters cannot take 0-dim ones
        self.alpha = nn.Parameter(torch.full((1,), start if start is not None else opts.alpha))
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        return self.weight * torch.tanh(self.alpha * x) + self.bias

    def metrics(self) -> dict[str, torch.Tensor]:
        return {"dyt_alpha": self.alpha.detach()[0]}

    def flops_per_token(self, seq_len: int) -> int:
        return 0  # elementwise, like LayerNorm
