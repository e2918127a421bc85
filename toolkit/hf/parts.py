"""What the Gemma 2, OLMo 2 and GPT-NeoX importers share: refusing config keys they do not read,
plain RoPE settings, and HF's separate projections stacked into (and split out of) our fused ones.

An importer lists every config.json key it reads; any other key that could change a number is
refused in one line naming it, so a checkpoint is never loaded with a setting silently ignored.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

import torch

from ..config import structure
from ..model import ModelConfig, Transformer
from ..plugin_manager import default_registry
from ..registry import Registry
from .common import HFFormatError, load_into, read_config, read_state_dict, unwrap, write_checkpoint

#: keys that change no number in a forward pass: names, ids, dtypes, versions, generation defaults,
#: dropout (never inherited, as in nanoGPT's from_pretrained) and the initialiser of untrained weights
BOOKKEEPING = frozenset({
    "_name_or_path", "_commit_hash", "_attn_implementation", "architectures", "model_type", "transformers_version",
    "torch_dtype", "dtype", "use_cache", "cache_implementation", "initializer_range", "bos_token_id",
    "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id", "attention_dropout", "hidden_dropout",
    "classifier_dropout", "embd_pdrop", "resid_pdrop", "attn_pdrop", "is_decoder", "return_dict",
    "output_attentions", "output_hidden_states", "torchscript", "use_bfloat16", "gradient_checkpointing",
    "id2label", "label2id", "problem_type", "finetuning_task", "tokenizer_class", "prefix", "task_specific_params",
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups", "temperature",
    "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "diversity_penalty",
    "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens", "output_scores", "return_dict_in_generate",
    "chunk_size_feed_forward", "tf_legacy_loss", "tie_encoder_decoder", "is_encoder_decoder",
    "add_cross_attention", "cross_attention_hidden_size", "pruned_heads",
})
#: of those, the ones that describe a different model when set (an encoder-decoder, pruned heads)
_MUST_BE_OFF = ("tie_encoder_decoder", "is_encoder_decoder", "add_cross_attention", "pruned_heads")


def refuse_unread(hf: dict, read: Iterable[str], where: str) -> None:
    """HFFormatError naming every config.json key that is neither read nor bookkeeping (None counts as unset)."""
    read = set(read)
    unknown = sorted(k for k, val in hf.items() if val is not None and k not in read and k not in BOOKKEEPING)
    on = [k for k in _MUST_BE_OFF if hf.get(k)]
    if on:
        raise HFFormatError(f"{where}: {', '.join(on)} is not supported (decoder-only models, every head kept)")
    if unknown:
        raise HFFormatError(f"{where}: {', '.join(map(repr, unknown))} {'is not a setting' if len(unknown) == 1 else 'are not settings'}"
                            f" this loader implements; refusing rather than ignoring {'it' if len(unknown) == 1 else 'them'}")


def rope_settings(hf: dict, where: str, *, extra: tuple[str, ...] = (), theta_key: str = "rope_theta",
                  default_theta: float = 10000.0) -> dict:
    """Plain RoPE's parameters: ``rope_parameters`` (transformers >= 5) or the older top-level keys.

    Returns the parameters with ``rope_theta`` set; scaled RoPE (any rope_type but "default") and
    parameters not in ``extra`` are refused.
    """
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    kind = params.pop("rope_type", None) or params.pop("type", None) or "default"
    if kind != "default":
        raise HFFormatError(f"{where}: rope_type {kind!r} (scaled RoPE) is not supported; only plain RoPE is")
    unknown = sorted(set(params) - {"rope_theta", *extra})
    if unknown:
        raise HFFormatError(f"{where}: rope parameter {', '.join(map(repr, unknown))} is not supported")
    params.setdefault("rope_theta", hf.get(theta_key) if hf.get(theta_key) is not None else default_theta)
    params["rope_theta"] = float(params["rope_theta"])
    return params


def model_config(fields: dict) -> ModelConfig:
    """A ModelConfig with every component's options typed, layer groups' included (which the
    constructor leaves as given, so a group's option table must be structured here)."""
    return structure(default_registry(), fields, ModelConfig)


def int_key(hf: dict, key: str, where: str) -> int:
    """``hf[key]`` as an int, or a one-line HFFormatError naming the key."""
    value = hf[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise HFFormatError(f"{where}: {key} must be an integer, got {value!r}")
    return int(value)


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


# -- the Llama layout (Gemma 2, OLMo 2): model.embed_tokens, model.layers.<i>.{self_attn,mlp}, model.norm
_QKV = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")
_GATE_UP = ("mlp.gate_proj.weight", "mlp.up_proj.weight")
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
        out[prefix + "attn.c_attn.weight"] = fuse(parts, _QKV, i, where)
        out[prefix + "mlp.c_fc.weight"] = fuse(parts, _GATE_UP, i, where)
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
                pieces = unfuse(t, _QKV, [config.n_head * hs, nkv * hs, nkv * hs])
            elif below == "mlp.c_fc.weight":
                pieces = unfuse(t, _GATE_UP, [t.size(0) // 2] * 2)
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


def load_checkpoint(path: str | Path, config_from_hf: Callable, state_dict_from_hf: Callable, *, dropout: float,
                    dtype: torch.dtype | None, registry: Registry | None) -> Transformer:
    """A Transformer from a local HF folder: its config through ``config_from_hf``, its tensors renamed by
    ``state_dict_from_hf``, every mismatch reported at once (load_into), in eval mode."""
    where = str(path)
    config = config_from_hf(read_config(path), dropout=dropout, where=f"{where}/config.json")
    sd = state_dict_from_hf(read_state_dict(path), config, where)
    model = Transformer(config, registry)
    load_into(model, sd, where)
    if dtype is not None:
        model.to(dtype)
    return model.eval()


def save_checkpoint(model, path: str | Path, config_to_hf: Callable, tensors_to_hf: Callable) -> Path:
    """Write ``model`` as a HF folder: config.json from ``config_to_hf`` (which refuses what the layout
    cannot say, before anything is written), model.safetensors from ``tensors_to_hf``."""
    config = config_to_hf(model)
    inner = unwrap(model)
    return write_checkpoint(path, config, tensors_to_hf(inner.state_dict(), inner.config))


def head_dtype(model: Transformer) -> str:
    """The parameters' dtype as config.json spells it ("float32", "bfloat16")."""
    return str(next(model.parameters()).dtype).removeprefix("torch.")
