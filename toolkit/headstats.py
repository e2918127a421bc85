"""Statistics of attention maps, per head: what researchers read attention by.

    entropy     -sum_j p_ij log p_ij in nats: 0 for a head that looks at one token, log(i + 1) for uniform
    sink_mass   p_i0, the probability on the first token (attention sinks, Xiao et al. 2023; output
                gating removes them, Qiu et al. 2025)
    distance    sum_j p_ij (i - j), how far back a head looks on average (mean attention distance)
    top_key     the earlier token the head attends to most: argmax_j of the mean p_ij over queries i > j

Maps are (B, H, T, T) over a fresh sequence (query i is key i). Each is a mean over the batch and
over queries 1..T-1: query 0 sees only itself, so it would count as a sink of mass 1 everywhere.
A map whose rows are not distributions (differential attention's difference of two softmaxes has
negative entries and rows summing to 1 - lambda) is read through |p| normalised to sum 1 per row.
"""
from __future__ import annotations

import torch

STATS = ("entropy", "sink_mass", "distance")


def as_distribution(maps: torch.Tensor) -> torch.Tensor:
    """Rows of |maps| normalised to sum 1 (ordinary softmax maps are returned as they are, up to rounding)."""
    p = maps.float().abs()
    return p / p.sum(-1, keepdim=True).clamp_min(1e-30)


def head_stats(maps: torch.Tensor) -> dict[str, torch.Tensor]:
    """maps (B, H, T, T) -> {stat: (H,)} for entropy, sink_mass, distance, and top_key / top_key_mass."""
    B, H, T, Tk = maps.shape
    if T != Tk or T < 2:
        raise ValueError(f"expected maps over a fresh sequence of 2 or more tokens, (B, H, T, T); got {tuple(maps.shape)}")
    p = as_distribution(maps)[:, :, 1:, :]  # (B, H, T-1, T): queries 1..T-1
    i = torch.arange(1, T, device=p.device, dtype=p.dtype)[:, None]  # (T-1, 1) query positions
    j = torch.arange(T, device=p.device, dtype=p.dtype)[None, :]  # (1, T) key positions
    logp = torch.where(p > 0, p.log(), torch.zeros_like(p))
    out = {
        "entropy": -(p * logp).sum(-1).mean((0, 2)),
        "sink_mass": p[..., 0].mean((0, 2)),
        "distance": (p * (i - j).clamp_min(0)).sum(-1).mean((0, 2)),
    }
    earlier = (j < i).to(p.dtype)  # (T-1, T): key j strictly before query i
    received = (p * earlier).sum((0, 2)) / (B * earlier.sum(0)).clamp_min(1)  # (H, T): mean over queries after j
    out["top_key_mass"], out["top_key"] = received.max(-1)
    return out


def layer_stats(maps: torch.Tensor) -> dict[str, float]:
    """The mean over heads of entropy, sink_mass and distance."""
    stats = head_stats(maps)
    return {name: float(stats[name].mean()) for name in STATS}
