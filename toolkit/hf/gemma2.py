"""Gemma 2 checkpoints in Hugging Face layout <-> the composed :class:`~toolkit.model.Transformer`.

Gemma 2 (Gemma Team 2024) in this toolkit's parts: sandwich blocks (an RMSNorm before and after
attention and the MLP), RMSNorm scaling by (1 + weight) (``offset = 1.0``: HF's weights load as they
are), token embeddings times sqrt(hidden) in the model's dtype (``embedding_multiplier``), GeGLU with
the tanh GELU, grouped-query attention with heads of their own width (``head_dim``), attention logits
soft-capped at 50 (``softcap``) and scaled by ``query_pre_attn_scalar**-0.5`` (``scale``, when that
is not ``head_dim``), output logits soft-capped at 30 (``logit_softcap``), tied embeddings, RoPE.

Local and global attention alternate: HF's ``layer_types`` (by default layer i is
"sliding_attention" when i is even, so layer 0 is local) become a ``sliding_window`` model attention
and a layer group ``global`` of ``gqa`` layers (``at = "1::2"`` for the default pattern). HF's
window and ours mean the same: a query at p sees keys at p - window + 1 .. p.
"""
from __future__ import annotations

import math

from ..model import ModelConfig, Transformer, select_layers
from .adapter import Adapter
from .common import ConfigReader, HFFormatError, unwrap
from .parts import FusedLayout, head_dtype, model_config
from .rope import rope_from_hf

# HF hidden_activation -> our geglu's `approximate`
_GELU_APPROX = {"gelu_pytorch_tanh": "tanh", "gelu_new": "tanh", "gelu": "none"}
_RENAME = {  # per-layer HF name -> ours (single tensors)
    "input_layernorm.weight": "ln_1.weight",
    "post_attention_layernorm.weight": "post_ln_1.weight",
    "pre_feedforward_layernorm.weight": "ln_2.weight",
    "post_feedforward_layernorm.weight": "post_ln_2.weight",
    "self_attn.o_proj.weight": "attn.c_proj.weight",
    "mlp.down_proj.weight": "mlp.c_proj.weight",
}
_SLIDING, _FULL = "sliding_attention", "full_attention"


def _layer_types(r: ConfigReader, n_layer: int, where: str) -> list[str]:
    """Which layers are local: ``layer_types``, or HF's default (even layers sliding, odd global)."""
    types = r.get("layer_types")
    if types is None:
        return [_SLIDING if (i + 1) % 2 else _FULL for i in range(n_layer)]
    if not isinstance(types, list) or len(types) != n_layer or not set(types) <= {_SLIDING, _FULL}:
        raise HFFormatError(f"{where}: layer_types must list {n_layer} of '{_SLIDING}' / '{_FULL}', got {types!r}")
    return types


def _slice_text(indices: list[int], n_layer: int) -> str | list[int]:
    """``indices`` as a slice ("1::2") where one says it exactly, else the list."""
    if len(indices) > 1:
        step = indices[1] - indices[0]
        text = f"{indices[0]}::{step}"
        if step > 0 and select_layers(text, n_layer) == indices:
            return text
    return indices


class Gemma2Adapter(FusedLayout, Adapter):
    """Gemma 2 (Gemma Team 2024): sandwich norms, GeGLU, soft-capped logits, local and global attention in turn."""

    model_type, hf_class, export_rank = "gemma2", "Gemma2ForCausalLM", 5
    rename = _RENAME
    # transformers' Gemma2Config defaults of the keys read
    defaults = {"max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
                "rope_theta": 10000.0, "query_pre_attn_scalar": 256, "attn_logit_softcapping": 50.0,
                "final_logit_softcapping": 30.0, "sliding_window": 4096}

    def read_config(self, r: ConfigReader, dropout: float) -> ModelConfig:
        where = r.where
        C, nh, L = r.need("hidden_size"), r.need("num_attention_heads"), r.need("num_hidden_layers")
        hidden, vocab = r.need("intermediate_size"), r.need("vocab_size")
        nkv = r.need("num_key_value_heads") if r.get("num_key_value_heads") else nh
        hs = r.need("head_dim") if r.get("head_dim") else 256  # Gemma2Config's default
        if r.get("attention_bias"):
            raise HFFormatError(f"{where}: attention_bias is not supported (Gemma 2 has no biases)")
        if r.get("use_bidirectional_attention"):
            raise HFFormatError(f"{where}: use_bidirectional_attention is not supported (causal decoders only)")
        act = r.get("hidden_activation") or "gelu_pytorch_tanh"
        r.get("hidden_act")  # HF's Gemma2MLP reads only hidden_activation; older files carry both
        if act not in _GELU_APPROX:
            raise HFFormatError(f"{where}: hidden_activation {act!r} is not supported "
                                f"(expected one of: {', '.join(_GELU_APPROX)})")
        max_len = r.need("max_position_embeddings")
        rope = rope_from_hf(r, max_len, scaled=False)
        qpas = r.get("query_pre_attn_scalar")
        if not isinstance(qpas, (int, float)) or isinstance(qpas, bool) or qpas <= 0:
            raise HFFormatError(f"{where}: query_pre_attn_scalar must be a positive number, got {qpas!r}")
        scale = None if qpas == hs else float(qpas) ** -0.5  # HF: scaling = query_pre_attn_scalar**-0.5
        attn_cap = r.get("attn_logit_softcapping")
        shared = {"n_kv_head": nkv, **({"softcap": float(attn_cap)} if attn_cap is not None else {}),
                  **({"scale": scale} if scale is not None else {})}
        types = _layer_types(r, L, where)
        local = [i for i, t in enumerate(types) if t == _SLIDING]
        full = [i for i, t in enumerate(types) if t == _FULL]
        window = r.get("sliding_window")
        if local and (window is None or isinstance(window, bool) or not isinstance(window, int) or window <= 0):
            raise HFFormatError(f"{where}: sliding_window must be a positive integer for the sliding layers {local}, "
                                f"got {window!r}")
        if r.get("sliding_window_size") not in (None, window):
            raise HFFormatError(f"{where}: sliding_window_size {r.get('sliding_window_size')} differs from "
                                f"sliding_window {window}")
        attention = {"kind": "sliding_window", "window": window, **shared} if local else {"kind": "gqa", **shared}
        layers = {"global": {"at": _slice_text(full, L), "attention": {"kind": "gqa", **shared}}} if local and full else {}
        final_cap = r.get("final_logit_softcapping")
        return model_config(dict(
            vocab_size=vocab,
            block_size=max_len,
            n_layer=L,
            n_head=nh,
            n_embd=C,
            head_dim=hs,
            dropout=dropout,
            bias=False,
            tie_embeddings=bool(r.get("tie_word_embeddings")),
            embedding_multiplier=C**0.5,  # HF: hidden_size**0.5, cast to the weights' dtype before multiplying
            logit_softcap=float(final_cap) if final_cap is not None else None,
            block={"kind": "sandwich"},
            attention=attention,
            norm={"kind": "rmsnorm", "eps": r.need("rms_norm_eps", float), "offset": 1.0},
            position={"kind": "rope", "theta": rope["theta"]},
            mlp={"kind": "geglu", "hidden_dim": hidden, "approximate": _GELU_APPROX[act]},
            layers=layers,
        ))


    def config_to_hf(self, model: Transformer) -> dict:
        """The HF ``config.json`` dict for a model Gemma 2 can express; HFFormatError says why not otherwise."""
        model = unwrap(model)
        cfg = model.config
        problems = []
        wants = {"block": "sandwich", "norm": "rmsnorm", "position": "rope", "mlp": "geglu"}
        problems += [f"{fam} {getattr(cfg, fam).kind!r} (Gemma 2 has {kind!r})" for fam, kind in wants.items()
                     if getattr(cfg, fam).kind != kind]
        if any(g.block or g.norm or g.mlp or g.position for g in cfg.layers.values()):
            problems.append("layers with their own block, norm, MLP or position (Gemma 2's differ only in attention)")
        types, shared, window, attn_problems = _attention_plan(model)
        problems += attn_problems
        if not problems:
            block, norm, rope = cfg.block.options, cfg.norm.options, cfg.position.options
            if not (block.pre and block.post):
                problems.append("sandwich blocks without pre or post norms (Gemma 2 has both)")
            if norm.offset != 1.0:
                problems.append(f"rmsnorm offset {norm.offset} (Gemma 2 scales by 1 + weight)")
            if rope.fraction != 1.0:
                problems.append(f"rope fraction {rope.fraction} (Gemma 2 rotates whole heads)")
        if cfg.bias:
            problems.append("biases (Gemma 2 has none)")
        if cfg.embedding_multiplier is None or not math.isclose(cfg.embedding_multiplier, cfg.n_embd**0.5, rel_tol=1e-12):
            problems.append(f"embedding_multiplier {cfg.embedding_multiplier} (Gemma 2 multiplies by sqrt(n_embd) "
                            f"= {cfg.n_embd**0.5:g})")
        hs = cfg.head_dim or cfg.n_embd // cfg.n_head
        qpas = hs
        if shared.get("scale") is not None:
            qpas = shared["scale"] ** -2
            if not math.isclose(qpas, round(qpas), rel_tol=1e-9):
                problems.append(f"attention scale {shared['scale']} (Gemma 2's is an integer query_pre_attn_scalar**-0.5)")
            qpas = round(qpas)
        if problems:
            raise HFFormatError(f"cannot export as Gemma 2: unsupported {'; '.join(problems)}")
        mlp = cfg.mlp.options
        return {
            "architectures": ["Gemma2ForCausalLM"],
            "model_type": "gemma2",
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.n_embd,
            "intermediate_size": model.transformer.h[0].mlp.hidden,
            "num_hidden_layers": cfg.n_layer,
            "num_attention_heads": cfg.n_head,
            "num_key_value_heads": shared["n_kv_head"],
            "head_dim": hs,
            "hidden_activation": "gelu_pytorch_tanh" if mlp.approximate == "tanh" else "gelu",
            "max_position_embeddings": cfg.block_size,
            "rms_norm_eps": cfg.norm.options.eps,
            "tie_word_embeddings": cfg.tie_embeddings,
            "rope_theta": cfg.position.options.theta,  # as transformers 4 wrote it; transformers 5 reads it too
            "attention_bias": False,
            "attention_dropout": 0.0,
            "query_pre_attn_scalar": qpas,
            "sliding_window": window if window is not None else cfg.block_size,
            "layer_types": types,
            "attn_logit_softcapping": shared["softcap"],
            "final_logit_softcapping": cfg.logit_softcap,
            "initializer_range": 0.02,
            "pad_token_id": 0,
            "eos_token_id": 1,
            "bos_token_id": 2,
            "torch_dtype": head_dtype(model),
        }


# -- export helpers -------------------------------------------------------------------------------
def _attention_plan(model: Transformer) -> tuple[list[str], dict, int | None, list[str]]:
    """Per-layer HF layer_types, the options every layer shares, the window, and what Gemma 2 cannot say.

    Read from the built attention modules: a layer group's spec keeps its options unresolved."""
    cfg = model.config
    types, shared, windows, problems = [], None, set(), []
    for i, block in enumerate(model.transformer.h):
        kind, attn = cfg.spec_at("attention", i).kind, block.attn
        if kind not in ("sliding_window", "gqa", "mha", "mqa"):
            problems.append(f"attention {kind!r} at layer {i} (Gemma 2 has sliding_window and gqa)")
            continue
        types.append(_SLIDING if kind == "sliding_window" else _FULL)
        if kind == "sliding_window":
            windows.add(attn.window)
        if attn.q_norm is not None:
            problems.append("attention qk_norm (Gemma 2 has none)")
        mine = dict(n_kv_head=attn.n_kv_head, softcap=attn.softcap, scale=attn.scale)
        if shared is not None and mine != shared:
            problems.append(f"attention options differ between layers ({shared} vs {mine} at layer {i})")
        shared = shared or mine
    if len(windows) > 1:
        problems.append(f"sliding windows of different sizes {sorted(windows)}")
    return types, shared or {}, (windows.pop() if windows else None), problems
