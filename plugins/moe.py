"""Mixture-of-experts MLP: a router sends every token to its top-k experts, each a registered MLP.

Sparse MoE layers (Shazeer et al. 2017) as in Switch (Fedus et al. 2022) and Mixtral (Jiang et al.
2024): softmax router probabilities, the top k renormalised to weights (Mixtral), and dropless
routing: every token is computed by each of its k experts, with no capacity limit and no dropped
tokens (as Mixtral and MegaBlocks, Gale et al. 2023). Experts are any registered MLP (``expert``).

Two auxiliary losses, added to the training objective through the contract (``aux_losses``):

    load_balance  alpha * E * sum_e f_e * P_e   (Switch, eq. 4; f_e: share of the N*k assignments that
                  went to expert e, P_e: mean router probability of e; 1 when balanced)
    router_z      beta * mean_n logsumexp(logits_n)^2   (ST-MoE, Zoph et al. 2022: keeps logits small)
"""
from __future__ import annotations

import attrs
import torch
from attrs import validators as v
from torch import nn

from toolkit.contracts import Dims, flops_per_token
from toolkit.errors import ConfigError
from toolkit.families import SPEC_TYPES
from toolkit.hookspecs import hookimpl


#: the most experts of one MoE layer (DeepSeek-V3 has 256 routed experts; 100k would take minutes to
#: build, even on the meta device recipe validation uses)
MAX_EXPERTS = 512


@attrs.frozen
class MoEOptions:
    # experts per layer, at most MAX_EXPERTS: each expert is its own module, built and looped over one by one
    experts: int = attrs.field(default=8, validator=[v.ge(2), v.le(MAX_EXPERTS)])
    top_k: int = attrs.field(default=2, validator=v.ge(1))  # experts the router picks per token
    # each expert: a registered MLP, kind and options (GPT-2's by default: give multiplier = 2.0 to make
    # top-2 routing cost what one dense MLP does)
    expert: SPEC_TYPES["mlp"] = attrs.field(factory=lambda: SPEC_TYPES["mlp"]("gelu"))
    load_balance: float = attrs.field(default=0.01, validator=v.ge(0.0))  # Switch's alpha
    router_z: float = attrs.field(default=0.001, validator=v.ge(0.0))  # ST-MoE's beta


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


@hookimpl
def register_components(register):
    register("mlp", "moe", MoE)
