"""Plugin files written against the previous release (tests/compat/) load beside the built-ins that
later took their names (diff, dyt, moe), and a recipe chooses them by namespace (``old_diff:diff``)."""
from pathlib import Path

import pytest
import torch

from toolkit.errors import ConfigError
from toolkit.model import Transformer
from toolkit.plugin_manager import load_registry
from toolkit.recipe import load_recipe, registry_of
from toolkit.probe import load_buildable
from toolkit.testing import conformance

COMPAT = Path(__file__).resolve().parent / "compat"
FILES = [str(COMPAT / f"old_{name}.py") for name in ("diff", "dyt", "moe", "position")]
CHOSEN = {"attention": "old_diff:diff", "norm": "old_dyt:dyt", "mlp": "old_moe:moe", "position": "linear_bias"}


def recipe_text(**kinds) -> str:
    plugins = ", ".join(f'"{f}"' for f in FILES)
    tables = "".join(f'\n[model.{family}]\nkind = "{kind}"\n' for family, kind in kinds.items())
    return (f"plugins = [{plugins}]\n\n[model]\nvocab_size = 65\nblock_size = 16\nn_layer = 2\nn_head = 2\n"
            f"n_embd = 32\n{tables}")


def test_old_plugin_files_load_beside_the_builtins_of_their_names():
    registry = load_registry(FILES)
    assert not registry.failures
    for family, kind in CHOSEN.items():
        assert registry.get(family, kind).source.plugin in FILES
    for family, name in (("attention", "diff"), ("norm", "dyt"), ("mlp", "moe")):
        assert registry.get(family, name).source.package == "playattention"  # a bare name: still the built-in
        assert f"old_{name}:{name}" in registry.names(family)


def test_a_recipe_chooses_the_old_plugins_by_namespace_and_the_model_runs(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text(recipe_text(**CHOSEN))
    recipe = load_recipe(path)
    model = Transformer(recipe.model, registry_of(recipe))
    built = {type(model.transformer.h[0].attn).__module__, type(model.transformer.h[0].ln_1).__module__,
             type(model.transformer.h[0].mlp).__module__, type(model.transformer.wpe).__module__}
    assert all(name.startswith("playattention_plugin_old_") for name in built)
    logits, loss = model(torch.randint(0, 65, (2, 16)), torch.randint(0, 65, (2, 16)))
    assert logits.shape == (2, 16, 65) and torch.isfinite(loss)


@pytest.mark.parametrize("family", ["attention", "norm", "mlp", "position"])
def test_old_plugins_keep_the_contract_under_their_qualified_names(family):
    conformance.check_component(family, CHOSEN[family], plugins=FILES,
                                checks=["shape_and_dtype", "causal", "kv_cache", "gradients", "state_dict"])


def test_an_old_position_asked_for_fewer_heads_than_it_has_says_what_to_change(tmp_path):
    # the built-in diff asks the position for n_head / 2 heads; this position's score_bias has no n_head
    path = tmp_path / "r.toml"
    path.write_text(recipe_text(attention="diff", position="linear_bias"))
    with pytest.raises(ConfigError) as info:  # the recipe check's forward on the meta device finds it
        load_buildable(path)
    assert str(info.value).endswith(
        "position 'LinearBias': score_bias gave a bias for 2 heads where the attention asks for 1; give score_bias an "
        "n_head argument and return that many heads (toolkit.contracts.Position)")
    assert len(str(info.value).splitlines()) == 1
