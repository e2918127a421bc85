"""The code of toolkit.plugins.moe's parts, imported when one is built (their options and docs are there)."""
from __future__ import annotations

import torch
from torch import nn

from toolkit.contracts import Dims, flops_per_token
from toolkit.errors import ConfigError
from toolkit.plugins.moe import MoEOptions


class MoE(nn.Module):
    """Top-k mixture of experts (Switch, Mixtral): a router picks k experts per token; dropless, load-balanced."""

    Options = MoEOptions
    aux_losses: dict = {}  # the contract: set in every forward

    def __init__(self, opts: MoEOptions, dims: Dims):
        super().__init__()
        if opts.top_k > opts.experts:
            raise ConfigError([f"model.mlp.top_k ({opts.top_k}) must be at most experts ({opts.experts})"])
        self.k, self.alpha, self.beta = opts.top_k, opts.load_balance, opts.router_z
        self.router = nn.Linear(dims.n_embd, opts.experts, bias=False)
        self.experts = nn.ModuleList(dims.build("mlp", opts.expert, dims) for _ in range(opts.experts))
        self.register_buffer("load", torch.full((opts.experts,), 1.0 / opts.experts), persistent=False)
        self.register_buffer("entropy", torch.zeros(()), persistent=False)

    def forward(self, x):
        B, T, C = x.shape
        flat = x.reshape(B * T, C)  # (N, C)
        logits = self.router(flat).float()  # (N, E), routing in fp32
        probs = logits.softmax(dim=-1)
        top, chosen = probs.topk(self.k, dim=-1)  # (N, k) each
        weights = (top / top.sum(dim=-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            if flat.is_meta:  # `inspect` runs without data to route by: give each expert an equal share
                out[: chosen.numel() // len(self.experts)] += expert(flat[: chosen.numel() // len(self.experts)])
                continue
            token, slot = (chosen == e).nonzero(as_tuple=True)  # the tokens that chose e, and in which slot
            out.index_add_(0, token, weights[token, slot, None] * expert(flat[token]))  # (none: adds nothing)
        E = len(self.experts)
        share = (torch.full((E,), 1.0 / E, device=x.device) if flat.is_meta
                 else torch.bincount(chosen.flatten(), minlength=E).float() / chosen.numel())  # f_e
        self.aux_losses = {
            "load_balance": self.alpha * E * (share * probs.mean(dim=0)).sum(),
            "router_z": self.beta * torch.logsumexp(logits, dim=-1).square().mean(),
        }
        self.load = share.detach()
        self.entropy = -(probs * probs.clamp_min(1e-9).log()).sum(-1).mean().detach()
        return out.view(B, T, C)

    def metrics(self) -> dict[str, torch.Tensor]:
        # the busiest expert's share of the assignments against a balanced one (1.0 = balanced)
        return {"expert_load_max": self.load.max() * len(self.experts), "router_entropy": self.entropy}

    def active_params(self) -> int:
        """Parameters one token uses: the router and k experts."""
        expert = sum(p.numel() for p in self.experts[0].parameters())
        return self.router.weight.numel() + self.k * expert

    def flops_per_token(self, seq_len: int) -> int:
        return 2 * self.router.weight.numel() + self.k * flops_per_token(self.experts[0], seq_len)
