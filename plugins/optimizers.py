"""Built-in optimizers. Contract: factory(opts, model, recipe) -> torch.optim.Optimizer.

    adamw  AdamW with nanoGPT's weight-decay groups            (Loshchilov & Hutter 2019)
    muon   Muon for the blocks' weight matrices, AdamW for the rest   (Jordan et al. 2024, modded-nanogpt)

The recipe's schedule multiplies every group's learning rate by schedule(step) / train.lr, so a
group can start from a peak of its own (Muon's matrices from its ``lr``). A factory (one registered
by name: its options class) may define ``check_recipe(opts, recipe)`` returning problem lines: what
it cannot run under is refused before anything runs. It may also declare ``states_per_param``, the fp32 values of state it keeps per
parameter (a number, or a function of (name, parameter)), which ``inspect`` and the memory check
before training count; without it they count Adam's 2.
"""
from __future__ import annotations

import attrs
from attrs import validators as v

from toolkit.hookspecs import hookimpl


@attrs.frozen
class AdamWOptions:
    eps: float = attrs.field(default=1e-8, validator=v.gt(0.0))  # added to the update's denominator


@attrs.frozen
class MuonOptions:
    # peak learning rate of the block matrices (the AdamW part uses train.lr); the schedule scales both
    lr: float = attrs.field(default=0.02, validator=v.gt(0.0))
    momentum: float = attrs.field(default=0.95, validator=[v.ge(0.0), v.lt(1.0)])  # of the block matrices' updates
    nesterov: bool = True  # Nesterov momentum, as Jordan's reference
    ns_steps: int = attrs.field(default=5, validator=v.gt(0))  # Newton-Schulz iterations
    # decoupled weight decay of the block matrices (train.weight_decay is the AdamW part's)
    weight_decay: float = attrs.field(default=0.0, validator=v.ge(0.0))
    # "original": updates scaled by sqrt(max(1, rows/cols)) (Jordan); "match_rms_adamw": by
    # 0.2 * sqrt(max(rows, cols)), so AdamW's lr carries over (Liu et al. 2025, "Muon is Scalable")
    adjust_lr: str = attrs.field(default="original", validator=v.in_(("original", "match_rms_adamw")))

    @staticmethod
    def check_recipe(opts: MuonOptions, recipe) -> list[str]:
        ds = recipe.deepspeed
        if ds.zero_stage != 0:
            return [f"$.train.optimizer: muon orthogonalises whole matrices, but ZeRO stage {ds.zero_stage} hands the "
                    f"optimizer flat shards of them; use deepspeed.zero_stage = 0 (each rank runs the full update)"]
        if ds.precision == "fp16":
            return ["$.train.optimizer: muon cannot run under fp16 (DeepSpeed's fp16 optimizer flattens the "
                    "matrices); use precision \"bf16\" or \"fp32\""]
        return []


@hookimpl
def register_optimizers(register):
    register("adamw", "toolkit.plugins.impl.optimizers:adamw", AdamWOptions,
             doc="AdamW (Loshchilov & Hutter 2019) with nanoGPT's decay groups; fused, DeepSpeed's CPU Adam when offloading.")
    register("muon", "toolkit.plugins.impl.optimizers:Muon", MuonOptions,
             doc="Muon (Jordan et al. 2024): orthogonalised momentum for the blocks' matrices; AdamW for embeddings, head, gains and biases.")
