"""Log-likelihood of continuations given contexts: the one scorer behind the multiple-choice
evaluators, the perplexity evaluator and the lm-evaluation-harness adapter.

A request is a pair of token lists ``(context, continuation)``. Its row is ``context +
continuation`` cropped from the left to ``block_size + 1`` tokens (the model sees at most
``block_size``), and the score is the sum over the continuation's tokens of
``log p(token | everything before it)``, as lm-evaluation-harness defines ``loglikelihood``.
Rows of different lengths share a forward: they are padded on the right, which a causal model
never looks at, and only the continuation's positions are read.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import attrs
import torch
import torch.nn.functional as F


@attrs.frozen
class Scored:
    """The score of one (context, continuation) request."""

    logprob: float  # sum of log p(token | everything before it) over the scored continuation tokens
    tokens: int  # continuation tokens scored (fewer than given only when it is longer than block_size)
    greedy: bool  # every scored token is the model's most likely next token

    @property
    def loss(self) -> float:
        """The summed cross-entropy (nats) of the continuation."""
        return -self.logprob

    @property
    def mean_loss(self) -> float:
        """The cross-entropy per continuation token: build-nanogpt's completion-normalised HellaSwag score."""
        return -self.logprob / self.tokens if self.tokens else math.inf


def render(context: Sequence[int], continuation: Sequence[int], block_size: int) -> tuple[list[int], int]:
    """(the model's input, how many of its last positions predict the continuation) for one request."""
    if not context:
        raise ValueError("a request needs at least one context token to predict the continuation from")
    if not continuation:
        raise ValueError("a request needs at least one continuation token to score")
    ids = [*context, *continuation][-(block_size + 1):]  # crop the context from the left
    return ids, min(len(continuation), len(ids) - 1)


def batches_needed(n_requests: int, batch_size: int) -> int:
    return -(-n_requests // batch_size)


@torch.no_grad()
def score_continuations(model: Callable, requests: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                        block_size: int, batch_size: int, device: torch.device | str = "cpu",
                        batches: int | None = None) -> list[Scored]:
    """The :class:`Scored` of every (context, continuation) request, in order.

    ``model(idx) -> (logits, ...)`` is a toolkit Transformer or a DeepSpeed engine around one.
    Requests are batched ``batch_size`` rows a forward, longest first (less padding). ``batches``
    makes it run at least that many forwards, the extra ones on a one-token row: under ZeRO 3
    every forward gathers weights from all ranks, so every rank must run as many as the busiest.
    """
    # requests may be made as they are asked for (the perplexity windows): render a batch at a time
    lengths = [len(c) + len(k) for c, k in (requests[i] for i in range(len(requests)))]
    order = sorted(range(len(requests)), key=lambda i: -lengths[i])
    out: list[Scored | None] = [None] * len(requests)
    n_batches = max(batches_needed(len(order), batch_size), batches or 0)
    for b in range(n_batches):
        chosen = order[b * batch_size:(b + 1) * batch_size]
        if not chosen:  # a forward only to keep step with the other ranks
            model(torch.zeros((1, 1), dtype=torch.long, device=device))
            continue
        rendered = {i: render(*requests[i], block_size) for i in chosen}
        T = max(len(ids) - 1 for ids, _ in rendered.values())
        x = torch.zeros((len(chosen), T), dtype=torch.long)  # (B, T), padded on the right
        y = torch.full((len(chosen), T), -1, dtype=torch.long)  # (B, T), -1 where nothing is scored
        for row, i in enumerate(chosen):
            ids, n = rendered[i]
            x[row, :len(ids) - 1] = torch.tensor(ids[:-1])
            y[row, len(ids) - 1 - n:len(ids) - 1] = torch.tensor(ids[len(ids) - n:])
        logits = model(x.to(device))[0]  # (B, T, V)
        y = y.to(logits.device)
        scored = y >= 0  # (B, T)
        picked = logits[scored].float()  # (N, V): only the continuation's positions, so memory stays small
        targets = y[scored]  # (N,)
        logprobs = -F.cross_entropy(picked, targets, reduction="none")  # (N,)
        hits = (picked.argmax(dim=-1) == targets)  # (N,)
        rows = scored.nonzero()[:, 0]  # (N,) the row of each scored position
        sums = torch.zeros(len(chosen), dtype=torch.float64, device=logits.device).index_add_(0, rows, logprobs.double())
        misses = torch.zeros(len(chosen), dtype=torch.long, device=logits.device).index_add_(0, rows, (~hits).long())
        for i, s, m in zip(chosen, sums.tolist(), misses.tolist()):
            out[i] = Scored(logprob=s, tokens=rendered[i][1], greedy=m == 0)
    return out  # type: ignore[return-value]
