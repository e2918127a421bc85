"""``ComponentConformance``: the conformance checks as a pytest class, one test per check.

Subclass it in a test module (the class name must start with ``Test``)::

    from toolkit.testing import ComponentConformance

    class TestMyAttention(ComponentConformance):
        family = "attention"
        name = "my_attention"
        options = {"n_groups": 2}      # optional
        plugins = ["my_attention.py"]  # optional; relative paths are taken from the current directory

The compile test is marked ``slow``; deselect it with ``-m "not slow"`` while iterating.
"""
from __future__ import annotations

import pytest

from . import conformance


class ComponentConformance:
    """Base class: set ``family`` and ``name`` (and optionally ``options``, ``plugins``, ``model``)."""

    family: str = ""
    name: str = ""
    options: dict | object | None = None
    plugins: tuple[str, ...] | list[str] = ()
    model: dict | None = None  # ModelConfig overrides for the tiny test model
    compile_backend: str = "inductor"

    def subject(self) -> conformance.Subject:
        if not self.family or not self.name:
            raise conformance.ConformanceError(f"{type(self).__name__}: set the class attributes family and name")
        return conformance.make_subject(self.family, self.name, self.options, plugins=self.plugins, model=self.model)

    def check(self, name: str, **kwargs) -> None:
        subject = self.subject()
        reason = conformance.skip_reason(subject, name)
        if reason:
            pytest.skip(f"{subject.label} opts out of {name}: {reason}")
        conformance.run_check(subject, name, **kwargs)

    def test_is_registered_with_a_description(self):
        self.check("described")

    def test_reports_parameters_and_flops(self):
        self.check("counts")

    def test_keeps_shape_and_dtype_in_fp32_and_bf16(self):
        self.check("shape_and_dtype")

    def test_attention_uses_the_position_hooks(self):
        self.check("position_hooks")

    def test_never_looks_at_future_tokens(self):
        self.check("causal")

    def test_cached_decoding_matches_the_full_forward(self):
        self.check("kv_cache")

    def test_gradients_reach_every_parameter(self):
        self.check("gradients")

    def test_state_dict_round_trip_reproduces_outputs(self):
        self.check("state_dict")

    def test_same_seed_gives_same_weights_and_outputs(self):
        self.check("deterministic")

    def test_works_with_every_registered_partner(self):
        self.check("partners")

    def test_works_in_the_post_norm_layout(self):
        self.check("post_norm")

    def test_backends_give_the_same_outputs(self):
        self.check("backends")

    def test_flop_count_matches_torchs_flop_counter(self):
        self.check("flops")

    def test_attention_scales_logits_by_one_over_sqrt_head_dim(self):
        self.check("scale")

    def test_trains_through_a_deepspeed_engine(self):
        self.check("engine")

    def test_auxiliary_losses_are_finite_scalars_that_reach_the_parameters(self):
        self.check("aux_losses")

    def test_works_in_only_some_layers(self):
        self.check("per_layer")

    def test_per_forward_state_survives_checkpointing_and_compile(self):
        self.check("state")

    @pytest.mark.slow
    def test_compiled_model_matches_eager(self):
        self.check("compile", backend=self.compile_backend)
