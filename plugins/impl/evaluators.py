"""The code of toolkit.plugins.evaluators's parts, imported when one is built (their options and docs are there)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import attrs
import numpy as np
import torch

from toolkit import safeio
from toolkit.errors import DataError
from toolkit.headstats import STATS, layer_stats
from toolkit.plugins.evaluators import AttentionStatsOptions, MultipleChoiceOptions, PerplexityOptions
from toolkit.scoring import Scored, batches_needed, score_continuations


# -- multiple choice (HellaSwag) ------------------------------------------------------------------
@attrs.frozen
class Example:
    """One multiple-choice question: a context, its candidate endings and the index of the right one."""

    context: str
    endings: tuple[str, ...]
    label: int


def read_examples(path: str | Path, limit: int | None = None) -> list[Example]:
    """The examples of a JSONL file of ``{"ctx": str, "endings": [str, ...], "label": int}`` lines
    (HellaSwag's own files; other keys are ignored); DataError naming the line of a bad one."""
    path = Path(path).expanduser()
    if not path.exists() and not path.is_symlink():
        raise DataError(f"{path}: no such multiple-choice file")
    out: list[Example] = []
    # a FIFO or a device is refused by name; each line is checked on its own (UTF-8, depth, digits)
    for n, line in enumerate(safeio.read_bytes(path).split(b"\n"), start=1):
        if limit is not None and len(out) >= limit:
            break
        if not line.strip():
            continue
        try:
            row = safeio.loads_json(line, f"{path}:{n}")
        except safeio.BadContent as exc:
            raise DataError(str(exc)) from None
        ctx, endings, label = (row.get(k) if isinstance(row, dict) else None for k in ("ctx", "endings", "label"))
        if not isinstance(ctx, str):
            raise DataError(f"{path}:{n}: expected a string \"ctx\", got {json.dumps(ctx)}")
        if not (isinstance(endings, list) and len(endings) >= 2 and all(isinstance(e, str) and e for e in endings)):
            raise DataError(f"{path}:{n}: expected \"endings\" to be a list of 2 or more non-empty strings")
        if isinstance(label, str) and label.isdigit() and len(label) < 10:  # the Hugging Face copy stores it as "3"
            label = int(label)
        if not (isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(endings)):
            raise DataError(f"{path}:{n}: expected \"label\" to be an index into the {len(endings)} endings, "
                            f"got {json.dumps(label)}")
        out.append(Example(ctx, tuple(endings), label))
    if not out:
        raise DataError(f"{path}: no examples")
    return out


def choose(scores: list[Scored]) -> tuple[int, int]:
    """(the ending with the lowest summed loss, the one with the lowest loss per token); ties go to the first."""
    pick = min(range(len(scores)), key=lambda j: scores[j].loss)
    pick_norm = min(range(len(scores)), key=lambda j: scores[j].mean_loss)
    return pick, pick_norm


class MultipleChoice:
    """Multiple-choice accuracy (HellaSwag's JSONL): acc by summed ending loss, acc_norm by loss per token."""

    Options = MultipleChoiceOptions

    def __init__(self, opts: MultipleChoiceOptions, ctx):
        self.ctx = ctx
        self.batch_size = opts.batch_size or ctx.micro_batch
        self.examples = ctx.shard(read_examples(opts.path, opts.limit))  # this rank's share
        tok, self.requests = ctx.tokenizer, []
        for i, ex in enumerate(self.examples):
            try:
                # the ending follows the context after a space, as build-nanogpt and lm-eval render it
                context = tok.encode(ex.context) or ([tok.eot] if tok.eot is not None else [])
                self.requests += [(context, tok.encode(" " + ending)) for ending in ex.endings]
            except ValueError as exc:  # a character the char tokenizer never saw
                raise DataError(f"{opts.path}: example {i * ctx.world_size + ctx.rank + 1}: {exc}") from None
            if not context:
                raise DataError(f"{opts.path}: example {i * ctx.world_size + ctx.rank + 1}: empty ctx and "
                                f"the {tok.name} tokenizer has no end-of-text token to start from")
        self.batches = int(ctx.max(batches_needed(len(self.requests), self.batch_size)).item())

    def __call__(self, model) -> dict[str, float]:
        scores = score_continuations(model, self.requests, block_size=self.ctx.block_size,
                                     batch_size=self.batch_size, device=self.ctx.device, batches=self.batches)
        correct = correct_norm = start = 0
        for ex in self.examples:
            pick, pick_norm = choose(scores[start:start + len(ex.endings)])
            start += len(ex.endings)
            correct += pick == ex.label
            correct_norm += pick_norm == ex.label
        right, right_norm, total = self.ctx.sum(torch.tensor([correct, correct_norm, len(self.examples)])).tolist()
        return {"acc": right / total, "acc_norm": right_norm / total}


# -- perplexity -------------------------------------------------------------------------------------


class Windows:
    """The (context, continuation) requests that score every token of some token arrays after the first:
    windows of block_size + 1 tokens that overlap by one, made as they are asked for."""

    def __init__(self, arrays: list[np.ndarray], block_size: int, limit: int | None = None):
        self.arrays, self.T = arrays, block_size
        self.starts = [(a, s) for a, arr in enumerate(arrays) for s in range(0, len(arr) - 1, block_size)][:limit]

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> tuple[list[int], list[int]]:
        a, s = self.starts[i]
        window = self.arrays[a][s:s + self.T + 1].tolist()
        return window[:1], window[1:]


class Perplexity:
    """Token-weighted mean loss and perplexity over a prepared split or a text file."""

    Options = PerplexityOptions

    def __init__(self, opts: PerplexityOptions, ctx):
        self.ctx = ctx
        self.batch_size = opts.batch_size or ctx.micro_batch
        if opts.path is not None:
            arrays = [self._encode_file(opts.path, ctx.tokenizer)]
        else:
            arrays = ctx.split(opts.split, opts.prepared)
        limit = opts.batches * self.batch_size if opts.batches else None
        windows = Windows(arrays, ctx.block_size, limit)
        if not len(windows):
            raise DataError(f"perplexity: {opts.path or opts.split} has fewer than 2 tokens")
        windows.starts = ctx.shard(windows.starts)  # this rank's share
        self.windows = windows
        self.batches = int(ctx.max(batches_needed(len(windows), self.batch_size)).item())

    @staticmethod
    def _encode_file(path: str, tok) -> np.ndarray:
        file = Path(path).expanduser()
        if not file.exists() and not file.is_symlink():
            raise DataError(f"{path}: no such text file")
        try:
            ids = tok.encode(safeio.read_text(file, limit=None))
        except safeio.BadContent as exc:
            raise DataError(str(exc)) from None
        except ValueError as exc:
            raise DataError(f"{path}: {exc}") from None
        # a document starts with end-of-text, as `prepare` writes it, so its first token is scored too
        return np.array(([tok.eot] if tok.eot is not None else []) + ids, dtype=np.int64)

    def __call__(self, model) -> dict[str, float]:
        scores = score_continuations(model, self.windows, block_size=self.ctx.block_size,
                                     batch_size=self.batch_size, device=self.ctx.device, batches=self.batches)
        logprob, tokens = self.ctx.sum(torch.tensor([sum(s.logprob for s in scores),
                                                     sum(s.tokens for s in scores)], dtype=torch.float64)).tolist()
        loss = -logprob / tokens
        return {"loss": loss, "ppl": math.exp(loss)}


# -- attention statistics ----------------------------------------------------------------------------


class AttentionStats:
    """Per-layer attention sink mass, entropy and mean distance on fixed validation windows."""

    Options = AttentionStatsOptions

    def __init__(self, opts: AttentionStatsOptions, ctx):
        self.ctx = ctx
        tokens = np.concatenate(ctx.split(opts.split, opts.prepared))
        T = min(opts.length or ctx.block_size, ctx.block_size, len(tokens))
        if T < 2:
            raise DataError(f"attention_stats: split {opts.split!r} has fewer than 2 tokens")
        # the same windows at every evaluation, on every rank (each takes part in every forward, as ZeRO 3 needs)
        starts = np.linspace(0, len(tokens) - T, opts.windows).astype(np.int64)
        self.windows = [torch.from_numpy(tokens[s:s + T].astype(np.int64))[None] for s in starts]  # each (1, T)

    @torch.no_grad()
    def __call__(self, model) -> dict[str, float]:
        module = getattr(model, "module", model)  # the Transformer inside a DeepSpeed engine
        sums: dict[str, float] = {}
        for window in self.windows:  # one at a time: the maps are (H, T, T) per layer
            with module.observe_attention() as maps:
                model(window.to(self.ctx.device))
                for layer, m in maps.layers().items():
                    for name, value in layer_stats(m).items():
                        key = f"L{layer}/{name}"
                        sums[key] = sums.get(key, 0.0) + value / len(self.windows)
        layers = sorted({k.split("/")[0] for k in sums}, key=lambda s: int(s[1:]))
        means = {name: sum(sums[f"{L}/{name}"] for L in layers) / len(layers) for name in STATS} if layers else {}
        return {**means, **sums}
