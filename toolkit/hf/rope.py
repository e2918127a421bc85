"""RoPE settings of a Hugging Face config.json -> the ``rope`` position's options, and back: the one reader.

transformers 5 keeps them in ``rope_parameters`` (``rope_type``, ``rope_theta`` and the scaling's
own keys); transformers 4 wrote ``rope_theta`` at the top level and the scaling as ``rope_scaling``
(``type`` or ``rope_type``). A file may have both: what each gives counts (``rope_scaling`` is
what transformers 4 and 5 read, so its errors name it), but a setting both give must be the same in
both, or the file is refused naming it, since it means one thing to transformers and another to a
reader of the newer key. ``rope_theta`` and ``partial_rotary_factor`` that neither table gives come
from the top level. Every scaling key is read or refused: a RoPE computed with a setting left out
would give wrong numbers without a word.
"""
from __future__ import annotations

import json

from ..plugin_manager import default_registry
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


def _table(r: ConfigReader, key: str) -> dict:
    value = r.get(key)
    if value is not None and not isinstance(value, dict):
        raise HFFormatError(f"{r.where}: {key} = {json.dumps(value)}: expected an object")
    table = dict(value or {})
    if "type" in table:  # transformers 4's name for rope_type
        table.setdefault("rope_type", table.pop("type"))
    return table


def _first(*values):
    return next((v for v in values if v is not None), None)


def rope_table(r: ConfigReader) -> tuple[str, dict, str | None]:
    """(the key it came from, the RoPE table, why the file is ambiguous or None): ``rope_scaling`` over
    ``rope_parameters``; a setting both give must be the same in both (else the third item says which)."""
    scaling, params = _table(r, "rope_scaling"), _table(r, "rope_parameters")
    clash = next((name for name in sorted(set(scaling) & set(params)) if scaling[name] != params[name]), None)
    why = None
    if clash is not None:
        why = (f"{r.where}: rope_scaling and rope_parameters disagree on {clash} ({json.dumps(scaling[clash])} vs "
               f"{json.dumps(params[clash])}); transformers reads rope_scaling, newer readers rope_parameters: "
               f"keep one of them")
    return ("rope_scaling" if scaling else "rope_parameters"), {**params, **scaling}, why


def rope_from_hf(r: ConfigReader, max_len: int, *, scaled: bool = True, theta_key: str = "rope_theta",
                 fraction_key: str = "partial_rotary_factor", partial: bool = False) -> dict:
    """The ``rope`` position spec (a dict) for a config.json; ``max_len`` is its max_position_embeddings.

    ``scaled``: the architecture may scale RoPE (else only rope_type "default"); ``theta_key`` and
    ``fraction_key``: its top-level names for the base and the rotated fraction of a head
    (``partial``: a fraction below 1 is allowed and returned, else refused). Defaults come from the reader's.
    """
    where = r.where
    key, params, ambiguous = rope_table(r)
    kind = params.pop("rope_type", None) or "default"
    if kind != "default" and not scaled:
        raise HFFormatError(f"{where}: {key}.rope_type {kind!r} (scaled RoPE) is not supported by this "
                            f"architecture; only plain RoPE is")
    if kind not in _KEYS:
        raise HFFormatError(f"{where}: {key}.rope_type {kind!r} is not supported (supported: {', '.join(_KEYS)})")
    # the table's value, else the top level's (transformers 4's place), else the architecture's default
    theta = _first(params.pop("rope_theta", None), r.get(theta_key), r.defaults.get(theta_key))
    if theta is None:
        raise HFFormatError(f"{where}: config.json gives no RoPE base ({theta_key} or {key}.rope_theta)")
    fraction = float(_first(params.pop("partial_rotary_factor", None), r.get(fraction_key), 1.0))
    if fraction != 1.0 and not partial:  # these rotary embeddings rotate the whole head whatever this says
        raise HFFormatError(f"{where}: partial_rotary_factor = {fraction} is not supported by this architecture")
    extra = sorted(set(params) - _KEYS[kind])
    if extra:
        raise HFFormatError(f"{where}: {key}.{extra[0]} is not supported with rope_type {kind!r}")
    if ambiguous:  # after the checks above, so a setting no reader supports is named as such
        raise HFFormatError(ambiguous)
    out: dict = {"kind": "rope", "theta": float(theta)}
    if partial:
        out["fraction"] = fraction
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
            temperature = default_registry().get("position", "rope").factory.yarn_mscale
            attention = temperature(factor, mscale) / temperature(factor, mscale_all)
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
