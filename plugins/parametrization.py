"""Built-in parametrizations. Contract: factory(opts, dims) -> toolkit.contracts.Parametrization.

    standard  GPT-2's init, one learning rate, attention 1/sqrt(d): the model as it always was
    mup       the maximal update parametrization relative to a base width
              (Yang et al. 2021, "Tensor Programs V", Table 3 for Adam; microsoft/mup)

Under mup, with m = n_embd / base_width (and heads widening with the model unless head_dim is set):

    hidden matrices (two or more dims grow)   init std / sqrt(fan-in m), Adam lr / fan-in m
    embeddings, biases, gains (one dim grows)  init and lr as in standard
    output logits                              times 1/m (microsoft/mup's MuReadout; tied weights too)
    attention logits                           1/d instead of 1/sqrt(d): 1/sqrt(d) / head m

At n_embd = base_width every factor is 1, so a model tuned at the base width is the standard one,
and its learning rate and init carry over to wider models. The lr rules are Adam's: for Muon or
SGD they are not the muP rules. Weight decay stays decoupled at train.weight_decay (AdamW's lr * wd
shrinks with the hidden matrices' lr; microsoft/mup's MuAdamW can keep it constant instead).
"""
from __future__ import annotations

import attrs
from attrs import validators as v

from toolkit.hookspecs import hookimpl
from toolkit.validators import positive_int
from toolkit.registry import NoOptions


@attrs.frozen
class MupOptions:
    # the width (n_embd) at which mup equals standard: tune lr there, then widen and keep it
    base_width: int = attrs.field(validator=[v.instance_of(int), positive_int])


@hookimpl
def register_components(register):
    register("parametrization", "standard", "toolkit.plugins.impl.parametrization:Standard", NoOptions,
             doc="Standard parametrization: GPT-2's init, one learning rate, attention 1/sqrt(d) (changes nothing).")
    register("parametrization", "mup", "toolkit.plugins.impl.parametrization:Mup", MupOptions,
             doc="muP (Yang et al. 2021): hidden init and Adam lr scaled by width, attention 1/d, logits times base/width.")
