"""Llama checkpoints in Hugging Face layout -> the composed :class:`~toolkit.model.Transformer`.

Llama (Touvron et al. 2023) is this toolkit's rmsnorm + rope + swiglu + gqa, pre-norm, without
biases. HF keeps separate q/k/v and gate/up projections; ours are fused, so they are stacked in
the agreed row order: ``c_attn`` = [q; k; v] and ``c_fc`` = [gate; up]. HF's q/k weights are already
permuted for the rotate-half RoPE convention, which is what the ``rope`` component uses, so no
further permutation is needed.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from ..model import ModelConfig, Transformer
from ..registry import Registry
from .common import HFFormatError, check_architecture, load_into, read_config, read_state_dict, require

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# per-layer HF name -> ours (single tensors); q/k/v and gate/up are fused separately
_RENAME = {
    "input_layernorm.weight": "ln_1.weight",
    "post_attention_layernorm.weight": "ln_2.weight",
    "self_attn.o_proj.weight": "attn.c_proj.weight",
    "mlp.down_proj.weight": "mlp.c_proj.weight",
}
_FUSED = {
    "attn.c_attn.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "mlp.c_fc.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
}
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")  # a buffer some older checkpoints saved


def _rope_theta(hf: dict, where: str) -> float:
    """RoPE's base, from ``rope_parameters`` (transformers >= 5) or ``rope_theta`` (earlier); no scaling."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise HFFormatError(f"{where}: rope_type {kind!r} (scaled RoPE) is not supported; only plain RoPE is")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def llama_config_from_hf(hf: dict, *, dropout: float = 0.0, where: str = "Llama config") -> ModelConfig:
    """The :class:`ModelConfig` for a Llama ``config.json`` (as a dict)."""
    check_architecture(hf, "llama", ["LlamaForCausalLM"], where)
    require(hf, ["hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size",
                 "max_position_embeddings"], where)
    C, nh = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    nkv = int(hf.get("num_key_value_heads") or nh)
    if hf.get("head_dim") not in (None, C // nh):
        raise HFFormatError(f"{where}: head_dim {hf['head_dim']} differs from hidden_size / num_attention_heads "
                            f"= {C // nh}; not supported")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise HFFormatError(f"{where}: attention_bias / mlp_bias are not supported (Llama has no biases)")
    if hf.get("hidden_act", "silu") != "silu":
        raise HFFormatError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported (Llama's SwiGLU uses 'silu')")
    return ModelConfig(
        vocab_size=int(hf["vocab_size"]),
        block_size=int(hf["max_position_embeddings"]),
        n_layer=int(hf["num_hidden_layers"]),
        n_head=nh,
        n_embd=C,
        dropout=dropout,
        bias=False,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention={"kind": "gqa", "n_kv_head": nkv},
        norm={"kind": "rmsnorm", "eps": float(hf.get("rms_norm_eps", 1e-6))},
        position={"kind": "rope", "theta": _rope_theta(hf, where)},
        mlp={"kind": "swiglu", "hidden_dim": int(hf["intermediate_size"])},
    )


def llama_state_dict_from_hf(hf_sd: dict[str, torch.Tensor], config: ModelConfig,
                             where: str = "Llama weights") -> dict[str, torch.Tensor]:
    """HF Llama tensors -> this toolkit's names, with q/k/v and gate/up stacked into fused weights."""
    out: dict[str, torch.Tensor] = {}
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for name, t in hf_sd.items():
        if _IGNORED.search(name):
            continue
        m = _LAYER.match(name)
        if m:
            layers.setdefault(int(m.group(1)), {})[m.group(2)] = t
        elif name == "model.embed_tokens.weight":
            out["transformer.wte.weight"] = t
        elif name == "model.norm.weight":
            out["transformer.ln_f.weight"] = t
        else:
            out[name] = t  # lm_head.weight, or an unexpected name that load_into reports
    for i, parts in sorted(layers.items()):
        prefix = f"transformer.h.{i}."
        for theirs, ours in _RENAME.items():
            if theirs in parts:
                out[prefix + ours] = parts.pop(theirs)
        for ours, pieces in _FUSED.items():
            missing = [p for p in pieces if p not in parts]
            if missing:
                raise HFFormatError(f"{where}: layer {i} lacks {', '.join(missing)}")
            out[prefix + ours] = torch.cat([parts.pop(p) for p in pieces], dim=0)  # rows stacked in this order
        out.update({f"model.layers.{i}.{rest}": t for rest, t in parts.items()})  # leftovers: reported as unexpected
    if config.tie_embeddings and "transformer.wte.weight" in out:
        out["lm_head.weight"] = out["transformer.wte.weight"]
    return out


def load_llama(path: str | Path, *, dropout: float = 0.0, dtype: torch.dtype | None = None,
               registry: Registry | None = None) -> Transformer:
    """A :class:`Transformer` with the weights of a local HF Llama folder (config.json + model.safetensors)."""
    where = str(path)
    config = llama_config_from_hf(read_config(path), dropout=dropout, where=f"{where}/config.json")
    sd = llama_state_dict_from_hf(read_state_dict(path), config, where)
    model = Transformer(config, registry)
    load_into(model, sd, where)
    if dtype is not None:
        model.to(dtype)
    return model.eval()
