"""playattention: compose decoder-only transformers from swappable plugins and train them with DeepSpeed.

Names are imported on first use, so importing ``toolkit`` (e.g. by the pytest plugin) costs nothing.
"""
import importlib

_EXPORTS = {
    "AttentionSpec": "model", "MlpSpec": "model", "ModelConfig": "model", "NormSpec": "model",
    "PositionSpec": "model", "Transformer": "model",
    "Dims": "contracts", "Position": "contracts", "attend": "contracts", "update_cache": "contracts",
    "hookimpl": "hookspecs",
    "get_plugin_manager": "plugin_manager", "get_registry": "plugin_manager",
    "load_recipe": "recipe",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'toolkit' has no attribute {name!r}")
