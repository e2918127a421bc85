"""playattention: compose decoder-only transformers from swappable plugins and train them with DeepSpeed."""
from .contracts import Dims, Position, attend, update_cache
from .hookspecs import hookimpl
from .model import AttentionSpec, MlpSpec, ModelConfig, NormSpec, PositionSpec, Transformer
from .plugin_manager import get_plugin_manager, get_registry

__all__ = [
    "AttentionSpec", "Dims", "MlpSpec", "ModelConfig", "NormSpec", "Position", "PositionSpec",
    "Transformer", "attend", "get_plugin_manager", "get_registry", "hookimpl", "update_cache",
]
