"""rwkv_lm: train, run and show RWKV-7 language models."""
from .checkpoint import CheckpointError, export_official, load, save
from .model import RWKV, RWKVConfig
from .state import LayerState, RWKVState

__version__ = "0.1.0"
__all__ = ["RWKV", "RWKVConfig", "RWKVState", "LayerState", "CheckpointError", "load", "save", "export_official"]
