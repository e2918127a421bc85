"""RoPE settings of a Hugging Face config.json -> the ``rope`` position's options, and back.

transformers 5 keeps them in ``rope_parameters`` (``rope_type``, ``rope_theta`` and the scaling's
own keys); transformers 4 wrote ``rope_theta`` at the top level and the scaling as ``rope_scaling``
(``type`` or ``rope_type``), which transformers 5 still reads, preferring ``rope_scaling`` whole
when both are there. Every scaling key is read or refused: a RoPE computed with a setting left out
would give wrong numbers without a word.
"""
from __future__ import annotations

import json

from ..plugins.position import yarn_mscale
from .common import ConfigReader, HFFormatError

# the keys each rope_type may carry besides rope_type/type and rope_theta (transformers' _validate_*_rope_parameters)
_KEYS = {
    "default": set(),
    "linear": {"factor"},
    "dynamic": {"factor"},
    "yarn": {"factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow", "mscale",
             "mscale_all_dim", "truncate"},
    "llama3": {"factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"},
}


def rope_from_hf(r: ConfigReader, max_len: int) -> dict:
    """The ``rope`` position spec (a dict) for a config.json; ``max_len`` is its max_position_embeddings."""
    where = r.where
    scaling = r.get("rope_scaling")
    params = dict(scaling or r.get("rope_parameters") or {})  # transformers 5: rope_scaling, if given, wins
    if not isinstance(params, dict):
        raise HFFormatError(f"{where}: rope_parameters = {json.dumps(params)}: expected an object")
    key = "rope_scaling" if scaling else "rope_parameters"
    kind = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if kind not in _KEYS:
        raise HFFormatError(f"{where}: {key}.rope_type {kind!r} is not supported (supported: {', '.join(_KEYS)})")
    top_theta = r.get("rope_theta")  # transformers 4's place; rope_parameters' wins where both are given
    theta = params.pop("rope_theta", None)
    theta = top_theta if theta is None else theta
    fraction = params.pop("partial_rotary_factor", None) or r.get("partial_rotary_factor", 1.0)
    if fraction != 1.0:  # Llama-family rotary embeddings rotate the whole head whatever this says
        raise HFFormatError(f"{where}: partial_rotary_factor = {fraction} is not supported by this architecture")
    extra = sorted(set(params) - _KEYS[kind])
    if extra:
        raise HFFormatError(f"{where}: {key}.{extra[0]} is not supported with rope_type {kind!r}")
    out: dict = {"kind": "rope", "theta": float(theta)}
    if kind == "default":
        return out

    def num(name, default=None):
        value = params.get(name)
        if value is None:
            if default is None:
                raise HFFormatError(f"{where}: {key}.{name} is required with rope_type {kind!r}")
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise HFFormatError(f"{where}: {key}.{name} = {json.dumps(value)}: expected a number")
        return value

    # yarn and llama3: the pretraining context; a top-level original_max_position_embeddings wins (Phi-3 style)
    original = r.get("original_max_position_embeddings") if kind in ("yarn", "llama3") else None
    original = int(original if original is not None else num("original_max_position_embeddings", max_len))
    out["scaling"] = kind
    if kind == "yarn":
        factor = params.get("factor")
        factor = float(max_len / original if factor is None else num("factor"))
        attention = params.get("attention_factor")
        mscale, mscale_all = params.get("mscale"), params.get("mscale_all_dim")
        if attention is None and mscale and mscale_all:  # DeepSeek's ratio of two temperatures
            attention = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all)
        out.update(factor=factor, original_max_len=original, beta_fast=float(params.get("beta_fast") or 32),
                   beta_slow=float(params.get("beta_slow") or 1), truncate=bool(params.get("truncate", True)))
        if attention is not None:
            out["attention_factor"] = float(attention)
        return out
    out["factor"] = float(num("factor"))
    if kind == "dynamic":
        out["original_max_len"] = max_len  # transformers grows the base beyond max_position_embeddings
    elif kind == "llama3":
        out.update(original_max_len=original, low_freq_factor=float(num("low_freq_factor")),
                   high_freq_factor=float(num("high_freq_factor")))
    return out


def block_size_from_hf(position: dict, max_len: int) -> int:
    """The model's context for a config.json's max_position_embeddings: dynamic NTK exists to run past it,
    up to factor times it; every other scheme's max_position_embeddings is already the extended context."""
    if position.get("scaling") == "dynamic":
        return int(max_len * position["factor"])
    return max_len


def rope_to_hf(opts, block_size: int) -> tuple[dict, str | None]:
    """(config.json keys, or why it cannot) for the ``rope`` options ``opts`` of a model of ``block_size``.

    The keys include max_position_embeddings (dynamic NTK: the pretraining context it scales beyond).
    Written as transformers 4 did (``rope_theta``, ``rope_scaling``), which transformers 5 reads as well.
    """
    if opts.fraction != 1.0:
        return {}, f"rope fraction {opts.fraction} (partial rotary)"
    out: dict = {"rope_theta": opts.theta, "max_position_embeddings": block_size}
    if opts.scaling == "none":
        return out, None
    scaling: dict = {"rope_type": opts.scaling, "factor": opts.factor}
    if opts.scaling == "dynamic":
        out["max_position_embeddings"] = opts.original_max_len
    if opts.scaling == "yarn":
        scaling.update(original_max_position_embeddings=opts.original_max_len, beta_fast=opts.beta_fast,
                       beta_slow=opts.beta_slow, truncate=opts.truncate)
        if opts.attention_factor is not None:
            scaling["attention_factor"] = opts.attention_factor
    if opts.scaling == "llama3":
        scaling.update(original_max_position_embeddings=opts.original_max_len, low_freq_factor=opts.low_freq_factor,
                       high_freq_factor=opts.high_freq_factor)
    out["rope_scaling"] = scaling
    return out, None
