"""The code of toolkit.plugins.attention's parts, imported when one is built (their options and docs are there)."""
from __future__ import annotations

from torch import nn

from toolkit.contracts import Dims, attend, flops_per_token, update_cache
from toolkit.errors import ConfigError
from toolkit.plugins.attention import AttentionOptions, GQAOptions, SlidingWindowOptions


class GroupedQueryAttention(nn.Module):
    """Grouped-query attention (Ainslie et al. 2023): groups of query heads share a key/value head."""

    Options = GQAOptions
    window: int | None = None  # None: full causal attention
    growing: int | None = None  # the window while it grows in training (SlidingWindowAttention.set_progress)

    def __init__(self, opts: AttentionOptions, dims: Dims, n_kv_head: int | None = None):
        super().__init__()
        C, nh, hs = dims.n_embd, dims.n_head, dims.head_dim
        nkv = n_kv_head or getattr(opts, "n_kv_head", None) or nh
        if nh % nkv:
            raise ConfigError([f"model.attention.n_kv_head ({nkv}) must divide model.n_head ({nh})"])
        self.n_head, self.n_kv_head, self.head_dim, self.backend = nh, nkv, hs, opts.backend
        self.softcap, self.scale = opts.softcap, dims.attention_scale(hs, opts.scale)  # muP: 1/d (contracts)
        # rows: [q for nh heads; k for nkv heads; v for nkv heads], one matmul for all three
        self.c_attn = nn.Linear(C, (nh + 2 * nkv) * hs, bias=dims.bias)
        self.c_proj = nn.Linear(nh * hs, C, bias=dims.bias)
        self.q_norm = self.k_norm = None
        self.qk_norm_all = opts.qk_norm_scope == "all"
        if opts.qk_norm is not None:  # separate weights for queries and keys (as OLMo 2 and Qwen 3 do)
            self.q_norm = _build_norm(dims, opts.qk_norm, nh * hs if self.qk_norm_all else hs)
            self.k_norm = _build_norm(dims, opts.qk_norm, nkv * hs if self.qk_norm_all else hs)
        self.dropout = dims.dropout
        self.resid_dropout = nn.Dropout(dims.dropout)

    def forward(self, x, position, pos, cache=None):
        return self.resid_dropout(self.c_proj(self.heads(x, position, pos, cache)))

    def heads(self, x, position, pos, cache=None, state=None):
        """The heads' outputs side by side, (B, T, nh*hs): what c_proj mixes back into the residual stream."""
        B, T, C = x.shape
        nh, nkv, hs = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.c_attn(x).split([nh * hs, nkv * hs, nkv * hs], dim=2)  # (B, T, nh*hs), 2 x (B, T, nkv*hs)
        if self.q_norm is not None and self.qk_norm_all:  # over every head's numbers at once (OLMo 2)
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        if self.q_norm is not None and not self.qk_norm_all:
            q, k = self.q_norm(q), self.k_norm(k)  # normalised over hs, per head and token
        v = self.mix_values(v, state)
        q, k = position.rotate(q, k, pos)
        k, v, k_pos = self.update_cache(cache, k, v, pos)  # (B, nkv, T_past + T, hs), positions (T_past + T,)
        window = self.growing if self.training and self.growing is not None else self.window
        y = attend(q, k, v, pos, k_pos, position, dropout=self.dropout if self.training else 0.0,
                   window=window, softcap=self.softcap, scale=self.scale, backend=self.backend)  # (B, nh, T, hs)
        return y.transpose(1, 2).contiguous().view(B, T, nh * hs)  # (B, T, nh*hs): heads side by side again

    def update_cache(self, cache, k, v, pos):
        return update_cache(cache, k, v, pos)

    def mix_values(self, v, state):
        """This step's values (B, nkv, T, hs) before caching; a subclass may mix in the per-forward state's."""
        return v

    def context(self, seq_len: int) -> int:
        """How many keys a query attends to, at most, in a sequence of seq_len."""
        return seq_len if self.window is None else min(self.window, seq_len)

    def flops_per_token(self, seq_len: int) -> int:
        # projections, plus QK^T and AV: 2 * 2 * context * hs for each query head (PaLM's 12*L*H*Q*T / 3)
        proj = 2 * (self.c_attn.weight.numel() + self.c_proj.weight.numel())
        norms = 0
        if self.q_norm is not None and self.qk_norm_all:
            norms = flops_per_token(self.q_norm, seq_len) + flops_per_token(self.k_norm, seq_len)
        elif self.q_norm is not None:  # applied to nh query vectors and nkv key vectors per token
            norms = self.n_head * flops_per_token(self.q_norm, seq_len) + self.n_kv_head * flops_per_token(self.k_norm, seq_len)
        return proj + norms + 4 * self.context(seq_len) * self.n_head * self.head_dim


class MultiHeadAttention(GroupedQueryAttention):
    """Causal multi-head self-attention (Vaswani et al. 2017) with GPT-2's fused qkv projection."""

    Options = AttentionOptions

    def __init__(self, opts: AttentionOptions, dims: Dims):
        super().__init__(opts, dims, n_kv_head=dims.n_head)


class MultiQueryAttention(GroupedQueryAttention):
    """Multi-query attention (Shazeer 2019): all query heads share one key/value head."""

    Options = AttentionOptions

    def __init__(self, opts: AttentionOptions, dims: Dims):
        super().__init__(opts, dims, n_kv_head=1)


class SlidingWindowAttention(GroupedQueryAttention):
    """Causal attention over the last `window` tokens only; its KV cache stays `window` long."""

    # Local banded attention: Child et al. 2019 (Sparse Transformers), Beltagy et al. 2020
    # (Longformer), Jiang et al. 2023 (Mistral 7B, with a rolling KV cache like this one).
    Options = SlidingWindowOptions

    def __init__(self, opts: SlidingWindowOptions, dims: Dims):
        super().__init__(opts, dims)
        self.window = opts.window
        if opts.window_start is not None and opts.window_start > opts.window:
            raise ConfigError([f"model.attention.window_start ({opts.window_start}) must not exceed window ({opts.window})"])
        self.window_start, self.window_growth = opts.window_start, opts.window_growth

    def set_progress(self, step: int, max_steps: int) -> None:
        """The trainer's call before each step (contract: toolkit.contracts.set_progress)."""
        if self.window_start is None or self.window is None:
            return
        frac = min(1.0, step / (self.window_growth * max_steps))
        w = self.window_start + frac * (self.window - self.window_start)
        self.growing = min(self.window, self.window_start * int(w // self.window_start))

    def update_cache(self, cache, k, v, pos):
        k, v, k_pos = update_cache(cache, k, v, pos)
        if cache is not None and self.window is not None and k_pos.size(0) > self.window:
            # Every later query sits after the last cached key, so it can see at most window - 1 of them:
            # keeping the last `window` keys, values and positions is enough, and memory stays bounded.
            w = self.window
            cache["k"], cache["v"], cache["pos"] = k[:, :, -w:], v[:, :, -w:], k_pos[-w:]  # (B, nkv, w, hs), (w,)
        return k, v, k_pos


def _build_norm(dims: Dims, kind: str, dim: int) -> nn.Module:
    """A registered norm over `dim`, built through the model's registry (dims.build).

    Of the layer's own norm kind, it takes that norm's options too (eps; Gemma's offset): OLMo 2,
    Qwen 3 and Gemma 3 all build their q/k norms with the model's rms_norm_eps."""
    if dims.build is None:
        raise ValueError("qk_norm needs dims.build (the model passes it; build Dims through ModelConfig.dims)")
    layer_norm = dims.parts.get("norm")
    return dims.build("norm", layer_norm if layer_norm is not None and layer_norm.kind == kind else kind, dims, dim)
