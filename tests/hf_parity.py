"""Checks shared by the Hugging Face parity tests: a transformers model and ours, compared on logits,
loss and every gradient (ours mapped to HF's names by the exporter's own tensor mapping)."""
from __future__ import annotations

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the relative error of a against the reference b."""
    return ((a - b).abs().max() / b.abs().max()).item()


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Add noise to every parameter (norms and biases too, so no swapped or missing mapping hides)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.eval()


def tokens(vocab: int, shape: tuple[int, int], pad: int | None, seed: int = 1) -> torch.Tensor:
    """Random token ids that avoid ``pad``: HF's embeddings give the pad row no gradient (padding_idx), ours do."""
    idx = torch.randint(0, vocab - (pad is not None), shape, generator=torch.Generator().manual_seed(seed))
    return idx if pad is None else idx + (idx >= pad).long()


def compare_training_step(hf, ours, idx: torch.Tensor, tensors_to_hf) -> dict[str, float]:
    """Relative errors of our logits, loss and every gradient against transformers' (HF's names as keys)."""
    hf.zero_grad(set_to_none=True)
    ours.zero_grad(set_to_none=True)
    out = hf(idx, labels=idx)  # HF shifts the labels itself: token t predicts t + 1
    targets = torch.cat([idx[:, 1:], torch.full_like(idx[:, :1], -1)], dim=1)  # ours: ignore the last position
    logits, loss = ours(idx, targets)
    out.loss.backward()
    loss.backward()
    errs = {"logits": rel_err(logits, out.logits), "loss": rel_err(loss, out.loss)}
    theirs = {name: p.grad for name, p in hf.named_parameters()}
    mine = tensors_to_hf({name: p.grad for name, p in ours.named_parameters()}, ours.config)
    assert set(mine) == set(theirs), f"gradient names differ: {sorted(set(mine) ^ set(theirs))}"
    errs.update({name: rel_err(mine[name], g) for name, g in theirs.items()})
    return errs
