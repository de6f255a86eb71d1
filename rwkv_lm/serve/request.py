"""What a caller hands the engine (`Request`) and what it gets back (`Stream`: the text as it comes, sync or
async, and the request's counts once it ends)."""
from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from ..chat_template import TURN_END
from ..sampling import SamplingParams
from ..tokenizer import END_OF_TEXT_ID

_WAIT, _END = object(), object()  # no piece yet; no piece ever again


@dataclass(frozen=True)
class Request:
    """One generation: feed `prompt` (token ids) after `state`, then sample up to `params.max_tokens` tokens.

    state: where to start (a batch-1 model state, e.g. a chat session's); None starts from the model's zero
      state, which lets the engine's prefix cache skip a prompt beginning it has read before.
    state_key: a name for `state` that stays the same for the same state (`rwkv_lm.serve.state_key(state)`, a
      digest, as the server, chat sessions and the demo give for a tuned state): the prefix cache then serves this
      request too, keeping its entries apart from those of every other starting state.
    stop: stop strings on top of `params.stop` (a chat template's end of turn, say).
    banned: token ids never drawn. end_tokens: drawn, they end the text (finish reason "stop").
    keep_state: hand the final state back (`Stream.state`, with `Stream.tokens[-1]` not yet fed).
    lstrip: characters dropped from the start of the text (the space a chat template puts after its cue).
    grammar: what the text must be (`rwkv_lm.serve.grammar.Grammar`: a JSON schema, any JSON object, lark); a
      token the grammar forbids is never drawn, and the row ends where the grammar is complete.
    logprobs: record each drawn token's log-probability and its `logprobs` most likely alternatives
      (`Stream.logprobs`); None records nothing. They are the model's own (log_softmax of its logits over the ids
      the tokenizer can spell, before penalties, bias, temperature or a grammar): what evaluation needs.
    prompt_logprobs: the same for the prompt's tokens (`Stream.prompt_logprobs`; the first has none); such a
      prompt is read whole, past the prefix cache. read_only: read the prompt and end without drawing a token
      (OpenAI's echo with max_tokens 0).
    """

    prompt: Sequence[int]
    params: SamplingParams
    state: object | None = None
    stop: tuple[str, ...] = ()
    banned: tuple[int, ...] = ()
    end_tokens: tuple[int, ...] = (END_OF_TEXT_ID,)
    keep_state: bool = False
    lstrip: str = ""
    state_key: str | None = None
    grammar: object | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    read_only: bool = False

    @classmethod
    def chat_reply(cls, tokens: Sequence[int], params: SamplingParams, state=None, *, keep_state: bool = False,
                   grammar=None, state_key: str | None = None) -> "Request":
        """An assistant's reply after `tokens` (a conversation in the chat template, ending with its cue): it ends
        at the blank line that closes a turn (or where `grammar` is complete), never draws the end-of-text token,
        and drops the space the template puts after the cue."""
        return cls(tokens, params, state=state, stop=(TURN_END,), banned=(END_OF_TEXT_ID,), keep_state=keep_state,
                   lstrip=" ", grammar=grammar, state_key=state_key)


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model, and the `top` most likely tokens at its place (id, logprob)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


class Stream:
    """The text of one request, in pieces of whole characters: `for piece in stream` or `async for`.

    Closing it (or an HTTP client going away) cancels the request; the engine frees its row within one
    iteration. A stream left unread in a running engine runs to its end. Counts are kept up to date while it runs:
    `prompt_tokens`, `cached_tokens` (of those, read from the prefix cache), `completion_tokens`, `tokens`
    (the ids drawn), `first_token_s` (seconds from submission), `busy_s` (time in the steps that made its
    tokens), `token_s` (per token, the time of the step, or for the first the prefill, that made it), `state_bytes` (its state's size at its last token), `finish_reason` ("stop", "length",
    "cancelled", "error"; None while it runs), with `keep_state`, `state`, and with `logprobs` /
    `prompt_logprobs`, a `TokenLogprob` per token drawn / per prompt token (None for the first).
    """

    def __init__(self, request: Request, engine):
        self.request, self._engine = request, engine
        self.prompt_tokens, self.cached_tokens, self.completion_tokens = len(request.prompt), 0, 0
        self.tokens: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.prompt_logprobs: list[TokenLogprob | None] = []
        self.submitted = time.perf_counter()
        self.first_token_s: float | None = None
        self.state_bytes = 0
        self.token_s: list[float] = []
        self.finish_reason: str | None = None
        self.stop_hit: str | None = None
        self.state = None
        self.error: BaseException | None = None
        self._pieces: deque = deque()
        self._done = threading.Event()
        self._wakeup = threading.Condition()
        self._async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    # -- the engine's side: it calls only these two ---------------------------------------------------------
    def deliver(self, piece: str) -> None:
        """A piece of text for the reader (called by the engine)."""
        with self._wakeup:
            self._pieces.append(piece)
            self._notify()

    def end(self, reason: str, error: BaseException | None = None) -> None:
        """The request is over, for `reason` (called by the engine; the first reason given stays)."""
        with self._wakeup:
            if self.finish_reason is None:
                self.finish_reason, self.error = reason, error
            self._done.set()
            self._notify()

    def _notify(self) -> None:
        self._wakeup.notify_all()
        for loop, event in self._async_waiters:
            loop.call_soon_threadsafe(event.set)
        self._async_waiters.clear()

    # -- the caller's side --------------------------------------------------------------------------------
    @property
    def busy_s(self) -> float:
        return sum(self.token_s)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def __iter__(self):
        return self

    def __next__(self) -> str:
        while (piece := self._next_piece()) is _WAIT:
            with self._wakeup:
                if self._engine.running:
                    if not (self._pieces or self.done):  # news since _next_piece would not wake this wait
                        self._wakeup.wait(timeout=1.0)
                    continue
            self._engine.drive()  # no loop thread: the caller's thread runs the engine
        if piece is _END:
            raise StopIteration
        return piece

    def __aiter__(self):
        return self

    async def __anext__(self) -> str:
        if not (self._engine.running or self.done):  # (a stream ended by Engine.stop can still be read to its end)
            raise RuntimeError("async iteration needs a running engine (Engine.start())")
        event = asyncio.Event()
        while (piece := self._next_piece(event)) is _WAIT:
            await event.wait()
            event.clear()
        if piece is _END:
            raise StopAsyncIteration
        return piece

    def _next_piece(self, event: asyncio.Event | None = None):
        """The next piece, _END (or the error) at the end, or _WAIT (then `event` is set when there is news)."""
        with self._wakeup:
            if self._pieces:
                return self._pieces.popleft()
            if not self.done:
                if event is not None:
                    self._async_waiters.append((asyncio.get_running_loop(), event))
                return _WAIT
        if self.error is not None:
            raise self.error
        return _END

    def snapshot(self):
        """(the state after every token drawn so far but the last, the last) while it runs, for a request
        with `keep_state`."""
        return self._engine.snapshot(self)

    def text(self) -> str:
        """Everything that is still to come, joined (waits for the end)."""
        return "".join(self)

    def close(self, wait: bool = True) -> None:
        """Cancel the request if it still runs; with `wait`, return once the engine has let go of it (so
        `state` and the counts are final)."""
        if self.done:
            return
        self._engine.cancelled(self)
        if wait:
            if self._engine.running:
                self._done.wait()
            else:
                self._engine.step()

    async def aclose(self) -> None:
        """Cancel without waiting (the event loop is not blocked)."""
        self.close(wait=False)
