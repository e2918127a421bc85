"""The Llama family in Hugging Face layout <-> the composed :class:`~toolkit.model.Transformer`.

Llama (Touvron et al. 2023) is this toolkit's rmsnorm + rope + swiglu + gqa, pre-norm, without
biases. Mistral, Mixtral and Qwen 3 are the same decoder with one part changed each, so they share
this module and differ by a :class:`Family` record (their own modules hold only that):

    llama    gqa, rope (plain or scaled: linear, dynamic, yarn, llama3), swiglu
    mistral  + a sliding window over the last `sliding_window` keys in every layer (Jiang et al. 2023)
    mixtral  + a sparse MoE MLP: a router over `num_local_experts` SwiGLU experts, top `num_experts_per_tok`
    qwen3    + QK-norm: an RMSNorm over each head's queries and keys before RoPE; head_dim set on its own

HF keeps separate q/k/v and gate/up projections; ours are fused, so they are stacked in the agreed
row order: ``c_attn`` = [q; k; v] and ``c_fc`` = [gate; up]. HF's q/k weights are already permuted
for the rotate-half RoPE convention, which is what the ``rope`` component uses, so no further
permutation is needed. Every config.json key is read or refused (:class:`~toolkit.hf.common.ConfigReader`).
"""
from __future__ import annotations

import functools
import re
from pathlib import Path

import attrs
import torch

from ..model import ModelConfig, Transformer
from ..plugins.mlp import gated_hidden_dim
from ..registry import Registry
from .common import ConfigReader, HFFormatError, check_architecture, load_checkpoint, unwrap, write_checkpoint
from .parts import GATE_UP, QKV, fuse
from .rope import block_size_from_hf, rope_from_hf, rope_to_hf


@attrs.frozen
class Family:
    """What one Llama-like architecture adds to Llama, and transformers' defaults for its config keys."""

    model_type: str
    hf_class: str
    defaults: dict  # transformers' config-class defaults of every key read (an absent key takes these)
    window: bool = False  # `sliding_window` in every layer (Mistral, Mixtral)
    moe: bool = False  # a sparse MoE MLP (Mixtral)
    qk_norm: bool = False  # per-head RMSNorm on queries and keys; sliding layers by `layer_types` (Qwen 3)


_COMMON = dict(num_key_value_heads=None, head_dim=None, hidden_act="silu", rms_norm_eps=1e-6,
               tie_word_embeddings=False, rope_theta=10000.0)
LLAMA = Family("llama", "LlamaForCausalLM",
               {**_COMMON, "attention_bias": False, "mlp_bias": False, "max_position_embeddings": 2048})

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# per-layer HF name -> ours (single tensors); q/k/v and gate/up are fused separately
_RENAME = {
    "input_layernorm.weight": "ln_1.weight",
    "post_attention_layernorm.weight": "ln_2.weight",
    "self_attn.o_proj.weight": "attn.c_proj.weight",
    "self_attn.q_norm.weight": "attn.q_norm.weight",  # Qwen 3
    "self_attn.k_norm.weight": "attn.k_norm.weight",
    "mlp.down_proj.weight": "mlp.c_proj.weight",
    "mlp.gate.weight": "mlp.router.weight",  # Mixtral, transformers 5 names
    "block_sparse_moe.gate.weight": "mlp.router.weight",  # Mixtral as published
}
_EXPERT = re.compile(r"^block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$")  # w1 gate, w3 up, w2 down
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")  # a buffer some older checkpoints saved


# -- config.json -> ModelConfig ------------------------------------------------------------------------
def config_from_hf(fam: Family, hf: dict, *, dropout: float = 0.0, where: str = "config.json") -> ModelConfig:
    """The :class:`ModelConfig` of a config.json (as a dict) of the Llama-like architecture ``fam``."""
    check_architecture(hf, fam.model_type, [fam.hf_class], where)
    r = ConfigReader(hf, where, fam.defaults)
    C, nh, n_layer = r.need("hidden_size"), r.need("num_attention_heads"), r.need("num_hidden_layers")
    vocab, hidden, max_len = r.need("vocab_size"), r.need("intermediate_size"), r.need("max_position_embeddings")
    nkv = r.get("num_key_value_heads") or nh
    if nh % nkv:
        raise HFFormatError(f"{where}: num_key_value_heads ({nkv}) must divide num_attention_heads ({nh})")
    head_dim = r.get("head_dim") or C // nh
    if not r.get("head_dim") and C % nh:
        raise HFFormatError(f"{where}: hidden_size ({C}) is not divisible by num_attention_heads ({nh}); give head_dim")
    r.only("hidden_act", ("silu",), "the SwiGLU MLP uses silu")
    r.only("attention_bias", (False, None), "these architectures' projections have no biases")
    r.only("mlp_bias", (False, None), "these architectures' projections have no biases")
    r.get("attention_dropout")  # dropout while training only; the recipe's model.dropout sets ours
    r.get("pretraining_tp")  # Llama 2's tensor-parallel split of the projections: the same function
    position = rope_from_hf(r, max_len)
    attention: dict = {"kind": "gqa", "n_kv_head": nkv}
    if fam.qk_norm:
        attention["qk_norm"] = "rmsnorm"  # built with the model's rmsnorm options: rms_norm_eps, as Qwen 3
    layers = {}
    if fam.window:
        window = r.get("sliding_window")
        if window is not None:
            attention = {**attention, "kind": "sliding_window", "window": r.need("sliding_window")}
    if fam.qk_norm:
        sliding = _qwen3_sliding_layers(r, n_layer)
        if sliding:
            layers["sliding"] = {"at": sliding, "attention": {**attention, "kind": "sliding_window",
                                                             "window": r.need("sliding_window")}}
    mlp: dict = {"kind": "swiglu", "hidden_dim": hidden}
    if fam.moe:
        jitter = r.get("router_jitter_noise")
        if jitter:
            raise HFFormatError(f"{where}: router_jitter_noise = {jitter} is not supported (the moe MLP has no "
                                f"router noise)")
        r.get("output_router_logits")  # whether transformers returns the router logits (and adds the aux loss)
        mlp = {"kind": "moe", "experts": r.need("num_local_experts"), "top_k": r.need("num_experts_per_tok"),
               "expert": mlp, "load_balance": r.need("router_aux_loss_coef", float), "router_z": 0.0}
    config = ModelConfig(
        vocab_size=vocab,
        block_size=block_size_from_hf(position, max_len),
        n_layer=n_layer,
        n_head=nh,
        n_embd=C,
        head_dim=None if C % nh == 0 and head_dim == C // nh else head_dim,
        dropout=dropout,
        bias=False,
        tie_embeddings=bool(r.get("tie_word_embeddings")),
        attention=attention,
        norm={"kind": "rmsnorm", "eps": r.need("rms_norm_eps", float)},
        position=position,
        mlp=mlp,
        layers=layers,
    )
    r.finish()
    return config


def _qwen3_sliding_layers(r: ConfigReader, n_layer: int) -> list[int]:
    """The layers of a Qwen 3 config that attend through a sliding window (transformers' rule)."""
    window, use, max_window_layers = r.get("sliding_window"), r.get("use_sliding_window"), r.get("max_window_layers")
    window = window if use else None  # transformers: no window at all unless use_sliding_window
    types = r.get("layer_types")
    if types is None:
        return [i for i in range(n_layer) if i >= max_window_layers] if window is not None else []
    if len(types) != n_layer or not set(types) <= {"full_attention", "sliding_attention"}:
        raise HFFormatError(f"{r.where}: layer_types must list full_attention or sliding_attention for each of "
                            f"the {n_layer} layers")
    return [i for i, t in enumerate(types) if t == "sliding_attention"] if window is not None else []


# -- tensors -------------------------------------------------------------------------------------------
def state_dict_from_hf(hf_sd: dict[str, torch.Tensor], config: ModelConfig,
                       where: str = "weights") -> dict[str, torch.Tensor]:
    """HF tensors -> this toolkit's names: q/k/v and gate/up stacked, Mixtral's experts one module each."""
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
        out[prefix + "attn.c_attn.weight"] = fuse(parts, QKV, i, where)  # rows [q; k; v]
        if config.mlp.kind == "moe":
            out.update(_experts_from_hf(parts, prefix, i, where))
        else:
            out[prefix + "mlp.c_fc.weight"] = fuse(parts, GATE_UP, i, where)  # rows [gate; up]
        out.update({f"model.layers.{i}.{rest}": t for rest, t in parts.items()})  # leftovers: reported as unexpected
    if config.tie_embeddings and "transformer.wte.weight" in out:
        out["lm_head.weight"] = out["transformer.wte.weight"]
    return out


def _experts_from_hf(parts: dict, prefix: str, layer: int, where: str) -> dict[str, torch.Tensor]:
    """Mixtral's experts, as published (experts.{e}.w1/w3/w2) or as transformers 5 holds them (3-D stacks)."""
    out = {}
    if "mlp.experts.gate_up_proj" in parts or "mlp.experts.down_proj" in parts:
        if "mlp.experts.gate_up_proj" not in parts or "mlp.experts.down_proj" not in parts:
            raise HFFormatError(f"{where}: layer {layer} has only one of mlp.experts.gate_up_proj, down_proj")
        gate_up, down = parts.pop("mlp.experts.gate_up_proj"), parts.pop("mlp.experts.down_proj")  # (E, 2I, C), (E, C, I)
        for e in range(gate_up.size(0)):
            out[f"{prefix}mlp.experts.{e}.c_fc.weight"] = gate_up[e]  # rows [gate; up] already
            out[f"{prefix}mlp.experts.{e}.c_proj.weight"] = down[e]
        return out
    experts: dict[int, dict[str, torch.Tensor]] = {}
    for name in [n for n in parts if _EXPERT.match(n)]:
        e, w = _EXPERT.match(name).groups()
        experts.setdefault(int(e), {})[w] = parts.pop(name)
    if not experts:
        raise HFFormatError(f"{where}: layer {layer} has no experts (block_sparse_moe.experts.N.w1/w2/w3)")
    for e, ws in sorted(experts.items()):
        missing = [w for w in ("w1", "w2", "w3") if w not in ws]
        if missing:
            raise HFFormatError(f"{where}: layer {layer} expert {e} lacks {', '.join(missing)}")
        out[f"{prefix}mlp.experts.{e}.c_fc.weight"] = torch.cat([ws["w1"], ws["w3"]], dim=0)  # rows [gate; up]
        out[f"{prefix}mlp.experts.{e}.c_proj.weight"] = ws["w2"]
    return out


def load(fam: Family, path: str | Path, *, dropout: float = 0.0, dtype: torch.dtype | None = None,
         registry: Registry | None = None) -> Transformer:
    """A :class:`Transformer` with the weights of a local HF folder of architecture ``fam``."""
    return load_checkpoint(path, functools.partial(config_from_hf, fam), state_dict_from_hf, dropout=dropout,
                           dtype=dtype, registry=registry)


# -- ModelConfig -> config.json ------------------------------------------------------------------------
def config_to_hf(fam: Family, model: Transformer) -> dict:
    """The config.json of ``model`` as architecture ``fam``; HFFormatError listing what it cannot express."""
    model = unwrap(model)
    cfg = model.config
    attn = model.transformer.h[0].attn
    problems = _inexpressible(fam, model)
    if problems:
        raise HFFormatError(f"cannot export as {fam.model_type}: {'; '.join(problems)}")
    rope, _ = rope_to_hf(cfg.position.options, cfg.block_size)
    mlp = cfg.mlp.options
    expert = mlp.expert.options if cfg.mlp.kind == "moe" else mlp
    out = {
        "architectures": [fam.hf_class],
        "model_type": fam.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd,
        "intermediate_size": gated_hidden_dim(expert, cfg.n_embd),
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": attn.n_kv_head,
        "head_dim": attn.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm.options.eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        **rope,
    }
    if fam.model_type in ("llama", "qwen3"):
        out["attention_bias"] = False
    if fam.model_type == "llama":
        out["mlp_bias"] = False
    if fam.window:
        out["sliding_window"] = attn.window  # None: full attention
    if fam.qk_norm:
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layer)
    if fam.moe:
        out.update(num_local_experts=len(model.transformer.h[0].mlp.experts), num_experts_per_tok=mlp.top_k,
                   router_aux_loss_coef=mlp.load_balance, router_jitter_noise=0.0, output_router_logits=False)
    return out


def _inexpressible(fam: Family, model: Transformer) -> list[str]:
    """What of ``model`` the architecture ``fam`` cannot express (empty: all of it)."""
    cfg = model.config
    want = {"block": ("pre_norm",), "norm": ("rmsnorm",), "position": ("rope",),
            "attention": ("mha", "gqa", "mqa", "sliding_window") if fam.window else ("mha", "gqa", "mqa"),
            "mlp": ("moe",) if fam.moe else ("swiglu",)}
    problems = [f"{f} {getattr(cfg, f).kind!r} ({fam.model_type} has {' or '.join(map(repr, kinds))})"
                for f, kinds in want.items() if getattr(cfg, f).kind not in kinds]
    if cfg.layers:
        problems.append(f"layers with components of their own ({', '.join(cfg.layers)})")
    if cfg.bias:
        problems.append("bias = true (no biases in these projections)")
    if cfg.logit_softcap is not None or cfg.embedding_multiplier is not None:
        problems.append("logit_softcap / embedding_multiplier")
    if problems:
        return problems
    if cfg.norm.options.offset:
        problems.append(f"rmsnorm offset {cfg.norm.options.offset}")
    _, why = rope_to_hf(cfg.position.options, cfg.block_size)
    if why:
        problems.append(why)
    opts = cfg.attention.options
    if opts.softcap is not None:
        problems.append("attention softcap")
    if fam.qk_norm and (opts.qk_norm != "rmsnorm" or opts.qk_norm_scope != "head"):
        problems.append(f"qk_norm {opts.qk_norm!r} over {opts.qk_norm_scope!r} ({fam.model_type} has an rmsnorm per head)")
    if not fam.qk_norm and opts.qk_norm is not None:
        problems.append(f"attention qk_norm ({fam.model_type} has none)")
    if fam.moe:
        expert = cfg.mlp.options.expert
        if expert.kind != "swiglu":
            problems.append(f"moe experts {expert.kind!r} (mixtral's are 'swiglu')")
    return problems


def state_dict_to_hf(fam: Family, model: Transformer) -> dict[str, torch.Tensor]:
    """This toolkit's tensors -> HF names: fused projections split, Mixtral's experts as published (w1/w3/w2)."""
    model = unwrap(model)
    cfg = model.config
    sd = model.state_dict()
    out = {"model.embed_tokens.weight": sd["transformer.wte.weight"], "model.norm.weight": sd["transformer.ln_f.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    for i, block in enumerate(model.transformer.h):
        ours, theirs = f"transformer.h.{i}.", f"model.layers.{i}."
        for hf_name, name in _RENAME.items():
            if ours + name in sd and not hf_name.startswith("block_sparse_moe.") and hf_name != "mlp.gate.weight":
                out[theirs + hf_name] = sd[ours + name]
        attn = block.attn
        sizes = [attn.n_head * attn.head_dim, attn.n_kv_head * attn.head_dim, attn.n_kv_head * attn.head_dim]
        for hf_name, t in zip(QKV, sd[ours + "attn.c_attn.weight"].split(sizes, dim=0)):
            out[theirs + hf_name] = t
        if cfg.mlp.kind == "moe":
            out[theirs + "block_sparse_moe.gate.weight"] = sd[ours + "mlp.router.weight"]
            for e, expert in enumerate(block.mlp.experts):
                gate, up = sd[f"{ours}mlp.experts.{e}.c_fc.weight"].split(expert.hidden, dim=0)
                out[f"{theirs}block_sparse_moe.experts.{e}.w1.weight"] = gate
                out[f"{theirs}block_sparse_moe.experts.{e}.w3.weight"] = up
                out[f"{theirs}block_sparse_moe.experts.{e}.w2.weight"] = sd[f"{ours}mlp.experts.{e}.c_proj.weight"]
        else:
            for hf_name, t in zip(GATE_UP, sd[ours + "mlp.c_fc.weight"].split(block.mlp.hidden, dim=0)):
                out[theirs + hf_name] = t
    return out


# -- Llama itself -------------------------------------------------------------------------------------
def llama_config_from_hf(hf: dict, *, dropout: float = 0.0, where: str = "Llama config") -> ModelConfig:
    """The :class:`ModelConfig` for a Llama ``config.json`` (as a dict)."""
    return config_from_hf(LLAMA, hf, dropout=dropout, where=where)


def llama_state_dict_from_hf(hf_sd: dict[str, torch.Tensor], config: ModelConfig,
                             where: str = "Llama weights") -> dict[str, torch.Tensor]:
    """HF Llama tensors -> this toolkit's names, with q/k/v and gate/up stacked into fused weights."""
    return state_dict_from_hf(hf_sd, config, where)


def load_llama(path: str | Path, *, dropout: float = 0.0, dtype: torch.dtype | None = None,
               registry: Registry | None = None) -> Transformer:
    """A :class:`Transformer` with the weights of a local HF Llama folder (config.json + model.safetensors)."""
    return load(LLAMA, path, dropout=dropout, dtype=dtype, registry=registry)


def save_llama(model: Transformer, path: str | Path) -> Path:
    """Write ``model`` as a HF Llama folder (config.json + model.safetensors) that LlamaForCausalLM loads."""
    return write_checkpoint(path, config_to_hf(LLAMA, model), state_dict_to_hf(LLAMA, model))
