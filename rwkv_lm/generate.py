"""Text generation from Python: thin callers of the serving engine (`rwkv_lm.serve`), which prefills the
prompt in chunks, then steps the model one token at a time, sampling with `SamplingParams` and streaming
text that never splits a UTF-8 character.

Without an `engine`, each call runs a private one in the caller's thread, which works only while the text
is read; pass a started `Engine` to share batched steps and the prefix cache with other callers.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

from .sampling import SamplingParams, resolve
from .serve import Engine, Request, Stream, check_tokenizer, engine_for

def generate(model, tokenizer, prompt: str, params: SamplingParams | None = None, *, engine: Engine | None = None,
             state=None, grammar=None, **overrides) -> Stream:
    """Stream the completion of `prompt` as text pieces; breaking out of the loop and closing the stream
    stops the work at once. Ends after `max_tokens`, at a stop string, or at token 0 (end of document).
    `state`: a state of one row to start from (e.g. `rwkv_lm.load_state(path, model)`); None: zeros.
    `grammar`: what the text must be (`rwkv_lm.serve.grammar.Grammar`, e.g. `Grammar.json_schema(schema)`)."""
    params = resolve(params, overrides)
    check_tokenizer(model, tokenizer)
    if not isinstance(prompt, str) or not prompt:
        raise ValueError("prompt must be a non-empty string")
    return engine_for(model, tokenizer, engine).submit(Request(tokenizer.encode(prompt), params, state=state, grammar=grammar))


def complete(model, tokenizer, prompt: str, params: SamplingParams | None = None,
             callback: Callable[[str], None] | None = None, **overrides) -> str:
    """The whole completion as one string; `callback(piece)` sees each piece as it comes (as `rwkv`'s PIPELINE)."""
    pieces = []
    for piece in generate(model, tokenizer, prompt, params, **overrides):
        if callback is not None:
            callback(piece)
        pieces.append(piece)
    return "".join(pieces)


def generate_batch(model, tokenizer, prompts: Sequence[str], params: SamplingParams | None = None, *,
                   engine: Engine | None = None, **overrides) -> list[str]:
    """Complete several prompts of any lengths in one batch; greedy rows equal their single-prompt results.

    Each prompt is prefilled alone (no padding enters any state), then all rows decode together;
    finished rows leave the batch.
    """
    params = resolve(params, overrides)
    check_tokenizer(model, tokenizer)
    if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty strings")
    engine = engine_for(model, tokenizer, engine, rows=len(prompts))
    streams = [engine.submit(Request(tokenizer.encode(p), params)) for p in prompts]
    return [stream.text() for stream in streams]
