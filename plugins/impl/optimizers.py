"""The code of toolkit.plugins.optimizers's parts, imported when one is built (their options and docs are there)."""
from __future__ import annotations

import torch
from torch import nn

from toolkit.contracts import decay_groups, param_groups
from toolkit.plugins.optimizers import AdamWOptions, MuonOptions


def is_block_matrix(name: str, param: torch.Tensor) -> bool:
    """Whether Muon orthogonalises this parameter: a 2-D weight inside the blocks."""
    return name.startswith("transformer.h.") and param.dim() == 2


def adamw(opts: AdamWOptions, model: nn.Module, recipe) -> torch.optim.Optimizer:
    """AdamW (Loshchilov & Hutter 2019) with nanoGPT's decay groups; fused, DeepSpeed's CPU Adam when offloading."""
    train = recipe.train
    groups = param_groups(model, train.weight_decay, train.lr)
    if recipe.deepspeed.offload == "cpu":
        # DeepSpeed refuses a torch optimizer with offload: the update runs on the host, where its
        # vectorised CPU Adam is the one that is fast (compiled once, ~40 s, then cached)
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=train.lr, betas=tuple(train.betas), eps=opts.eps, adamw_mode=True)
    # fused: one kernel for every parameter, on CPU too since torch 2.4; a GPT-2 124M step on one
    # thread takes 0.81 s against foreach's 3.34 s, and no whole-model temporaries (bench/RESULTS.md)
    return torch.optim.AdamW(groups, lr=train.lr, betas=tuple(train.betas), eps=opts.eps, fused=True)


adamw.states_per_param = 2  # momentum and variance


def orthogonalize(g: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float) -> torch.Tensor:
    """torch.optim.Muon's quintic Newton-Schulz iteration (Jordan et al. 2024) in fp32: the nearest
    semi-orthogonal matrix to ``g``, roughly (singular values end near 1, not exactly)."""
    a, b, c = coefficients
    x = g.float()
    x = x.T if g.size(0) > g.size(1) else x  # (short, long): the Gram matrix is the small one
    x = x / x.norm().clamp(min=eps)  # spectral norm at most 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if g.size(0) > g.size(1) else x


class MuonMatrices(torch.optim.Muon):
    """torch.optim.Muon, with the Newton-Schulz iteration in fp32 off CUDA. torch runs it in bfloat16,
    which a CPU without bf16 instructions emulates: 65 ms against 4 ms for one 384x128 matrix on this
    project's AVX2 machine, which made a CPU Muon step 1.5 s where AdamW's takes 2 ms. On CUDA it is
    torch's own step, bf16 as the reference."""

    @torch.no_grad()
    def step(self, closure=None):
        if any(p.is_cuda for group in self.param_groups for p in group["params"]):
            return super().step(closure)
        for group in self.param_groups:
            lr, momentum = float(group["lr"]), group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p.grad))
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                update = orthogonalize(update, group["ns_coefficients"], group["ns_steps"], group["eps"])
                rows, cols = p.shape[:2]  # torch's adjust_lr_fn: "original" (Jordan) or "match_rms_adamw"
                scale = 0.2 * max(rows, cols) ** 0.5 if group["adjust_lr_fn"] == "match_rms_adamw" \
                    else max(1, rows / cols) ** 0.5
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update.to(p.dtype), alpha=-lr * scale)
        return None


class Muon(torch.optim.Optimizer):
    """Muon (Jordan et al. 2024): orthogonalised momentum for the blocks' matrices; AdamW for embeddings, head, gains and biases."""

    # Muon replaces each 2-D update by the nearest semi-orthogonal matrix (5 Newton-Schulz steps,
    # torch.optim.Muon). As in modded-nanogpt it is for the hidden matrices only: embeddings and
    # the LM head are lookups/classifiers whose rows are updated sparsely, and vectors have no
    # matrix to orthogonalise, so those stay with AdamW.
    Options = MuonOptions

    def __init__(self, opts: MuonOptions, model: nn.Module, recipe):
        train = recipe.train
        # an embedding table inside a block (value embeddings) is a lookup too: AdamW's, as modded-nanogpt's
        tables = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
        blocks = {id(p) for name, p in model.named_parameters() if is_block_matrix(name, p) and id(p) not in tables}
        params = [p for p in model.parameters() if p.requires_grad]
        matrices = [p for p in params if id(p) in blocks]
        rest = [p for p in params if id(p) not in blocks]
        hinted: dict[tuple[bool, float], list] = {}  # a hinted lr_scale or weight_decay: a Muon group of its own
        for p in matrices:
            hints = getattr(p, "optim_hints", {})
            hinted.setdefault((hints.get("weight_decay", True), hints.get("lr_scale", 1.0)), []).append(p)
        groups = [{"params": ps, "lr": opts.lr * s, "weight_decay": opts.weight_decay if decay else 0.0}
                  for (decay, s), ps in hinted.items()]
        self.muon = MuonMatrices(groups, lr=opts.lr,
                                     weight_decay=opts.weight_decay, momentum=opts.momentum, nesterov=opts.nesterov,
                                     ns_steps=opts.ns_steps, adjust_lr_fn=opts.adjust_lr)
        self.adamw = torch.optim.AdamW(decay_groups(rest, train.weight_decay, train.lr), lr=train.lr,
                                       betas=tuple(train.betas), fused=True)
        # one optimizer over both: the same group dicts and one state, so the schedule, DeepSpeed
        # and checkpoints see every group as they would a plain optimizer's
        super().__init__(self.muon.param_groups + self.adamw.param_groups, {})
        self._share()

    def _share(self) -> None:
        n = len(self.muon.param_groups)
        self.muon.param_groups, self.adamw.param_groups = self.param_groups[:n], self.param_groups[n:]
        self.muon.state = self.adamw.state = self.state

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        self.muon.step()
        self.adamw.step()
        return loss

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)  # new group dicts and a new state: share them again
        self._share()

    @staticmethod
    def states_per_param(name: str, param: torch.Tensor) -> int:
        """One momentum per block matrix; AdamW's momentum and variance for the rest."""
        return 1 if is_block_matrix(name, param) else 2

