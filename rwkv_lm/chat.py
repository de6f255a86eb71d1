"""Chat sessions in the RWKV World / G1 template (`chat_template.py`), the model state carried from turn to turn.

A turn feeds only its own new tokens: the state already holds the conversation. A session can be forked
(a long system prompt is read once, then shared) and saved to / loaded from a safetensors file. Replies (and the
system prompt) run through the serving engine: a private one in the caller's thread, or a shared, started `Engine`
(the demo's), where many sessions' replies share batched steps. A session started from a tuned state asks the
engine for it as the server does (`Request.state` and `state_key`), so an engine with a prefix cache reads a system
prompt once per starting state, never sharing it between two states.
"""
from __future__ import annotations

import json
from collections.abc import Iterator

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .chat_template import REPLY_CUE, TURN_END, clean_message, turn_text
from .files import atomic_write
from .sampling import SamplingParams, resolve
from .serve import Engine, Request, check_tokenizer, engine_for, prefill, state_key
from .statefile import load_state

FORMAT = "rwkv_lm.chat"
# What `rwkv-lm chat` and the demo's Chat tab sample with unless told otherwise: RWKV's chat settings (a narrow
# top-p, penalties on repeats that fade by 0.996 a token)
CHAT_DEFAULTS = SamplingParams(max_tokens=500, temperature=1.0, top_p=0.3, presence_penalty=0.5, frequency_penalty=0.5,
                               penalty_decay=0.996)


class ChatSession:
    """One conversation with a model. `reply` streams the answer to a user message.

    Any model with the package's interface works (RWKV, or a model whose state has `nbytes`, `clone`
    and, for save/load, `tensors()` / `from_tensors`). `engine`: a started Engine of the same model to reply
    through (shared with other sessions); None runs each reply in the caller's thread.
    """

    def __init__(self, model, tokenizer, system: str | None = None, state=None, *, engine: Engine | None = None):
        """state: where the conversation starts, before the system prompt: a tuned-state file
        (`rwkv_lm.load_state`) or a state of one row; None: zeros."""
        check_tokenizer(model, tokenizer)
        engine_for(model, tokenizer, engine)  # the engine, if any, runs this model
        self.model, self.tokenizer, self.engine = model, tokenizer, engine
        self.system = None if system is None else clean_message(system, "system")
        if state is not None and not hasattr(state, "clone"):
            state = load_state(state, model)
        self._start = None if state is None else model.check_state(state, 1)
        self._start_key = None if state is None else state_key(self._start)
        self._base = None
        self.last_reply = None  # the Stream of the latest reply: its counts (tokens, timings, state bytes)
        self._live = False  # a reply is streaming
        self.reset()

    def reset(self) -> None:
        """Forget the conversation; keep the system prompt (read only once per session and its forks)."""
        if self._base is None:
            self._base = (self._start, 0)
            if self.system is not None:
                tokens = self.tokenizer.encode(turn_text("system", self.system))
                engine = engine_for(self.model, self.tokenizer, self.engine)
                read = engine.submit(Request(tokens, SamplingParams(max_tokens=1), keep_state=True, read_only=True,
                                             **self._start_from(self._start)))
                read.text()  # (raises what failed)
                self._base = (read.state, len(tokens))
        self._state, self.num_tokens = self._base
        self._pending: list[int] = []  # generated tokens not yet fed to the model
        self._open_reply = False  # the last reply ended without its TURN_END

    def _start_from(self, state) -> dict:
        """The Request fields that start from `state`: the session's starting state goes with its cache key."""
        return {"state": state, "state_key": self._start_key if state is self._start else None}

    @property
    def state(self):
        """The model state after everything said so far (None before the first token)."""
        if self._live:  # mid-reply: the state of the reply's row, its last token still to feed
            self._state, last = self.last_reply.snapshot()
            self._pending = [last]
        self._feed_pending()
        return self._state

    def reply(self, message: str, params: SamplingParams | None = None, *, grammar=None, **overrides) -> Iterator[str]:
        """Stream the assistant's answer to `message` as text pieces.

        Breaking out of the loop stops at once; the session keeps what was generated until then.
        Token 0 is banned; the reply ends at a blank line or at a stop string of `params`. `grammar`
        (`rwkv_lm.serve.grammar.Grammar`): what the reply must be, e.g. `Grammar.json_schema(schema)`.
        """
        params = resolve(params, overrides)
        message = clean_message(message, "user")
        prompt = (TURN_END if self._open_reply else "") + turn_text("user", message) + REPLY_CUE
        return self._reply(self.tokenizer.encode(prompt), params, grammar)

    def _reply(self, tokens: list[int], params: SamplingParams, grammar=None) -> Iterator[str]:
        # the last reply's final token (counted already) goes in with the new ones, in one pass
        before = (self._state, self._pending, self.num_tokens, self._open_reply)
        engine = engine_for(self.model, self.tokenizer, self.engine)
        stream = engine.submit(Request.chat_reply(self._pending + tokens, params, keep_state=True, grammar=grammar,
                                                  **self._start_from(self._state)))
        self.last_reply, self._live, self._pending = stream, True, []
        self.num_tokens += len(tokens)
        self._open_reply = True
        read = self.num_tokens
        try:
            for piece in stream:
                self.num_tokens = read + stream.completion_tokens
                yield piece
        finally:
            stream.close()  # a no-op after the end; after a break, stops the reply and waits for its state
            self._live = False
            if not stream.tokens:  # stopped before its first token: the conversation is as it was
                self._state, self._pending, self.num_tokens, self._open_reply = before
            else:
                # the last token drawn is not fed yet: it waits in _pending until something needs it
                self._state, self._pending = stream.state, [stream.tokens[-1]]
                self.num_tokens = read + len(stream.tokens)
                self._open_reply = stream.stop_hit != TURN_END

    def _feed_pending(self) -> None:
        if self._pending:
            self._state = prefill(self.model, self._pending, self._state)[1]
            self._pending = []

    def fork(self) -> "ChatSession":
        """An independent copy of this session: both continue from here without affecting each other."""
        self._feed_pending()
        twin = object.__new__(ChatSession)
        twin.__dict__.update(self.__dict__)
        twin._state = None if self._state is None else self._state.clone()
        return twin

    def save(self, path) -> None:
        """Write the state and the session's bookkeeping to a safetensors file."""
        state = self.state
        if state is None:
            state = self.model.init_state(1)
        meta = {"format": FORMAT, "num_tokens": str(self.num_tokens), "open_reply": json.dumps(self._open_reply),
                "system": json.dumps(self.system)}
        tensors = {k: v.detach().contiguous().cpu() for k, v in state.tensors().items()}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))

    @classmethod
    def load(cls, path, model, tokenizer) -> "ChatSession":
        """A session saved by `save`, continued with `model` (which must be the same shape)."""
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path}: cannot be read as a saved chat session ({e})") from None
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: not a chat session file; write one with ChatSession.save")
        empty = model.init_state(1)
        template = empty.tensors()  # names and dtypes; a KV cache's length varies, so not shapes
        if set(tensors) != set(template):
            raise ValueError(f"{path}: the saved state does not fit this model (was it saved with another model?)")
        device = next(model.parameters()).device
        state = type(empty).from_tensors({k: v.to(device, template[k].dtype) for k, v in tensors.items()})
        try:
            state = model.check_state(state, 1)
        except ValueError as e:
            raise ValueError(f"{path}: the saved state does not fit this model: {e}") from None
        check_tokenizer(model, tokenizer)
        try:
            system, num_tokens, open_reply = json.loads(meta["system"]), int(meta["num_tokens"]), json.loads(meta["open_reply"])
        except (KeyError, ValueError) as e:
            raise ValueError(f"{path}: a damaged chat session file (bad or missing {e}); save the session again") from None
        session = object.__new__(cls)
        session.model, session.tokenizer, session.engine = model, tokenizer, None
        session.last_reply, session._live = None, False
        session.system, session._start, session._start_key, session._base, session._pending = system, None, None, None, []
        session._state = state
        session.num_tokens, session._open_reply = num_tokens, open_reply
        return session
