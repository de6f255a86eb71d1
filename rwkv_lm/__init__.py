"""rwkv_lm: train, run and show RWKV-7 language models."""
from .chat import ChatSession
from .checkpoint import export_gguf, export_hf, export_official, save
from .files import CheckpointError
from .generate import complete, generate, generate_batch
from .model import RWKV, RWKVConfig
from .runtime import load, prepare
from .gpt import GPT, GPTConfig, GPTState
from .sampling import SamplingParams
from .state import LayerState, RWKVState
from .statefile import load_state, save_state

__version__ = "0.1.0"
__all__ = ["RWKV", "RWKVConfig", "RWKVState", "LayerState", "CheckpointError", "load", "prepare", "save", "export_official",
           "export_gguf", "export_hf",
           "SamplingParams", "generate", "complete", "generate_batch", "ChatSession", "GPT", "GPTConfig", "GPTState",
           "load_state", "save_state"]
