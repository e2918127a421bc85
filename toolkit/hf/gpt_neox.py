"""GPT-NeoX / Pythia checkpoints in Hugging Face layout <-> the composed :class:`~toolkit.model.Transformer`.

GPT-NeoX (Black et al. 2022) and Pythia (Biderman et al. 2023) in this toolkit's parts: multi-head
attention with biases, partial rotary positions (``rotary_pct`` of each head rotates: a rope
``fraction``; ``rotary_emb_base`` is its ``theta``), LayerNorm with biases, a GELU MLP (exact or tanh
per ``hidden_act``), an untied output head (``embed_out``), and a parallel residual with a norm per
branch when ``use_parallel_residual`` (a ``parallel`` block with ``shared_norm = false``: x +
attn(ln_1(x)) + mlp(ln_2(x))), else a sequential ``pre_norm`` block.

The one twist is the fused ``query_key_value`` weight: its rows are grouped per head, [q_h; k_h; v_h]
for h = 0 .. nh-1, where our ``c_attn`` stacks all queries, then all keys, then all values. The
rows (and biases) are permuted on the way in and back on the way out.
"""
from __future__ import annotations

import torch

from ..model import ModelConfig, Transformer
from .adapter import Adapter
from .common import ConfigReader, HFFormatError, unwrap
from .parts import head_dtype, layer_tensors, model_config
from .rope import rope_from_hf

# HF hidden_act -> our gelu MLP's `approximate`
_GELU_APPROX = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}
_RENAME = {  # per-layer HF name (below gpt_neox.layers.<i>.) -> ours; query_key_value is permuted separately
    "input_layernorm.weight": "ln_1.weight",
    "input_layernorm.bias": "ln_1.bias",
    "post_attention_layernorm.weight": "ln_2.weight",
    "post_attention_layernorm.bias": "ln_2.bias",
    "attention.dense.weight": "attn.c_proj.weight",
    "attention.dense.bias": "attn.c_proj.bias",
    "mlp.dense_h_to_4h.weight": "mlp.c_fc.weight",
    "mlp.dense_h_to_4h.bias": "mlp.c_fc.bias",
    "mlp.dense_4h_to_h.weight": "mlp.c_proj.weight",
    "mlp.dense_4h_to_h.bias": "mlp.c_proj.bias",
}
_OUTER = {
    "gpt_neox.embed_in.weight": "transformer.wte.weight",
    "gpt_neox.final_layer_norm.weight": "transformer.ln_f.weight",
    "gpt_neox.final_layer_norm.bias": "transformer.ln_f.bias",
    "embed_out.weight": "lm_head.weight",  # transformers 5 calls it lm_head in memory, embed_out on disk
    "lm_head.weight": "lm_head.weight",
}
# buffers older checkpoints saved: the causal mask, its fill value, RoPE's inverse frequencies
_BUFFERS = ("attention.bias", "attention.masked_bias", "attention.rotary_emb.inv_freq")


def _per_head_to_stacked(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """query_key_value rows [q_0; k_0; v_0; q_1; ...] -> c_attn rows [q_0; q_1; ...; k_0; ...; v_0; ...]."""
    rest = t.shape[1:]
    per_head = t.reshape(n_head, 3, t.size(0) // (3 * n_head), *rest)  # (nh, 3, hs, ...)
    return per_head.transpose(0, 1).reshape(t.shape)  # (3, nh, hs, ...) -> (3*nh*hs, ...)


def _stacked_to_per_head(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of :func:`_per_head_to_stacked`."""
    rest = t.shape[1:]
    stacked = t.reshape(3, n_head, t.size(0) // (3 * n_head), *rest)  # (3, nh, hs, ...)
    return stacked.transpose(0, 1).reshape(t.shape)  # (nh, 3, hs, ...) -> (nh*3*hs, ...)


class GPTNeoXAdapter(Adapter):
    """GPT-NeoX and Pythia (Black et al. 2022): partial rotary, LayerNorm and biases, a parallel residual."""

    model_type, hf_class, export_rank = "gpt_neox", "GPTNeoXForCausalLM", 7
    # transformers' GPTNeoXConfig defaults of the keys read; intermediate_size is required: its default
    # (24576) is not 4 * hidden_size
    defaults = {"hidden_act": "gelu", "max_position_embeddings": 2048, "layer_norm_eps": 1e-5,
                "tie_word_embeddings": False, "use_parallel_residual": True, "attention_bias": True,
                "rotary_pct": 0.25, "rotary_emb_base": 10000.0}

    def read_config(self, r: ConfigReader, dropout: float) -> ModelConfig:
        where = r.where
        C, nh = r.need("hidden_size"), r.need("num_attention_heads")
        n_layer, hidden, vocab = r.need("num_hidden_layers"), r.need("intermediate_size"), r.need("vocab_size")
        if C % nh:
            raise HFFormatError(f"{where}: hidden_size {C} is not divisible by num_attention_heads {nh}")
        if r.get("attention_bias") is not True:
            raise HFFormatError(f"{where}: attention_bias = false is not supported (GPT-NeoX's biases are all or "
                                "none here, and its MLP and norms always have them)")
        act = r.get("hidden_act")
        if act not in _GELU_APPROX:
            raise HFFormatError(f"{where}: hidden_act {act!r} is not supported (expected one of: "
                                f"{', '.join(_GELU_APPROX)})")
        max_len = r.need("max_position_embeddings")
        rope = rope_from_hf(r, max_len, scaled=False, theta_key="rotary_emb_base", fraction_key="rotary_pct",
                            partial=True)
        fraction = rope["fraction"]
        rotary = int(C // nh * fraction)  # HF: int(head_size * partial_rotary_factor) dimensions rotate
        if rotary % 2 or rotary == 0 or fraction > 1:
            raise HFFormatError(f"{where}: rotary_pct {fraction} rotates {rotary} of {C // nh} head dimensions; "
                                "expected an even number > 0")
        parallel = r.get("use_parallel_residual")
        return model_config(dict(
            vocab_size=vocab,
            block_size=max_len,
            n_layer=n_layer,
            n_head=nh,
            n_embd=C,
            dropout=dropout,
            bias=True,
            tie_embeddings=bool(r.get("tie_word_embeddings")),
            block={"kind": "parallel", "shared_norm": False} if parallel else {"kind": "pre_norm"},
            attention="mha",
            norm={"kind": "layernorm", "eps": r.need("layer_norm_eps", float)},
            position=rope,
            mlp={"kind": "gelu", "approximate": _GELU_APPROX[act], "hidden_dim": hidden},
        ))

    def state_dict_from_hf(self, hf_sd: dict[str, torch.Tensor], config: ModelConfig,
                           where: str = "weights") -> dict[str, torch.Tensor]:
        """HF GPT-NeoX tensors -> this toolkit's names, query_key_value's rows permuted from per head to [q; k; v]."""
        layers, rest = layer_tensors(hf_sd, "gpt_neox.layers.")
        out = {_OUTER.get(name, name): t for name, t in rest.items()}
        for i, parts in sorted(layers.items()):
            prefix = f"transformer.h.{i}."
            for buffer in _BUFFERS:
                parts.pop(buffer, None)
            out.update({prefix + ours: parts.pop(theirs) for theirs, ours in _RENAME.items() if theirs in parts})
            for kind in ("weight", "bias"):
                qkv = parts.pop(f"attention.query_key_value.{kind}", None)
                if qkv is None:
                    raise HFFormatError(f"{where}: layer {i} lacks attention.query_key_value.{kind}")
                out[f"{prefix}attn.c_attn.{kind}"] = _per_head_to_stacked(qkv, config.n_head)
            out.update({f"gpt_neox.layers.{i}.{rest}": t for rest, t in parts.items()})  # leftovers: reported as unexpected
        if config.tie_embeddings and "transformer.wte.weight" in out:
            out["lm_head.weight"] = out["transformer.wte.weight"]
        return out

    def state_dict_to_hf(self, tensors: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
        """Tensors in this toolkit's names (weights, or their gradients) -> HF GPT-NeoX names, c_attn back to per head."""
        back = {ours: theirs for theirs, ours in _RENAME.items()}
        outer = {ours: theirs for theirs, ours in _OUTER.items() if theirs != "lm_head.weight"}
        out: dict[str, torch.Tensor] = {}
        for name, t in tensors.items():
            if name == "lm_head.weight" and config.tie_embeddings:
                continue  # HF re-ties it to embed_in on load
            if name in outer:
                out[outer[name]] = t
                continue
            i, below = name.removeprefix("transformer.h.").split(".", 1)
            prefix = f"gpt_neox.layers.{i}."
            if below.startswith("attn.c_attn."):
                out[prefix + "attention.query_key_value." + below.rsplit(".", 1)[1]] = _stacked_to_per_head(t, config.n_head)
            else:
                out[prefix + back[below]] = t
        return out

    def config_to_hf(self, model: Transformer) -> dict:
        """The HF ``config.json`` dict for a model GPT-NeoX can express; HFFormatError says why not otherwise."""
        model = unwrap(model)
        cfg = model.config
        problems = []
        if cfg.block.kind not in ("parallel", "pre_norm"):
            problems.append(f"block {cfg.block.kind!r} (GPT-NeoX has 'parallel' or 'pre_norm')")
        elif cfg.block.kind == "parallel" and cfg.block.options.shared_norm:
            problems.append("a parallel block with one shared norm (GPT-NeoX has one per branch)")
        wants = {"attention": ("mha",), "norm": ("layernorm",), "position": ("rope",), "mlp": ("gelu",)}
        problems += [f"{fam} {getattr(cfg, fam).kind!r} (GPT-NeoX has {' or '.join(map(repr, kinds))})"
                     for fam, kinds in wants.items() if getattr(cfg, fam).kind not in kinds]
        if cfg.layers:
            problems.append(f"layers with components of their own ({', '.join(cfg.layers)})")
        if not cfg.bias:
            problems.append("no biases (GPT-NeoX's MLP and norms always have them)")
        if cfg.head_dim not in (None, cfg.n_embd // cfg.n_head) or cfg.n_embd % cfg.n_head:
            problems.append(f"head_dim {cfg.head_dim} (GPT-NeoX's is n_embd / n_head)")
        if cfg.embedding_multiplier is not None or cfg.logit_softcap is not None:
            problems.append("embedding_multiplier / logit_softcap (GPT-NeoX has neither)")
        if not problems:
            o = cfg.attention.options
            if o.qk_norm is not None or o.softcap is not None or o.scale is not None:
                problems.append("attention qk_norm / softcap / scale (GPT-NeoX has none)")
            if cfg.norm.options.bias is False:
                problems.append("layernorm without bias (GPT-NeoX's has one)")
        if problems:
            raise HFFormatError(f"cannot export as GPT-NeoX: unsupported {'; '.join(problems)}")
        rope, mlp = cfg.position.options, cfg.mlp.options
        return {
            "architectures": ["GPTNeoXForCausalLM"],
            "model_type": "gpt_neox",
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.n_embd,
            "num_hidden_layers": cfg.n_layer,
            "num_attention_heads": cfg.n_head,
            "intermediate_size": model.transformer.h[0].mlp.c_fc.out_features,
            "hidden_act": "gelu" if mlp.approximate == "none" else "gelu_pytorch_tanh",
            "max_position_embeddings": cfg.block_size,
            "layer_norm_eps": cfg.norm.options.eps,
            "tie_word_embeddings": cfg.tie_embeddings,
            "use_parallel_residual": cfg.block.kind == "parallel",
            "attention_bias": True,
            "rotary_pct": rope.fraction,  # as Pythia's files and transformers 4 spell them; transformers 5 reads them too
            "rotary_emb_base": rope.theta,
            "attention_dropout": 0.0,
            "hidden_dropout": 0.0,
            "initializer_range": 0.02,
            "torch_dtype": head_dtype(model),
        }
