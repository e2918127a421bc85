"""What a component may ask of the model besides its forward: its own init, optimisation hints, metrics."""
import pytest
import torch
from torch import nn

from toolkit.contracts import hint
from toolkit.model import ModelConfig, Transformer
from toolkit.plugin_manager import PluginManager
from toolkit.contracts import param_groups


class Mixer(nn.Module):
    """An MLP stand-in with an identity-initialised mixing matrix that must not decay, and a slow gate."""

    def __init__(self, opts, dims):
        super().__init__()
        self.c_fc = nn.Linear(dims.n_embd, dims.n_embd)
        self.mix = hint(nn.Parameter(torch.empty(dims.n_embd, dims.n_embd)), weight_decay=False)
        self.gate = hint(nn.Parameter(torch.zeros(dims.n_embd)), lr_scale=0.1)
        self.layer = dims.layer

    def reset_parameters(self):  # called by the model after GPT-2's init
        nn.init.eye_(self.mix)

    def forward(self, x):
        return self.c_fc(x) @ self.mix + self.gate

    def metrics(self):
        return {"mix_trace": torch.trace(self.mix).detach(), "layer": self.layer}


@pytest.fixture
def model():
    pm = PluginManager(entry_points=False)
    pm.registry.register("mlp", "mixer", Mixer)
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=40, block_size=8, n_layer=2, n_head=2, n_embd=8, mlp="mixer"),
                       pm.registry)


def test_a_components_own_init_runs_after_the_models(model):
    mlp = model.transformer.h[0].mlp
    assert torch.equal(mlp.mix, torch.eye(8))  # its reset_parameters ran
    assert 0.01 < mlp.c_fc.weight.std().item() < 0.03  # and GPT-2's init still did the linear layers


def test_hints_move_parameters_between_decay_groups_and_scale_their_lr(model):
    groups = param_groups(model, 0.1, lr=1e-3)
    mlp = model.transformer.h[0].mlp
    where = {id(p): g for g in groups for p in g["params"]}
    assert where[id(mlp.mix)]["weight_decay"] == 0.0  # a matrix, but hinted
    assert where[id(mlp.c_fc.weight)]["weight_decay"] == 0.1
    assert where[id(mlp.gate)]["lr"] == pytest.approx(1e-4) and where[id(mlp.gate)]["weight_decay"] == 0.0
    assert "lr" not in where[id(mlp.c_fc.weight)]  # the optimizer's own lr
    with pytest.raises(ValueError, match="lr_scale hint"):
        param_groups(model, 0.1)


def test_component_metrics_are_averaged_over_layers(model):
    assert model.component_metrics() == {"mlp/mix_trace": 8.0, "mlp/layer": 0.5}
