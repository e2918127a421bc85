"""The Llama family in Hugging Face layout <-> the composed :class:`~toolkit.model.Transformer`.

Llama (Touvron et al. 2023) is this toolkit's rmsnorm + rope + swiglu + gqa, pre-norm, without
biases. Mistral, Mixtral and Qwen 3 are the same decoder with one part changed each, so they share
this module, each a subclass of :class:`LlamaAdapter` that switches its part on:

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

import re
from typing import ClassVar

import torch

from ..model import ModelConfig, Transformer
from .adapter import Adapter
from .common import ConfigReader, HFFormatError, unwrap
from .parts import GATE_UP, QKV, fuse, fused_to_hf
from .rope import block_size_from_hf, rope_from_hf, rope_to_hf

_COMMON = dict(num_key_value_heads=None, head_dim=None, hidden_act="silu", rms_norm_eps=1e-6,
               tie_word_embeddings=False, rope_theta=10000.0)

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
_OUR_EXPERT = re.compile(r"^transformer\.h\.(\d+)\.mlp\.experts\.(\d+)\.(c_fc|c_proj)\.weight$")
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")  # a buffer some older checkpoints saved


class LlamaAdapter(Adapter):
    """Llama (Touvron et al. 2023): rmsnorm + rope (plain or scaled) + swiglu + gqa, pre-norm, no biases."""

    model_type, hf_class, export_rank = "llama", "LlamaForCausalLM", 1
    defaults = {**_COMMON, "attention_bias": False, "mlp_bias": False, "max_position_embeddings": 2048}
    window: ClassVar[bool] = False  # `sliding_window` in every layer (Mistral, Mixtral)
    moe: ClassVar[bool] = False  # a sparse MoE MLP (Mixtral)
    qk_norm: ClassVar[bool] = False  # per-head RMSNorm on queries and keys; sliding layers by `layer_types` (Qwen 3)
    written: ClassVar[dict] = {"attention_bias": False, "mlp_bias": False}  # config.json keys of its own, on export

    # -- config.json -> ModelConfig ----------------------------------------------------------------
    def read_config(self, r: ConfigReader, dropout: float) -> ModelConfig:
        where = r.where
        C, nh, n_layer = r.need("hidden_size"), r.need("num_attention_heads"), r.need("num_hidden_layers")
        vocab, hidden, max_len = r.need("vocab_size"), r.need("intermediate_size"), r.need("max_position_embeddings")
        nkv = r.get("num_key_value_heads") or nh
        if nh % nkv:
            raise HFFormatError(f"{where}: num_key_value_heads ({nkv}) must divide num_attention_heads ({nh})")
        head_dim = r.get("head_dim") or C // nh
        if not r.get("head_dim") and C % nh:
            raise HFFormatError(f"{where}: hidden_size ({C}) is not divisible by num_attention_heads ({nh}); "
                                f"give head_dim")
        r.only("hidden_act", ("silu",), "the SwiGLU MLP uses silu")
        r.only("attention_bias", (False, None), "these architectures' projections have no biases")
        r.only("mlp_bias", (False, None), "these architectures' projections have no biases")
        r.get("attention_dropout")  # dropout while training only; the recipe's model.dropout sets ours
        r.get("pretraining_tp")  # Llama 2's tensor-parallel split of the projections: the same function
        position = rope_from_hf(r, max_len)
        attention: dict = {"kind": "gqa", "n_kv_head": nkv}
        if self.qk_norm:
            attention["qk_norm"] = "rmsnorm"  # built with the model's rmsnorm options: rms_norm_eps, as Qwen 3
        layers = {}
        if self.window:
            window = r.get("sliding_window")
            if window is not None:
                attention = {**attention, "kind": "sliding_window", "window": r.need("sliding_window")}
        if self.qk_norm:
            sliding = _qwen3_sliding_layers(r, n_layer)
            if sliding:
                layers["sliding"] = {"at": sliding, "attention": {**attention, "kind": "sliding_window",
                                                                 "window": r.need("sliding_window")}}
        mlp: dict = {"kind": "swiglu", "hidden_dim": hidden}
        if self.moe:
            jitter = r.get("router_jitter_noise")
            if jitter:
                raise HFFormatError(f"{where}: router_jitter_noise = {jitter} is not supported (the moe MLP has no "
                                    f"router noise)")
            r.get("output_router_logits")  # whether transformers returns the router logits (and adds the aux loss)
            mlp = {"kind": "moe", "experts": r.need("num_local_experts"), "top_k": r.need("num_experts_per_tok"),
                   "expert": mlp, "load_balance": r.need("router_aux_loss_coef", float), "router_z": 0.0}
        return ModelConfig(
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

    # -- tensors ---------------------------------------------------------------------------------------
    def state_dict_from_hf(self, hf_sd: dict[str, torch.Tensor], config: ModelConfig,
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

    def state_dict_to_hf(self, state_dict: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
        """This toolkit's tensors -> HF names: fused projections split, Mixtral's experts as published (w1/w3/w2)."""
        rename = {theirs: ours for theirs, ours in _RENAME.items() if ours != "mlp.router.weight"}
        rename["block_sparse_moe.gate.weight"] = "mlp.router.weight"  # as Mixtral was published
        experts = {name: t for name, t in state_dict.items() if _OUR_EXPERT.match(name)}
        out = fused_to_hf({name: t for name, t in state_dict.items() if name not in experts}, config, rename)
        for name, t in experts.items():
            i, e, which = _OUR_EXPERT.match(name).groups()
            theirs = f"model.layers.{i}.block_sparse_moe.experts.{e}."
            if which == "c_fc":
                out[theirs + "w1.weight"], out[theirs + "w3.weight"] = t.chunk(2, dim=0)  # rows [gate; up]
            else:
                out[theirs + "w2.weight"] = t
        return out

    # -- ModelConfig -> config.json ----------------------------------------------------------------
    def config_to_hf(self, model: Transformer) -> dict:
        """The config.json of ``model``; HFFormatError listing what this architecture cannot express."""
        model = unwrap(model)
        cfg = model.config
        block = model.transformer.h[0]
        problems = self._inexpressible(model)
        if problems:
            raise HFFormatError(f"cannot export as {self.model_type}: {'; '.join(problems)}")
        rope, _ = rope_to_hf(cfg.position.options, cfg.block_size)
        mlp = block.mlp.experts[0] if cfg.mlp.kind == "moe" else block.mlp
        out = {
            "architectures": [self.hf_class],
            "model_type": self.model_type,
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.n_embd,
            "intermediate_size": mlp.hidden,
            "num_hidden_layers": cfg.n_layer,
            "num_attention_heads": cfg.n_head,
            "num_key_value_heads": block.attn.n_kv_head,
            "head_dim": block.attn.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": cfg.norm.options.eps,
            "tie_word_embeddings": cfg.tie_embeddings,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "use_cache": True,
            "torch_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            **rope,
            **self.written,
        }
        if self.window:
            out["sliding_window"] = block.attn.window  # None: full attention
        if self.qk_norm:
            out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layer)
        if self.moe:
            opts = cfg.mlp.options
            out.update(num_local_experts=len(block.mlp.experts), num_experts_per_tok=opts.top_k,
                       router_aux_loss_coef=opts.load_balance, router_jitter_noise=0.0, output_router_logits=False)
        return out

    def _inexpressible(self, model: Transformer) -> list[str]:
        """What of ``model`` this architecture cannot express (empty: all of it)."""
        cfg = model.config
        want = {"block": ("pre_norm",), "norm": ("rmsnorm",), "position": ("rope",),
                "attention": ("mha", "gqa", "mqa", "sliding_window") if self.window else ("mha", "gqa", "mqa"),
                "mlp": ("moe",) if self.moe else ("swiglu",)}
        problems = [f"{f} {getattr(cfg, f).kind!r} ({self.model_type} has {' or '.join(map(repr, kinds))})"
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
        if self.qk_norm and (opts.qk_norm != "rmsnorm" or opts.qk_norm_scope != "head"):
            problems.append(f"qk_norm {opts.qk_norm!r} over {opts.qk_norm_scope!r} ({self.model_type} has an rmsnorm "
                            f"per head)")
        if not self.qk_norm and opts.qk_norm is not None:
            problems.append(f"attention qk_norm ({self.model_type} has none)")
        if self.moe:
            expert = cfg.mlp.options.expert
            if expert.kind != "swiglu":
                problems.append(f"moe experts {expert.kind!r} (mixtral's are 'swiglu')")
        return problems


class MistralAdapter(LlamaAdapter):
    """Mistral (Jiang et al. 2023): Llama with a sliding window over the last `sliding_window` keys in every layer."""

    model_type, hf_class, export_rank = "mistral", "MistralForCausalLM", 2
    # transformers' MistralConfig defaults: note sliding_window 4096 when absent (null: full attention)
    defaults = {**_COMMON, "num_key_value_heads": 8, "max_position_embeddings": 4096 * 32, "sliding_window": 4096}
    window, written = True, {}


class MixtralAdapter(LlamaAdapter):
    """Mixtral (Jiang et al. 2024): Mistral with a sparse MoE MLP of SwiGLU experts in every layer.

    The router (``block_sparse_moe.gate``, or ``mlp.gate`` as transformers 5 names it) becomes the moe
    MLP's ``router``; expert e's w1 (gate), w3 (up) and w2 (down) become ``experts.{e}.c_fc`` = [w1; w3]
    and ``experts.{e}.c_proj``. Routing is Mixtral's: softmax over the experts in fp32, the top
    ``num_experts_per_tok`` renormalised to sum to 1. ``router_aux_loss_coef`` becomes ``load_balance``;
    docs/hf.md says how the two losses' normalisations differ.
    """

    model_type, hf_class, export_rank = "mixtral", "MixtralForCausalLM", 3
    defaults = {**_COMMON, "num_key_value_heads": 8, "max_position_embeddings": 4096 * 32, "rms_norm_eps": 1e-5,
                "rope_theta": 1e6, "sliding_window": None, "num_experts_per_tok": 2, "num_local_experts": 8,
                "router_aux_loss_coef": 0.001, "router_jitter_noise": 0.0, "output_router_logits": False}
    window, moe, written = True, True, {}


class Qwen3Adapter(LlamaAdapter):
    """Qwen 3 (Qwen Team 2025): Llama with a per-head RMSNorm on queries and keys before RoPE, head_dim its own.

    Layers that ``layer_types`` marks ``sliding_attention`` (only with ``use_sliding_window``) become a
    layer group with a sliding-window attention.
    """

    model_type, hf_class, export_rank = "qwen3", "Qwen3ForCausalLM", 4
    defaults = {**_COMMON, "attention_bias": False, "num_key_value_heads": 32, "head_dim": 128,
                "max_position_embeddings": 32768, "use_sliding_window": False, "sliding_window": 4096,
                "max_window_layers": 28, "layer_types": None}
    qk_norm, written = True, {"attention_bias": False}


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
