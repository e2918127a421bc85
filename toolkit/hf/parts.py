"""What the adapters share: typed model configs, and HF's separate projections stacked into (and
split out of) our fused ones in the Llama layout (Llama and its family, Gemma 2, OLMo 2).
"""
from __future__ import annotations

from typing import ClassVar

import torch

from ..converter import resolve_specs, structure
from ..model import ModelConfig, Transformer
from ..plugin_manager import default_registry
from .common import HFFormatError


def model_config(fields: dict) -> ModelConfig:
    """A ModelConfig with every component's options typed, layer groups' included (which the
    constructor leaves as given, so a group's option table must be structured here), and those of
    the components ``fields`` leaves at their defaults (as a recipe's are)."""
    registry = default_registry()
    return resolve_specs(registry, structure(registry, fields, ModelConfig))


def layer_tensors(hf_sd: dict[str, torch.Tensor], prefix: str) -> tuple[dict[int, dict[str, torch.Tensor]], dict]:
    """Split HF tensors into {layer: {name below the layer: tensor}} and the rest, for ``<prefix><i>.<name>``."""
    layers: dict[int, dict[str, torch.Tensor]] = {}
    rest = {}
    for name, t in hf_sd.items():
        if name.startswith(prefix) and name[len(prefix):].split(".", 1)[0].isdigit():
            i, below = name[len(prefix):].split(".", 1)
            layers.setdefault(int(i), {})[below] = t
        else:
            rest[name] = t
    return layers, rest


# -- the Llama layout (its family, Gemma 2, OLMo 2): model.embed_tokens, model.layers.<i>.{self_attn,mlp}, model.norm
QKV = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")
GATE_UP = ("mlp.gate_proj.weight", "mlp.up_proj.weight")
_OUTER = {"model.embed_tokens.weight": "transformer.wte.weight", "model.norm.weight": "transformer.ln_f.weight"}
_IGNORED = "rotary_emb.inv_freq"  # a buffer some older checkpoints saved


def fused_from_hf(hf_sd: dict[str, torch.Tensor], config: ModelConfig, rename: dict[str, str],
                  where: str) -> dict[str, torch.Tensor]:
    """HF tensors in the Llama layout -> this toolkit's names: ``rename`` maps a layer's single tensors,
    and q/k/v and gate/up are stacked into the fused ``c_attn`` ([q; k; v]) and ``c_fc`` ([gate; up])."""
    layers, rest = layer_tensors(hf_sd, "model.layers.")
    out = {_OUTER.get(name, name): t for name, t in rest.items() if not name.endswith(_IGNORED)}
    for i, parts in sorted(layers.items()):
        prefix = f"transformer.h.{i}."
        parts = {k: t for k, t in parts.items() if not k.endswith(_IGNORED)}
        out.update({prefix + ours: parts.pop(theirs) for theirs, ours in rename.items() if theirs in parts})
        out[prefix + "attn.c_attn.weight"] = fuse(parts, QKV, i, where)
        out[prefix + "mlp.c_fc.weight"] = fuse(parts, GATE_UP, i, where)
        out.update({f"model.layers.{i}.{rest}": t for rest, t in parts.items()})  # leftovers: reported as unexpected
    if config.tie_embeddings and "transformer.wte.weight" in out:
        out["lm_head.weight"] = out["transformer.wte.weight"]  # HF's file may omit the tied head or repeat it
    return out


def fused_to_hf(tensors: dict[str, torch.Tensor], config: ModelConfig, rename: dict[str, str]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`fused_from_hf`, for weights or their gradients (a tied head is left out)."""
    hs = config.head_dim or config.n_embd // config.n_head
    back = {ours: theirs for theirs, ours in rename.items()} | {ours: theirs for theirs, ours in _OUTER.items()}
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name == "lm_head.weight":
            if not config.tie_embeddings:
                out[name] = t
        elif name in back:
            out[back[name]] = t
        else:
            i, below = name.removeprefix("transformer.h.").split(".", 1)
            prefix = f"model.layers.{i}."
            if below == "attn.c_attn.weight":
                nkv = (t.size(0) // hs - config.n_head) // 2  # the rows hold nh + 2 * nkv heads
                pieces = unfuse(t, QKV, [config.n_head * hs, nkv * hs, nkv * hs])
            elif below == "mlp.c_fc.weight":
                pieces = unfuse(t, GATE_UP, [t.size(0) // 2] * 2)
            else:
                pieces = {back[below]: t}
            out.update({prefix + k: v for k, v in pieces.items()})
    return out


def fuse(parts: dict[str, torch.Tensor], pieces: tuple[str, ...], layer: int, where: str) -> torch.Tensor:
    """Stack HF's separate projections (rows in ``pieces`` order) into one fused weight, taking them out of parts."""
    missing = [p for p in pieces if p not in parts]
    if missing:
        raise HFFormatError(f"{where}: layer {layer} lacks {', '.join(missing)}")
    return torch.cat([parts.pop(p) for p in pieces], dim=0)


def unfuse(fused: torch.Tensor, pieces: tuple[str, ...], sizes: list[int]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`fuse`: a fused weight's rows split back into HF's projections."""
    return dict(zip(pieces, fused.split(sizes, dim=0)))


def head_dtype(model: Transformer) -> str:
    """The parameters' dtype as config.json spells it ("float32", "bfloat16")."""
    return str(next(model.parameters()).dtype).removeprefix("torch.")


class FusedLayout:
    """The tensors of an adapter whose HF layout is Llama's (separate q/k/v and gate/up) under names
    of its own: ``rename`` maps each per-layer HF name to ours (mixed in before Adapter)."""

    rename: ClassVar[dict[str, str]] = {}

    def state_dict_from_hf(self, hf_sd: dict[str, torch.Tensor], config: ModelConfig,
                           where: str = "weights") -> dict[str, torch.Tensor]:
        """HF tensors -> this toolkit's names, q/k/v and gate/up stacked into the fused weights."""
        return fused_from_hf(hf_sd, config, self.rename, where)

    def state_dict_to_hf(self, state_dict: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
        """Tensors in this toolkit's names (weights, or their gradients) -> HF names, fused ones split."""
        return fused_to_hf(state_dict, config, self.rename)
