"""OLMo 2 checkpoints in Hugging Face layout <-> the composed :class:`~toolkit.model.Transformer`.

OLMo 2 (OLMo et al. 2024, "2 OLMo 2 Furious") is Llama's parts rearranged for stability: the norms
sit after each sublayer, before the residual add, and there are none on the sublayers' inputs
(``sandwich`` blocks with ``pre = false``); queries and keys are RMS-normalised over all heads'
projections at once (``qk_norm = "rmsnorm"``, ``qk_norm_scope = "all"``, with the model's eps);
no biases, an untied head, RoPE, SwiGLU, grouped-query attention where num_key_value_heads says so.
"""
from __future__ import annotations

from ..model import ModelConfig, Transformer
from .adapter import Adapter
from .common import ConfigReader, HFFormatError, unwrap
from .parts import FusedLayout, head_dtype, model_config
from .rope import rope_from_hf

_RENAME = {  # per-layer HF name -> ours (single tensors)
    "post_attention_layernorm.weight": "post_ln_1.weight",
    "post_feedforward_layernorm.weight": "post_ln_2.weight",
    "self_attn.q_norm.weight": "attn.q_norm.weight",
    "self_attn.k_norm.weight": "attn.k_norm.weight",
    "self_attn.o_proj.weight": "attn.c_proj.weight",
    "mlp.down_proj.weight": "mlp.c_proj.weight",
}
class Olmo2Adapter(FusedLayout, Adapter):
    """OLMo 2 (OLMo et al. 2024): norms after each sublayer, QK-norm over all heads, SwiGLU, RoPE, no biases."""

    model_type, hf_class, export_rank = "olmo2", "Olmo2ForCausalLM", 6
    rename = _RENAME
    # transformers' Olmo2Config defaults of the keys read
    defaults = {"hidden_act": "silu", "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "rope_theta": 10000.0}

    def read_config(self, r: ConfigReader, dropout: float) -> ModelConfig:
        where = r.where
        C, nh = r.need("hidden_size"), r.need("num_attention_heads")
        nkv = r.need("num_key_value_heads") if r.get("num_key_value_heads") else nh
        if r.get("attention_bias"):
            raise HFFormatError(f"{where}: attention_bias is not supported (OLMo 2 has no biases)")
        if r.get("hidden_act") != "silu":
            raise HFFormatError(f"{where}: hidden_act {r.get('hidden_act')!r} is not supported (OLMo 2's SwiGLU "
                                f"uses 'silu')")
        max_len = r.need("max_position_embeddings")
        return model_config(dict(
            vocab_size=r.need("vocab_size"),
            block_size=max_len,
            n_layer=r.need("num_hidden_layers"),
            n_head=nh,
            n_embd=C,
            # HF's Olmo2Attention takes config.head_dim when a config has one, else hidden_size / heads
            head_dim=r.need("head_dim") if r.get("head_dim") else None,
            dropout=dropout,
            bias=False,
            tie_embeddings=bool(r.get("tie_word_embeddings")),
            block={"kind": "sandwich", "pre": False},
            attention={"kind": "gqa", "n_kv_head": nkv, "qk_norm": "rmsnorm", "qk_norm_scope": "all"},
            norm={"kind": "rmsnorm", "eps": r.need("rms_norm_eps", float)},  # the q/k norms take it too
            position={"kind": "rope", "theta": rope_from_hf(r, max_len, scaled=False)["theta"]},
            mlp={"kind": "swiglu", "hidden_dim": r.need("intermediate_size")},
        ))


    def config_to_hf(self, model: Transformer) -> dict:
        """The HF ``config.json`` dict for a model OLMo 2 can express; HFFormatError says why not otherwise."""
        model = unwrap(model)
        cfg = model.config
        wants = {"block": "sandwich", "norm": "rmsnorm", "position": "rope", "mlp": "swiglu"}
        problems = [f"{fam} {getattr(cfg, fam).kind!r} (OLMo 2 has {kind!r})" for fam, kind in wants.items()
                    if getattr(cfg, fam).kind != kind]
        if cfg.attention.kind not in ("gqa", "mha", "mqa"):
            problems.append(f"attention {cfg.attention.kind!r} (OLMo 2 has gqa)")
        if cfg.layers:
            problems.append(f"layers with components of their own ({', '.join(cfg.layers)})")
        if cfg.bias:
            problems.append("biases (OLMo 2 has none)")
        if cfg.embedding_multiplier is not None or cfg.logit_softcap is not None:
            problems.append("embedding_multiplier / logit_softcap (OLMo 2 has neither)")
        if not problems:
            attn, block = model.transformer.h[0].attn, cfg.block.options
            if block.pre or not block.post:
                problems.append("sandwich blocks with input norms or without output norms (OLMo 2: pre = false, post = true)")
            if cfg.norm.options.offset != 0.0:
                problems.append(f"rmsnorm offset {cfg.norm.options.offset} (OLMo 2 scales by the weight)")
            o = cfg.attention.options
            if o.qk_norm != "rmsnorm" or o.qk_norm_scope != "all":
                problems.append(f"qk_norm {o.qk_norm!r} over {o.qk_norm_scope!r} (OLMo 2: 'rmsnorm' over 'all' heads)")
            if o.softcap is not None or o.scale is not None:
                problems.append("attention softcap / scale (OLMo 2 has neither)")
            if cfg.position.options.fraction != 1.0:
                problems.append(f"rope fraction {cfg.position.options.fraction} (OLMo 2 rotates whole heads)")
        if problems:
            raise HFFormatError(f"cannot export as OLMo 2: unsupported {'; '.join(problems)}")
        hs = cfg.head_dim or cfg.n_embd // cfg.n_head
        out = {
            "architectures": ["Olmo2ForCausalLM"],
            "model_type": "olmo2",
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.n_embd,
            "intermediate_size": model.transformer.h[0].mlp.hidden,
            "num_hidden_layers": cfg.n_layer,
            "num_attention_heads": cfg.n_head,
            "num_key_value_heads": attn.n_kv_head,
            "hidden_act": "silu",
            "max_position_embeddings": cfg.block_size,
            "rms_norm_eps": cfg.norm.options.eps,
            "tie_word_embeddings": cfg.tie_embeddings,
            "rope_theta": cfg.position.options.theta,  # as transformers 4 wrote it; transformers 5 reads it too
            "attention_bias": False,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "torch_dtype": head_dtype(model),
        }
        if hs != cfg.n_embd // cfg.n_head or cfg.n_embd % cfg.n_head:
            out["head_dim"] = hs  # HF's Olmo2Attention reads it when present
        return out
