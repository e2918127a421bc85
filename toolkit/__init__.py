"""playattention: compose decoder-only transformers from swappable plugins and train them with DeepSpeed.

Names are imported on first use, so importing ``toolkit`` (e.g. by the pytest plugin) costs nothing.
"""
import importlib
import importlib.util
import sys
from pathlib import Path

_EXPORTS = {
    "AttentionSpec": "model", "MlpSpec": "model", "ModelConfig": "recipe", "NormSpec": "model",
    "PositionSpec": "model", "Transformer": "model",
    "Dims": "contracts", "Position": "contracts", "attend": "contracts", "update_cache": "contracts",
    "hookimpl": "hookspecs",
    "get_registry": "plugin_manager", "load_registry": "plugin_manager",
    "load_recipe": "recipe", "load_buildable": "probe",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'toolkit' has no attribute {name!r}")


def _map_checkout_plugins() -> None:
    """Installed, setuptools maps the repository's plugins/ folder to toolkit.plugins (pyproject.toml);
    a source checkout used without installing (PYTHONPATH=checkout) gets the same mapping here."""
    if "toolkit.plugins" in sys.modules or importlib.util.find_spec("toolkit.plugins") is not None:
        return
    folder = Path(__file__).resolve().parent.parent / "plugins"
    if not (folder / "__init__.py").is_file():
        return
    spec = importlib.util.spec_from_file_location("toolkit.plugins", folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["toolkit.plugins"] = module
    spec.loader.exec_module(module)


_map_checkout_plugins()
