"""Built-in norm components. Contract: factory(opts, dims, dim) -> module normalising the last dim."""
from __future__ import annotations

import attrs
from attrs import validators as v

from toolkit.hookspecs import hookimpl


@attrs.frozen
class LayerNormOptions:
    eps: float = attrs.field(default=1e-5, validator=v.gt(0.0))  # added to the variance before its square root
    # None: follow the model's `bias` setting; true/false: force it
    bias: bool | None = attrs.field(default=None, validator=v.optional(v.instance_of(bool)))


@attrs.frozen
class RMSNormOptions:
    # 1e-5 as in Llama 2/3's released configs (rms_norm_eps); HF's class default is 1e-6
    eps: float = attrs.field(default=1e-5, validator=v.gt(0.0))
    # the scale is offset + weight: Gemma stores weight around 0 and adds 1 (its weights load as they are)
    offset: float = 0.0


@attrs.frozen
class DyTOptions:
    # the initial alpha (0.5 in the paper for most models); for LLMs the paper starts the norms in
    # front of attention higher than the others (e.g. LLaMA 7B: 0.8 and 0.2, Table 10)
    alpha: float = attrs.field(default=0.5, validator=v.gt(0.0))
    # norms before attention; None: alpha
    alpha_attention: float | None = attrs.field(default=None, validator=v.optional(v.gt(0.0)))
    # every other norm; None: alpha
    alpha_other: float | None = attrs.field(default=None, validator=v.optional(v.gt(0.0)))


@hookimpl
def register_components(register):
    register("norm", "layernorm", "toolkit.plugins.impl.norm:LayerNorm", LayerNormOptions,
             doc="Layer normalisation (Ba et al. 2016) with an optional bias (PyTorch's has no bias=False before 2.1).")
    register("norm", "rmsnorm", "toolkit.plugins.impl.norm:RMSNorm", RMSNormOptions,
             doc="Root-mean-square normalisation (Zhang & Sennrich 2019): no mean subtraction, no bias, as in Llama.")
    register("norm", "dyt", "toolkit.plugins.impl.norm:DyT", DyTOptions,
             doc="Dynamic Tanh (Zhu et al. 2025): weight * tanh(alpha * x) + bias, a norm with no statistics.")
