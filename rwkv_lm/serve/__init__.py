"""Serving: one engine (continuous batching, a prefix state cache) under every way of running a model: the
Python streams (`rwkv_lm.generate`), chat sessions, the OpenAI-compatible HTTP server and the demo."""
from .cache import StateCache
from .engine import Engine, EngineFull, check_tokenizer, engine_for
from .request import END_OF_TEXT, Request, Stream
from .text import TextStream

__all__ = ["Engine", "EngineFull", "Request", "Stream", "StateCache", "TextStream", "END_OF_TEXT", "check_tokenizer", "engine_for"]
