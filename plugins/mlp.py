"""Built-in MLP components. Contract: factory(opts, dims) -> module; forward (B, T, C) -> (B, T, C)."""
from __future__ import annotations

import attrs
from attrs import validators as v

from toolkit.hookspecs import hookimpl
from toolkit.validators import positive_int


@attrs.frozen
class MLPOptions:
    # hidden width = multiplier * n_embd (4 in GPT-2), unless hidden_dim is given
    multiplier: float = attrs.field(default=4.0, validator=v.gt(0.0))
    # the width itself
    hidden_dim: int | None = attrs.field(default=None, validator=v.optional([v.instance_of(int), v.gt(0)]))


@attrs.frozen
class GeluOptions(MLPOptions):
    # "tanh" is GPT-2's gelu_new approximation; "none" is the exact erf form (Hendrycks & Gimpel 2016)
    approximate: str = attrs.field(default="tanh", validator=v.in_(("none", "tanh")))


@attrs.frozen
class GatedOptions:
    # hidden width = multiplier * n_embd rounded up to a multiple of `multiple_of`, unless hidden_dim is given.
    # 8/3 keeps the parameter count of a 4x ungated MLP with three matrices instead of two (Shazeer 2020).
    multiplier: float = attrs.field(default=8 / 3, validator=v.gt(0.0))
    multiple_of: int = attrs.field(default=64, validator=positive_int)  # for tensor-core friendly shapes (Llama)
    hidden_dim: int | None = attrs.field(default=None, validator=v.optional(positive_int))  # the width itself


@attrs.frozen
class GeGLUOptions(GatedOptions):
    # "none": the exact erf GELU of the paper; "tanh": the approximation (T5 v1.1's gelu_new)
    approximate: str = attrs.field(default="none", validator=v.in_(("none", "tanh")))


@hookimpl
def register_components(register):
    register("mlp", "gelu", "toolkit.plugins.impl.mlp:GeluMLP", GeluOptions,
             doc="GPT-2's MLP: Linear, GELU, Linear.")
    register("mlp", "relu", "toolkit.plugins.impl.mlp:ReluMLP", MLPOptions,
             doc="The original Transformer's MLP: Linear, ReLU, Linear.")
    register("mlp", "relu2", "toolkit.plugins.impl.mlp:Relu2MLP", MLPOptions,
             doc="Squared ReLU (So et al. 2021, Primer; the NanoGPT speedrun's MLP): Linear, relu(x)^2, Linear.")
    register("mlp", "swiglu", "toolkit.plugins.impl.mlp:SwiGLU", GatedOptions,
             doc="SwiGLU feed-forward (Shazeer 2020, as in PaLM and Llama): c_proj(silu(gate) * up).")
    register("mlp", "geglu", "toolkit.plugins.impl.mlp:GeGLU", GeGLUOptions,
             doc="GEGLU feed-forward (Shazeer 2020, as in T5 v1.1 and Gemma): c_proj(gelu(gate) * up).")
