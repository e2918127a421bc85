"""The example plugin package (examples/playattention-talking-heads), used as a stranger would use it:
pip-installed (into a temporary folder, so the venv is untouched), found through its entry point,
its options validated, passing the conformance kit; and the same module loaded as a plain file."""
import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from toolkit import plugin_manager
from toolkit.commands.plugins import render_plugins
from toolkit.errors import ConfigError
from toolkit.model import ModelConfig
from toolkit.plugin_manager import PluginManager
from toolkit.recipe import registry_of
from toolkit.testing.conformance import check_component

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "playattention-talking-heads"
MODULE = EXAMPLE / "src" / "playattention_talking_heads" / "__init__.py"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """`pip install --no-deps --no-build-isolation --no-index --target <tmp>` of a copy of the example."""
    work = tmp_path_factory.mktemp("talking-heads")
    source = work / "source"  # a copy: setuptools writes build/ and *.egg-info next to the sources
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", ".pytest_cache"))
    target = work / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "--target", str(target), str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return target


@pytest.fixture
def installed(site):
    """The installed example on sys.path for one test; a PluginManager made inside sees its entry point."""
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    plugin_manager.forget_loaded()  # registries loaded before it was installed do not know it
    yield site
    plugin_manager.forget_loaded()
    sys.path.remove(str(site))
    for name in [m for m in sys.modules if m.startswith("playattention_talking_heads")]:
        del sys.modules[name]
    importlib.invalidate_caches()


def test_installed_package_is_discovered_through_its_entry_point(installed):
    pm = PluginManager()
    comp = pm.registry.get("attention", "talking_heads")
    assert (comp.source.package, comp.source.version, comp.source.plugin) == ("playattention-talking-heads", "0.1.0", "talking_heads")
    assert comp.doc.startswith("Talking-heads attention (Shazeer et al. 2020)")
    assert not [f for f in pm.failures if f.package == "playattention-talking-heads"]
    listing = render_plugins(pm.registry)
    assert "talking_heads" in listing and "from playattention-talking-heads 0.1.0 (talking_heads)" in listing
    assert "mix: str = 'both'" in listing


def test_installed_package_options_are_validated_at_their_recipe_path(installed, tmp_path):
    from toolkit.recipe import load_recipe

    recipe = tmp_path / "th.toml"
    recipe.write_text('[model]\nn_layer = 2\n[model.attention]\nkind = "talking_heads"\nmix = "sideways"\n')
    with pytest.raises(ConfigError) as err:
        load_recipe(recipe)
    assert err.value.lines == [f'{recipe}: $.model.attention.mix: must be one of "both", "logits", "weights", got "sideways"']
    recipe.write_text('[model.attention]\nkind = "talking_heads"\nmix = "logits"\n')
    assert load_recipe(recipe).model.attention.kind == "talking_heads"


def test_installed_package_adds_a_schedule_a_recipe_can_name(installed, tmp_path):
    from toolkit.engine import lr_at
    from toolkit.recipe import load_recipe

    comp = PluginManager().registry.get("schedule", "inverse_sqrt")
    assert comp.source.package == "playattention-talking-heads" and comp.doc.startswith("Linear warmup")
    recipe = tmp_path / "sched.toml"
    recipe.write_text('[train]\nlr = 1.0\nmin_lr = 0.0\nwarmup_steps = 4\n[train.schedule]\nkind = "inverse_sqrt"\n'
                      'floor = 0.3\n')
    train = load_recipe(recipe).train
    assert [lr_at(s, train, registry_of(load_recipe(recipe))) for s in (0, 3, 15, 99)] == [0.25, 1.0, 0.5, 0.3]
    recipe.write_text('[train.schedule]\nkind = "inverse_sqrt"\nfloor = 2.0\n')
    with pytest.raises(ConfigError) as err:
        load_recipe(recipe)
    assert err.value.lines == [f"{recipe}: $.train.schedule.floor: must be <= 1, got 2.0"]


def test_installed_package_passes_the_conformance_kit(installed):
    registry = PluginManager().registry
    check_component("attention", "talking_heads", registry=registry)
    check_component("attention", "talking_heads", {"mix": "weights"}, registry=registry,
                    checks=["position_hooks", "causal", "kv_cache", "gradients", "partners"])


@pytest.fixture
def builtins_only(monkeypatch):
    """Registries that ignore installed packages (the example may be pip-installed here)."""
    monkeypatch.setattr(PluginManager, "load_entry_points", lambda self, group=None: None)
    plugin_manager.forget_loaded()
    yield
    plugin_manager.forget_loaded()


def test_the_same_module_loads_as_a_plugin_file_named_by_a_recipe(tmp_path, builtins_only, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a plugin file of the current project: it runs without asking
    from toolkit.model import Transformer
    from toolkit.recipe import load_recipe

    shutil.copy(MODULE, tmp_path / "talking_heads.py")  # a single file next to the recipe, no packaging
    (tmp_path / "recipe.toml").write_text(
        'plugins = ["talking_heads.py"]\n[model]\nn_layer = 1\nn_head = 2\nn_embd = 16\nblock_size = 8\n'
        'vocab_size = 50\n[model.attention]\nkind = "talking_heads"\n'
    )
    recipe = load_recipe(tmp_path / "recipe.toml")
    comp = registry_of(recipe).get("attention", "talking_heads")
    assert comp.source.plugin == str(tmp_path / "talking_heads.py")
    model = Transformer(recipe.model, registry_of(recipe))
    assert model.transformer.h[0].attn.mix_logits.shape == (2, 2)


def test_unknown_option_names_the_allowed_ones(installed):
    from toolkit.converter import structure

    with pytest.raises(ConfigError) as err:
        structure(PluginManager().registry, {"attention": {"kind": "talking_heads", "mixing": "both"}}, ModelConfig, "$.model")
    assert len(err.value.lines) == 1 and err.value.lines[0].startswith("$.model.attention.mixing:")
    assert "mix" in err.value.lines[0]


def _code_blocks(lang: str) -> list[str]:
    text = (Path(__file__).resolve().parents[1] / "CONTRIBUTING.md").read_text()
    return [block.split("\n", 1)[1] for block in text.split("```")[1::2] if block.startswith(lang + "\n")]


def test_contributing_walkthrough_plugin_loads_from_its_recipe_and_conforms(tmp_path, builtins_only, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a plugin file of the current project: it runs without asking
    from toolkit.recipe import load_recipe

    plugin = next(b for b in _code_blocks("python") if "def register_components" in b)
    recipe = next(b for b in _code_blocks("toml") if b.startswith("plugins = "))
    (tmp_path / "my_attention.py").write_text(plugin)
    (tmp_path / "recipe.toml").write_text(recipe)
    loaded = load_recipe(tmp_path / "recipe.toml")
    assert loaded.model.attention.options.init_temperature == 0.5
    (tmp_path / "typo.toml").write_text(recipe.replace("init_temperature", "init_temprature"))
    with pytest.raises(ConfigError) as err:
        load_recipe(tmp_path / "typo.toml")
    said = "$.model.attention.init_temprature: not an option of attention 'tempered'; did you mean 'init_temperature'?"
    assert err.value.lines == [f"{tmp_path / 'typo.toml'}: {said}"]
    assert said in (Path(__file__).resolve().parents[1] / "CONTRIBUTING.md").read_text()  # the guide shows the real message
    check_component("attention", "tempered", {"init_temperature": 0.5}, registry=registry_of(loaded))


@pytest.mark.slow
def test_the_example_packages_own_tests_pass_once_it_is_installed(site, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(site), "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE / "tests")],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout
