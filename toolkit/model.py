"""The composed decoder-only transformer.

The model names no concrete component: attention, norm, position and MLP come from the registry
by the kinds in :class:`ModelConfig`, and obey the contracts in :mod:`toolkit.contracts`.
Parameter names follow the GPT-2 checkpoint (``transformer.wte``, ``transformer.wpe``,
``transformer.h.0.attn.c_attn``, ``transformer.ln_f``, ``lm_head``) so weights load by name.

References: GPT-2 (Radford et al. 2019), nanoGPT (Karpathy), Attention Is All You Need (Vaswani et al. 2017).
"""
from __future__ import annotations

import math
from typing import Callable, Literal

import attrs
import torch
import torch.nn.functional as F
from attrs import validators as v
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import resolve_specs
from .contracts import Dims, Position, flops_per_token
from .families import SPEC_TYPES, components
from .plugin_manager import default_registry
from .registry import Registry

# the Spec of each model family, by the names older code imports
AttentionSpec, NormSpec, PositionSpec, MlpSpec = (SPEC_TYPES[f] for f in ("attention", "norm", "position", "mlp"))


def _positive(_, attribute, value):
    if value <= 0:
        raise ValueError(f"{attribute.name} must be > 0, got {value}")


@attrs.frozen
@components("model")  # attention, norm, position, mlp: one field each (toolkit.families)
class ModelConfig:
    """The model's shape and its components. Defaults are GPT-2 124M (vocab padded to 50304)."""

    vocab_size: int = attrs.field(default=50304, validator=[v.instance_of(int), _positive])
    block_size: int = attrs.field(default=1024, validator=[v.instance_of(int), _positive])
    n_layer: int = attrs.field(default=12, validator=[v.instance_of(int), _positive])
    n_head: int = attrs.field(default=12, validator=[v.instance_of(int), _positive])
    n_embd: int = attrs.field(default=768, validator=[v.instance_of(int), _positive])
    dropout: float = attrs.field(default=0.0, converter=float, validator=[v.ge(0.0), v.lt(1.0)])
    bias: bool = attrs.field(default=True, validator=v.instance_of(bool))
    tie_embeddings: bool = attrs.field(default=True, validator=v.instance_of(bool))
    layout: Literal["pre", "post"] = attrs.field(default="pre", validator=v.in_(("pre", "post")))

    def __attrs_post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")

    def dims(self, build: Callable | None = None) -> Dims:
        return Dims(self.n_embd, self.n_head, self.n_layer, self.block_size, self.vocab_size,
                    self.dropout, self.bias, build)


class Block(nn.Module):
    """One residual block: attention then MLP, each wrapped by a norm and a residual connection."""

    def __init__(self, config: ModelConfig, dims: Dims, build: Callable):
        super().__init__()
        self.ln_1 = build("norm", config.norm, dims, config.n_embd)
        self.attn = build("attention", config.attention, dims)
        self.ln_2 = build("norm", config.norm, dims, config.n_embd)
        self.mlp = build("mlp", config.mlp, dims)
        self.post_norm = config.layout == "post"

    def forward(self, x, position: Position, pos: torch.Tensor, cache: dict | None = None):
        if self.post_norm:  # original Transformer (Vaswani et al. 2017): normalise after each residual add
            x = self.ln_1(x + self.attn(x, position, pos, cache))
            return self.ln_2(x + self.mlp(x))
        # pre-norm (GPT-2): the residual stream stays un-normalised, which keeps deep stacks trainable
        x = x + self.attn(self.ln_1(x), position, pos, cache)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A GPT: token embedding, positional component, N blocks, final norm, LM head."""

    def __init__(self, config: ModelConfig, registry: Registry | None = None):
        super().__init__()
        registry = default_registry() if registry is None else registry
        self.config = config = resolve_specs(registry, config)  # typed options for every component
        build = registry.build_in

        dims = config.dims(build)
        C, V = config.n_embd, config.vocab_size
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(V, C),
                wpe=build("position", config.position, dims),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config, dims, build) for _ in range(config.n_layer)]),
                # post-norm blocks already end in a norm; a second one would only add parameters
                ln_f=build("norm", config.norm, dims, C) if config.layout == "pre" else nn.Identity(),
            )
        )
        if not isinstance(self.transformer.wpe, Position):
            raise TypeError(f"position {config.position.kind!r} must build a toolkit.contracts.Position")
        self.lm_head = nn.Linear(C, V, bias=False)
        if config.tie_embeddings:  # weight tying (Press & Wolf 2017), as in GPT-2
            self.lm_head.weight = self.transformer.wte.weight
        self.activation_checkpointing = False
        self.apply(self._init_weights)
        # GPT-2: scale the init of projections into the residual stream by 1/sqrt(2 * n_layer),
        # since each block adds two such contributions to the residual stream.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    # -- forward ---------------------------------------------------------------------------
    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                cache: list[dict] | None = None, start_pos: int = 0, last_only: bool = False):
        """idx (B, T) token ids -> (logits (B, T, V) or (B, 1, V) if last_only, loss or None)."""
        B, T = idx.shape
        position: Position = self.transformer.wpe
        if position.max_len is not None and start_pos + T > position.max_len:
            raise ValueError(f"sequence of {start_pos + T} tokens exceeds the positional limit {position.max_len}")
        pos = torch.arange(start_pos, start_pos + T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.wte(idx)  # (B, T, C)
        x = self.transformer.drop(position.embed(x, pos))
        for i, block in enumerate(self.transformer.h):
            layer_cache = cache[i] if cache is not None else None
            if self.activation_checkpointing and self.training and layer_cache is None:
                x = checkpoint(block, x, position, pos, use_reentrant=False)
            else:
                x = block(x, position, pos, layer_cache)
        x = self.transformer.ln_f(x)
        if last_only:
            x = x[:, [-1], :]  # (B, 1, C): generation needs only the next token's logits
        logits = self.lm_head(x)  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1), ignore_index=-1)
        return logits, loss

    # -- generation ------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 use_cache: bool = True, on_token: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
        """Append ``max_new_tokens`` sampled tokens to idx (B, T); temperature 0 is greedy.

        With ``use_cache`` each step feeds only the new token through a KV cache. Once the text
        outgrows ``block_size`` the context is cropped to the last ``block_size`` tokens and
        recomputed, exactly as without a cache, so both give the same tokens.
        """
        was_training = self.training
        self.eval()
        gen = None
        if seed is not None:
            gen = torch.Generator(device=idx.device).manual_seed(seed)
        limit = self.config.block_size
        cache, n_cached = None, 0
        try:
            for _ in range(max_new_tokens):
                if use_cache and idx.size(1) <= limit:
                    if cache is None:
                        cache = [{} for _ in self.transformer.h]
                    logits, _ = self(idx[:, n_cached:], cache=cache, start_pos=n_cached, last_only=True)
                    n_cached = idx.size(1)
                else:
                    logits, _ = self(idx[:, -limit:], last_only=True)
                nxt = sample_next(logits[:, -1, :], temperature, top_k, top_p, gen)  # (B, 1)
                idx = torch.cat((idx, nxt), dim=1)
                if on_token is not None:
                    on_token(nxt)
        finally:
            self.train(was_training)
        return idx

    # -- accounting ------------------------------------------------------------------------
    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; by default without position parameters (as nanoGPT reports it)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= sum(p.numel() for p in self.transformer.wpe.parameters())
        return n

    def component_report(self, seq_len: int | None = None) -> list[dict]:
        """Parameters and forward FLOPs per token, per component (summed over layers), plus totals."""
        T = seq_len or self.config.block_size
        rows: dict[str, dict] = {}

        def add(name, kind, module):
            row = rows.setdefault(name, dict(component=name, kind=kind, params=0, flops_per_token=0))
            row["params"] += sum(p.numel() for p in module.parameters())
            row["flops_per_token"] += flops_per_token(module, T)

        cfg = self.config
        add("embedding", "wte", self.transformer.wte)
        add("position", cfg.position.kind, self.transformer.wpe)
        for block in self.transformer.h:
            add("attention", cfg.attention.kind, block.attn)
            add("norm", cfg.norm.kind, block.ln_1)
            add("norm", cfg.norm.kind, block.ln_2)
            add("mlp", cfg.mlp.kind, block.mlp)
        add("norm", cfg.norm.kind, self.transformer.ln_f)
        head = rows.setdefault("lm_head", dict(component="lm_head", kind="tied" if cfg.tie_embeddings else "linear",
                                               params=0, flops_per_token=0))
        head["params"] = 0 if cfg.tie_embeddings else self.lm_head.weight.numel()
        head["flops_per_token"] = 2 * self.lm_head.weight.numel()
        rows["embedding"]["flops_per_token"] = 0  # a lookup, not a matmul
        out = list(rows.values())
        out.append(dict(component="total", kind="", params=sum(r["params"] for r in out),
                        flops_per_token=sum(r["flops_per_token"] for r in out)))
        return out

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Forward FLOPs per token; training costs about three times this (forward + backward)."""
        return self.component_report(seq_len)[-1]["flops_per_token"]


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample one token id per row of logits (B, V) -> (B, 1)."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # nucleus sampling (Holtzman et al. 2019): keep the smallest set whose probability reaches top_p
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) >= top_p
        drop[..., 0] = False  # the most likely token is always kept (top_p = 0 would otherwise drop all)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)
