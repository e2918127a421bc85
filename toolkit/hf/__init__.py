"""Hugging Face checkpoint folders in and out, from local files only (nothing is downloaded).

Each architecture is an :class:`Adapter` registered under its config.json ``model_type`` through the
``register_architectures`` hook: the built-in ones by ``plugins/architectures.py``, others by any
plugin, as components are. :func:`load_hf` reads any folder whose ``model_type`` the registry has;
:func:`save_hf` writes a model in the first architecture that can express it (or the one you name).
``playattention convert`` (toolkit/convert.py) uses both; ``playattention plugins architecture`` lists them.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..model import ModelConfig, Transformer
from ..plugin_manager import default_registry
from ..registry import Registry
from .adapter import Adapter
from .common import ConfigReader, HFFormatError, read_config, read_state_dict, unwrap, write_checkpoint

FAMILY = "architecture"  # the registry family (toolkit/families.py)


def architectures(registry: Registry | None = None) -> list[Adapter]:
    """Every registered architecture, in the order save_hf tries them (the plainest first)."""
    reg = registry or default_registry()
    adapters = [reg.build_in(FAMILY, name) for name in reg.names(FAMILY)]
    return sorted(adapters, key=lambda a: (a.export_rank, a.model_type))


def _names(registry: Registry) -> str:
    return ", ".join(a.model_type for a in architectures(registry))


def adapter(model_type: str, registry: Registry | None = None) -> Adapter:
    """The registered architecture ``model_type``; HFFormatError naming the registered ones otherwise."""
    reg = registry or default_registry()
    if not isinstance(model_type, str) or (FAMILY, model_type) not in reg:
        raise HFFormatError(f"unknown architecture {model_type!r}; supported: {_names(reg)}")
    return reg.build_in(FAMILY, model_type)


def adapter_for(hf: dict, where: str, registry: Registry | None = None) -> Adapter:
    """The architecture of a config.json (as a dict); HFFormatError naming its model_type if none is registered."""
    reg = registry or default_registry()
    kind = hf.get("model_type")
    if not isinstance(kind, str) or (FAMILY, kind) not in reg:
        archs = ", ".join(hf.get("architectures") or []) or "none listed"
        raise HFFormatError(f"{where}: model_type {kind!r} (architectures: {archs}) is not supported; "
                            f"supported: {_names(reg)}")
    return reg.build_in(FAMILY, kind)


def hf_model_config(path: str | Path, *, dropout: float = 0.0, registry: Registry | None = None) -> ModelConfig:
    """The :class:`ModelConfig` of a local HF folder, from its config.json alone."""
    hf, where = read_config(path), f"{path}/config.json"
    return adapter_for(hf, where, registry).config_from_hf(hf, dropout=dropout, where=where)


def load_hf(path: str | Path, *, dropout: float = 0.0, dtype: torch.dtype | None = None,
            registry: Registry | None = None) -> Transformer:
    """A :class:`Transformer` (eval mode) with the weights of a local HF folder of any registered architecture."""
    ad = adapter_for(read_config(path), f"{path}/config.json", registry)
    return ad.load(path, dropout=dropout, dtype=dtype, registry=registry)


def export_architecture(model: Transformer, model_type: str | None = None,
                        registry: Registry | None = None) -> tuple[Adapter, dict]:
    """(architecture, its config.json) for ``model``: the one named, or the first that can express it."""
    model = unwrap(model)
    if model.config.parametrization.kind != "standard":  # its multipliers have no config.json key anywhere
        raise HFFormatError(f"no Hugging Face architecture can express parametrization "
                            f"'{model.config.parametrization.kind}' (its logit and attention multipliers)")
    if model_type is not None:
        ad = adapter(model_type, registry)
        if not ad.exports:
            raise HFFormatError(f"architecture {model_type!r} can be imported but not exported")
        return ad, ad.config_to_hf(model)
    reasons = []
    for ad in architectures(registry):
        if not ad.exports:
            continue
        try:
            return ad, ad.config_to_hf(model)
        except HFFormatError as exc:
            reasons.append(f"{ad.model_type}: {str(exc).removeprefix('cannot export as ')}")
    raise HFFormatError("no Hugging Face architecture can express this model (" + "; ".join(reasons) + ")")


def save_hf(model: Transformer, path: str | Path, model_type: str | None = None,
            registry: Registry | None = None) -> Adapter:
    """Write ``model`` as a HF folder (config.json + model.safetensors); returns the architecture it chose."""
    ad, config = export_architecture(model, model_type, registry)
    inner = unwrap(model)
    write_checkpoint(path, config, ad.state_dict_to_hf(inner.state_dict(), inner.config))
    return ad


__all__ = [
    "Adapter", "ConfigReader", "HFFormatError", "adapter", "adapter_for", "architectures", "export_architecture",
    "hf_model_config", "load_hf", "read_config", "read_state_dict", "save_hf",
]
