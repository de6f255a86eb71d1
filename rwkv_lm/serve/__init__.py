"""Serving: one engine (continuous batching, a prefix state cache) under every way of running a model: the
Python streams (`rwkv_lm.generate`), chat sessions, the OpenAI-compatible HTTP server and the demo."""
from .cache import StateCache, state_key
from .engine import PREFILL_TOKENS, Engine, EngineFull, Phase, check_tokenizer, engine_for, prefill
from .request import Request, Stream
from .text import TextStream

__all__ = ["PREFILL_TOKENS", "Engine", "EngineFull", "Phase", "prefill", "Request", "Stream", "StateCache", "TextStream", "check_tokenizer", "engine_for",
           "state_key"]
