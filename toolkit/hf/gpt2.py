"""GPT-2 checkpoints in Hugging Face layout <-> the composed :class:`~toolkit.model.Transformer`.

GPT-2 is mha + layernorm + learned positions + a GELU MLP, pre-norm, with biases. Our parameter
names are GPT-2's, so the mapping is by name; the one twist is that HF stores c_attn, c_proj and
c_fc as ``Conv1D`` layers whose weight is (in, out), the transpose of ``nn.Linear``'s (out, in).
"""
from __future__ import annotations

import re

import torch

from ..model import ModelConfig, Transformer
from .adapter import Adapter
from .common import ConfigReader, HFFormatError, unwrap

# HF's activation_function -> our gelu MLP's `approximate`, or the relu MLP
_GELU_APPROX = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}
_CONV1D = re.compile(r"\.(c_attn|c_proj|c_fc)\.weight$")  # HF Conv1D weights: (in, out)
_BUFFERS = re.compile(r"(^|\.)h\.\d+\.attn\.(bias|masked_bias)$")  # causal-mask buffers in old checkpoints


class GPT2Adapter(Adapter):
    """GPT-2 (Radford et al. 2019): mha + layernorm + learned positions + a GELU MLP, pre-norm, with biases."""

    model_type, hf_class, export_rank = "gpt2", "GPT2LMHeadModel", 0
    # transformers' GPT2Config defaults of the keys read
    defaults = {"activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "tie_word_embeddings": True,
                "scale_attn_weights": True}

    def read_config(self, r: ConfigReader, dropout: float) -> ModelConfig:
        """Dropout is not inherited, as in nanoGPT's from_pretrained."""
        where = r.where
        C, nh, n_layer = r.need("n_embd"), r.need("n_head"), r.need("n_layer")
        block_size, vocab = r.need("n_positions"), r.need("vocab_size")
        if r.get("scale_attn_by_inverse_layer_idx") or r.get("scale_attn_weights") is False:
            raise HFFormatError(f"{where}: scale_attn_by_inverse_layer_idx / scale_attn_weights=false are not supported")
        if r.get("add_cross_attention"):
            raise HFFormatError(f"{where}: add_cross_attention is not supported (decoder-only models only)")
        r.get("n_ctx")  # the original files' context, unused by transformers (n_positions sizes the positions)
        r.get("reorder_and_upcast_attn")  # how, not what: fp32 attention scores, which ours are anyway
        for key in ("summary_type", "summary_use_proj", "summary_activation", "summary_proj_to_labels",
                    "summary_first_dropout"):
            r.get(key)  # GPT2DoubleHeadsModel's classification head: not part of the language model
        act = r.get("activation_function")
        n_inner = r.get("n_inner")
        mlp_opts: dict = {} if n_inner is None else {"hidden_dim": r.need("n_inner")}
        if act in _GELU_APPROX:
            mlp = {"kind": "gelu", "approximate": _GELU_APPROX[act], **mlp_opts}
        elif act == "relu":
            mlp = {"kind": "relu", **mlp_opts}
        else:
            raise HFFormatError(f"{where}: activation_function {act!r} is not supported (expected one of: "
                                f"{', '.join([*_GELU_APPROX, 'relu'])})")
        return ModelConfig(
            vocab_size=vocab,
            block_size=block_size,
            n_layer=n_layer,
            n_head=nh,
            n_embd=C,
            dropout=dropout,
            bias=True,
            tie_embeddings=bool(r.get("tie_word_embeddings")),
            attention="mha",
            norm={"kind": "layernorm", "eps": r.need("layer_norm_epsilon", float)},
            position="learned",
            mlp=mlp,
        )

    def state_dict_from_hf(self, hf_sd: dict[str, torch.Tensor], config: ModelConfig,
                           where: str = "weights") -> dict[str, torch.Tensor]:
        """HF GPT-2 tensors -> this toolkit's names (Conv1D weights transposed, mask buffers dropped)."""
        out = {}
        for name, t in hf_sd.items():
            if _BUFFERS.search(name):
                continue
            if name != "lm_head.weight" and not name.startswith("transformer."):
                name = "transformer." + name  # the original OpenAI-converted checkpoints have no prefix
            out[name] = t.t() if _CONV1D.search(name) else t
        if config.tie_embeddings and "transformer.wte.weight" in out:
            out["lm_head.weight"] = out["transformer.wte.weight"]  # HF's file may omit the tied head or repeat it
        return out

    def state_dict_to_hf(self, state_dict: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
        """This toolkit's tensors -> HF GPT-2 names (Conv1D weights transposed; absent biases written as zeros)."""
        sd = dict(state_dict)
        if config.tie_embeddings:
            sd.pop("lm_head.weight", None)  # HF re-ties it to wte on load
        # GPT-2 always has biases; a bias-free model is the same function with zero biases
        dtype = sd["transformer.wte.weight"].dtype
        for name, t in list(sd.items()):
            if name.endswith(".weight") and name != "lm_head.weight" and not name.endswith(("wte.weight", "wpe.weight")):
                bias = name[: -len("weight")] + "bias"
                if bias not in sd:
                    sd[bias] = torch.zeros(t.shape[0], dtype=dtype)
        return {k: (t.t() if _CONV1D.search(k) else t) for k, t in sd.items()}

    def config_to_hf(self, model: Transformer) -> dict:
        """The HF ``config.json`` dict for a model that GPT-2 can express; HFFormatError says why not otherwise."""
        model = unwrap(model)
        cfg = model.config  # its specs carry typed options (the model resolved them)
        wants = {"attention": ("mha",), "norm": ("layernorm",), "position": ("learned",), "mlp": ("gelu", "relu"),
                 "block": ("pre_norm",)}
        problems = [
            f"{fam} {getattr(cfg, fam).kind!r} (GPT-2 has {' or '.join(map(repr, kinds))})"
            for fam, kinds in wants.items() if getattr(cfg, fam).kind not in kinds
        ]
        if cfg.layers:
            problems.append(f"layers with components of their own ({', '.join(cfg.layers)})")
        if not problems and getattr(cfg.attention.options, "qk_norm", None) is not None:
            problems.append("attention qk_norm (GPT-2 has none)")
        if problems:
            raise HFFormatError(f"cannot export as GPT-2: unsupported {'; '.join(problems)}")
        norm, mlp = cfg.norm.options, cfg.mlp.options
        hidden = mlp.hidden_dim or int(mlp.multiplier * cfg.n_embd)
        if cfg.mlp.kind == "gelu":
            act = "gelu_new" if mlp.approximate == "tanh" else "gelu"
        else:
            act = "relu"
        special = 50256 if cfg.vocab_size > 50256 else None  # <|endoftext|>, where the vocabulary has it
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": cfg.vocab_size,
            "n_positions": cfg.block_size,
            "n_embd": cfg.n_embd,
            "n_layer": cfg.n_layer,
            "n_head": cfg.n_head,
            "n_inner": None if hidden == 4 * cfg.n_embd else hidden,
            "activation_function": act,
            "layer_norm_epsilon": norm.eps,
            "resid_pdrop": cfg.dropout,
            "embd_pdrop": cfg.dropout,
            "attn_pdrop": cfg.dropout,
            "initializer_range": 0.02,
            "scale_attn_weights": True,
            "tie_word_embeddings": cfg.tie_embeddings,
            "bos_token_id": special,
            "eos_token_id": special,
            "torch_dtype": dtype,
        }
