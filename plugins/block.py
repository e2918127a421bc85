"""Built-in blocks: where the norms and the residual connections sit around attention and the MLP.

Contract: factory(opts, dims) -> module; forward(x, position, pos, cache=None, state=None) -> x. A block builds
this layer's attention, norms and MLP with ``dims.part(family, ...)`` (the layer's own choices when
a recipe gives them), keeps GPT-2's names (ln_1, attn, ln_2, mlp) so weights load by name, and says
with ``final_norm`` whether the model needs a norm after the last block. Each hands the per-forward
state to the parts that ask for it (toolkit.contracts, "State between layers").

    pre_norm    x + attn(ln_1(x)); x + mlp(ln_2(x))                         (GPT-2, Llama)
    post_norm   ln_1(x + attn(x)); ln_2(x + mlp(x))                         (Vaswani et al. 2017)
    parallel    x + attn(ln_1(x)) + mlp(ln_1(x)), or ln_2 for the MLP      (GPT-J, PaLM; GPT-NeoX)
    sandwich    x + post_ln_1(attn(ln_1(x))); x + post_ln_2(mlp(ln_2(x)))   (Gemma 2; OLMo 2 with pre = false)
"""
from __future__ import annotations

import attrs

from toolkit.hookspecs import hookimpl
from toolkit.registry import NoOptions


@attrs.frozen
class ParallelOptions:
    # one norm feeding both branches (GPT-J, PaLM) or one each (GPT-NeoX's use_parallel_residual)
    shared_norm: bool = True


@attrs.frozen
class SandwichOptions:
    pre: bool = True  # a norm on each branch's input (Gemma 2); OLMo 2 has none
    post: bool = True  # a norm on each branch's output before the residual add (both)


@hookimpl
def register_components(register):
    register("block", "pre_norm", "toolkit.plugins.impl.block:PreNorm", NoOptions,
             doc="Pre-norm residual block (GPT-2): the residual stream stays un-normalised, which keeps deep stacks trainable.")
    register("block", "post_norm", "toolkit.plugins.impl.block:PostNorm", NoOptions,
             doc="Post-norm residual block (Vaswani et al. 2017): normalise after each residual add.")
    register("block", "parallel", "toolkit.plugins.impl.block:Parallel", ParallelOptions,
             doc="Parallel block (GPT-J; PaLM, Chowdhery et al. 2022): attention and MLP read the same input, added together.")
    register("block", "sandwich", "toolkit.plugins.impl.block:Sandwich", SandwichOptions,
             doc="Norms around each branch, before and/or after it (Gemma 2, Team 2024; OLMo 2, OLMo et al. 2024).")
