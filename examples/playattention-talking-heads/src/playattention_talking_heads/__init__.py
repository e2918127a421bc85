"""Talking-heads attention (Shazeer et al. 2020, arXiv:2003.02436) as a playattention plugin,
and the original Transformer's inverse-square-root learning-rate schedule beside it."""
from __future__ import annotations

import math

import attrs
import torch
from attrs import validators as v
from torch import nn

from toolkit.contracts import Dims, hint, observing, record_attention, update_cache
from toolkit.hookspecs import hookimpl

__version__ = "0.1.0"


@attrs.frozen
class TalkingHeadsOptions:
    # which head mixes to learn: "both" (the paper), "logits" (before the softmax) or "weights" (after it)
    mix: str = attrs.field(default="both", validator=v.in_(("both", "logits", "weights")))


class TalkingHeadsAttention(nn.Module):
    """Talking-heads attention (Shazeer et al. 2020): heads mix their attention logits and weights."""

    Options = TalkingHeadsOptions

    def __init__(self, opts: TalkingHeadsOptions, dims: Dims):
        super().__init__()
        C, nh = dims.n_embd, dims.n_head
        self.n_head, self.head_dim = nh, dims.head_dim
        self.c_attn = nn.Linear(C, 3 * C, bias=dims.bias)  # rows [q; k; v], GPT-2's layout
        self.c_proj = nn.Linear(C, C, bias=dims.bias)
        # (nh, nh) mixing matrices P_l and P_w of the paper; identity at init, so the layer starts as
        # multi-head attention (the model's init only touches nn.Linear and nn.Embedding). Weight
        # decay would pull them towards zero, not towards that identity: exempt them.
        self.mix_logits = hint(nn.Parameter(torch.eye(nh)), weight_decay=False) if opts.mix in ("both", "logits") else None
        self.mix_weights = hint(nn.Parameter(torch.eye(nh)), weight_decay=False) if opts.mix in ("both", "weights") else None
        self.attn_dropout = nn.Dropout(dims.dropout)
        self.resid_dropout = nn.Dropout(dims.dropout)

    def forward(self, x, position, pos, cache=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        q, k = position.rotate(q, k, pos)
        k, v, k_pos = update_cache(cache, k, v, pos)  # (B, nh, Tk, hs), positions (Tk,)
        # Mixing needs the whole (B, nh, T, Tk) score tensor, so no fused SDPA kernel: the math, spelled out.
        logits = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))  # (B, nh, T, Tk)
        if self.mix_logits is not None:  # each new head's logits are a learned mix of all heads' (eq. 2)
            logits = torch.einsum("bhqk,hg->bgqk", logits, self.mix_logits)  # (B, nh, T, Tk)
        bias = position.score_bias(pos, k_pos)  # (nh, T, Tk) or None, e.g. ALiBi, added per output head
        if bias is not None:
            logits = logits + bias.to(logits.dtype)
        # causal mask after the mixing: mixing across heads never moves a score to another key
        logits = logits.masked_fill(k_pos[None, :] > pos[:, None], float("-inf"))  # (B, nh, T, Tk)
        weights = torch.softmax(logits.float(), dim=-1).to(q.dtype)  # in fp32 for bf16 stability
        if self.mix_weights is not None:  # and again after the softmax; masked weights stay 0
            weights = torch.einsum("bhqk,hg->bgqk", weights, self.mix_weights)
        if observing():  # no attend() here: offer the maps `playattention attention` draws (after mixing)
            record_attention(weights)
        y = self.attn_dropout(weights) @ v  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def flops_per_token(self, seq_len: int) -> int:
        # projections, QK^T and AV (4 * seq_len * C), and each (nh x nh) mix over seq_len keys
        mixes = (self.mix_logits is not None) + (self.mix_weights is not None)
        proj = 2 * (self.c_attn.weight.numel() + self.c_proj.weight.numel())
        return proj + 4 * seq_len * self.n_head * self.head_dim + mixes * 2 * self.n_head * self.n_head * seq_len


# -- the original Transformer's learning-rate schedule (Vaswani et al. 2017, section 5.3) ---------
# lrate = d_model^-0.5 * min(step^-0.5, step * warmup^-1.5): linear warmup, then decay with the inverse
# square root of the step; scaled so the peak, at the end of warmup, is the recipe's train.lr.
@attrs.frozen
class InverseSqrtOptions:
    # the decay never goes below this fraction of train.lr (0: decay for ever, as in the paper)
    floor: float = attrs.field(default=0.0, validator=[v.ge(0.0), v.le(1.0)])


class InverseSqrt:
    """Linear warmup, then lr * sqrt(warmup / step) (Vaswani et al. 2017, section 5.3)."""

    Options = InverseSqrtOptions

    def __init__(self, opts: InverseSqrtOptions, train):
        self.lr, self.warmup, self.floor = train.lr, max(1, train.warmup_steps), opts.floor

    def __call__(self, step: int) -> float:
        n = step + 1  # the paper counts steps from 1
        return self.lr * min(n / self.warmup, max(self.floor, math.sqrt(self.warmup / n)))


@hookimpl
def register_components(register):
    register("attention", "talking_heads", TalkingHeadsAttention)


@hookimpl
def register_schedules(register):
    register("inverse_sqrt", InverseSqrt)
