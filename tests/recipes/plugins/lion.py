"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"): one momentum per parameter."""
import attrs
import torch

from toolkit.hookspecs import hookimpl
from toolkit.contracts import param_groups


@attrs.frozen
class LionOptions:
    beta1: float = 0.9  # interpolation of momentum and gradient for the update's sign
    beta2: float = 0.99  # the momentum's decay


class Undeclared(torch.optim.Optimizer):
    """Lion without saying how much state it keeps (counted as Adam's 2)."""

    Options = LionOptions

    def __init__(self, opts, model, recipe):
        t = recipe.train
        super().__init__(param_groups(model, t.weight_decay, t.lr), dict(lr=t.lr, betas=(opts.beta1, opts.beta2)))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                m = self.state[p].setdefault("exp_avg", torch.zeros_like(p))
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(torch.sign(m * b1 + p.grad * (1 - b1)), alpha=-group["lr"])
                m.mul_(b2).add_(p.grad, alpha=1 - b2)


class Lion(Undeclared):
    """Lion: the sign of interpolated momentum, decoupled weight decay (Chen et al. 2023)."""

    states_per_param = 1  # the momentum only (Adam keeps 2)


@hookimpl
def register_optimizers(register):
    register("lion", Lion)
    register("undeclared", Undeclared)
