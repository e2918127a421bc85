"""Hugging Face checkpoint folders in and out, from local files only (nothing is downloaded).

:data:`ARCHITECTURES` is the dispatch table: one :class:`Architecture` per ``config.json``
``model_type``, saying how its config and tensors map onto the composed model and (where it can)
back. :func:`load_hf` reads any folder whose ``model_type`` is in the table; :func:`save_hf`
writes a model in the first architecture that can express it (or the one you name). ``playattention
convert`` (toolkit/convert.py) uses both. Adding an architecture is one module here and one entry.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Callable

import attrs
import torch

from ..model import ModelConfig, Transformer
from ..registry import Registry
from . import gemma2, gpt2, gpt_neox, llama, olmo2
from .common import HFFormatError, load_checkpoint, read_config, read_state_dict, unwrap, write_checkpoint
from .gemma2 import gemma2_config_from_hf, hf_config_from_gemma2, load_gemma2, save_gemma2
from .gpt2 import gpt2_config_from_hf, hf_config_from_gpt2, load_gpt2, save_gpt2
from .gpt_neox import gpt_neox_config_from_hf, hf_config_from_gpt_neox, load_gpt_neox, save_gpt_neox
from .llama import Family, llama_config_from_hf, load_llama, save_llama
from .mistral import MISTRAL
from .mixtral import MIXTRAL
from .olmo2 import hf_config_from_olmo2, load_olmo2, olmo2_config_from_hf, save_olmo2
from .qwen3 import QWEN3


@attrs.frozen
class Architecture:
    """One Hugging Face model family: how its folders map onto the composed model, and back."""

    model_type: str  # config.json's "model_type"
    hf_class: str  # the transformers class that loads such a folder ("architectures" in config.json)
    # (config.json as a dict, *, dropout, where) -> ModelConfig; HFFormatError naming any setting it cannot honour
    config_from_hf: Callable[..., ModelConfig]
    # (HF tensors by name, our ModelConfig, where) -> our tensors by name (load_into reports what does not fit)
    state_dict_from_hf: Callable[[dict, ModelConfig, str], dict]
    # (model) -> config.json dict; HFFormatError saying what the architecture cannot express. None: import only
    config_to_hf: Callable[[Transformer], dict] | None = None
    # (model) -> HF tensors by name
    state_dict_to_hf: Callable[[Transformer], dict] | None = None

    @property
    def exports(self) -> bool:
        return self.config_to_hf is not None and self.state_dict_to_hf is not None


def _named(tensors_to_hf: Callable[[dict, ModelConfig], dict]) -> Callable[[Transformer], dict]:
    """A model's HF tensors from a function that renames tensors (Gemma 2, OLMo 2, GPT-NeoX map name by name)."""
    def state_dict_to_hf(model: Transformer) -> dict:
        model = unwrap(model)
        return tensors_to_hf(model.state_dict(), model.config)
    return state_dict_to_hf


def _llama_like(fam: Family) -> Architecture:
    """The table entry of a Llama-like architecture (toolkit/hf/llama.py does the work for all of them)."""
    return Architecture(fam.model_type, fam.hf_class, partial(llama.config_from_hf, fam), llama.state_dict_from_hf,
                        partial(llama.config_to_hf, fam), partial(llama.state_dict_to_hf, fam))


#: model_type -> Architecture; the order is the order save_hf tries them in (the plainest first)
ARCHITECTURES: dict[str, Architecture] = {
    "gpt2": Architecture("gpt2", "GPT2LMHeadModel", gpt2.gpt2_config_from_hf,
                         lambda sd, config, where: gpt2.gpt2_state_dict_from_hf(sd, config.tie_embeddings),
                         gpt2.hf_config_from_gpt2, gpt2.gpt2_state_dict_to_hf),
    "llama": _llama_like(llama.LLAMA),
    "mistral": _llama_like(MISTRAL),
    "mixtral": _llama_like(MIXTRAL),
    "qwen3": _llama_like(QWEN3),
    "gemma2": Architecture("gemma2", "Gemma2ForCausalLM", gemma2_config_from_hf, gemma2.gemma2_state_dict_from_hf,
                           hf_config_from_gemma2, _named(gemma2.gemma2_tensors_to_hf)),
    "olmo2": Architecture("olmo2", "Olmo2ForCausalLM", olmo2_config_from_hf, olmo2.olmo2_state_dict_from_hf,
                          hf_config_from_olmo2, _named(olmo2.olmo2_tensors_to_hf)),
    "gpt_neox": Architecture("gpt_neox", "GPTNeoXForCausalLM", gpt_neox_config_from_hf,
                             gpt_neox.gpt_neox_state_dict_from_hf, hf_config_from_gpt_neox,
                             _named(gpt_neox.gpt_neox_tensors_to_hf)),
}


def architecture_of(hf: dict, where: str) -> Architecture:
    """The table entry for a config.json (as a dict); HFFormatError naming its model_type if there is none."""
    kind = hf.get("model_type")
    if kind not in ARCHITECTURES:
        archs = ", ".join(hf.get("architectures") or []) or "none listed"
        raise HFFormatError(f"{where}: model_type {kind!r} (architectures: {archs}) is not supported; "
                            f"supported: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[kind]


def hf_model_config(path: str | Path, *, dropout: float = 0.0) -> ModelConfig:
    """The :class:`ModelConfig` of a local HF folder, from its config.json alone."""
    hf = read_config(path)
    return architecture_of(hf, f"{path}/config.json").config_from_hf(hf, dropout=dropout, where=f"{path}/config.json")


def load_hf(path: str | Path, *, dropout: float = 0.0, dtype: torch.dtype | None = None,
            registry: Registry | None = None) -> Transformer:
    """A :class:`Transformer` (eval mode) with the weights of a local HF folder of any architecture in the table."""
    hf = read_config(path)
    arch = architecture_of(hf, f"{path}/config.json")
    return load_checkpoint(path, arch.config_from_hf, arch.state_dict_from_hf, dropout=dropout, dtype=dtype,
                           registry=registry)


def export_architecture(model: Transformer, model_type: str | None = None) -> tuple[Architecture, dict]:
    """(architecture, its config.json) for ``model``: the one named, or the first in the table that can express it."""
    model = unwrap(model)
    if model.config.parametrization.kind != "standard":  # its multipliers have no config.json key anywhere
        raise HFFormatError(f"no Hugging Face architecture can express parametrization "
                            f"'{model.config.parametrization.kind}' (its logit and attention multipliers)")
    if model_type is not None:
        if model_type not in ARCHITECTURES:
            raise HFFormatError(f"unknown architecture {model_type!r}; supported: {', '.join(ARCHITECTURES)}")
        arch = ARCHITECTURES[model_type]
        if not arch.exports:
            raise HFFormatError(f"architecture {model_type!r} can be imported but not exported")
        return arch, arch.config_to_hf(model)
    reasons = []
    for arch in ARCHITECTURES.values():
        if not arch.exports:
            continue
        try:
            return arch, arch.config_to_hf(model)
        except HFFormatError as exc:
            reasons.append(f"{arch.model_type}: {str(exc).removeprefix('cannot export as ')}")
    raise HFFormatError("no Hugging Face architecture can express this model (" + "; ".join(reasons) + ")")


def save_hf(model: Transformer, path: str | Path, model_type: str | None = None) -> Architecture:
    """Write ``model`` as a HF folder (config.json + model.safetensors); returns the architecture it chose."""
    arch, config = export_architecture(model, model_type)
    write_checkpoint(path, config, arch.state_dict_to_hf(unwrap(model)))
    return arch


__all__ = [
    "ARCHITECTURES", "Architecture", "HFFormatError", "architecture_of", "export_architecture",
    "gemma2_config_from_hf", "gpt2_config_from_hf", "gpt_neox_config_from_hf", "hf_config_from_gemma2",
    "hf_config_from_gpt2", "hf_config_from_gpt_neox", "hf_config_from_olmo2", "hf_model_config",
    "llama_config_from_hf", "load_gemma2", "load_gpt2", "load_gpt_neox", "load_hf", "load_llama", "load_olmo2",
    "olmo2_config_from_hf", "read_config", "read_state_dict", "save_gemma2", "save_gpt2", "save_gpt_neox", "save_hf",
    "save_llama", "save_olmo2",
]
