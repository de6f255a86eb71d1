"""The serving engine: one model, many requests, one batched step per iteration.

Each iteration (`step`):
1. drops cancelled requests and admits waiting ones, up to `max_batch` rows; a request that starts from the
   zero state first looks up the longest prefix of its prompt in the state cache;
2. runs ONE batched decode step for every row that is generating (the `step` it was given:
   `rwkv_lm.runtime.decode_step(model, graphs=...)`, or model.step by default);
3. reads up to `prefill_tokens` prompt tokens of newly admitted requests (parallel mode, one request at a
   time), so a long prompt never holds up the rows already streaming for more than one chunk;
4. samples every row that has new logits, each by its own request's settings, and streams its text;
5. finished rows leave the batch at once, newly prefilled rows join it.

The engine runs in its own thread after `start()` (a server, the demo), or in the thread of whoever reads a
stream when it was not started (`rwkv_lm.generate`, a chat session): then it steps only while someone waits
for text, and stopping reading stops the work. Any model with the package's interface serves: RWKV-7 (a
fixed-size state per row) and the GPT baseline (its KV cache is its state), on a CPU or a GPU.
"""
from __future__ import annotations

import dataclasses
import enum
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..sampling import RowSampler, sample
from .cache import StateCache, prefix_hashes
from .grammar import MaskFiller, Matcher
from .logprobs import prompt_logprobs, token_logprobs
from .request import Request, Stream
from .text import TextStream

PREFILL_TOKENS = 512  # prompt tokens read per iteration: a long prompt costs the streaming rows one chunk's wait
CACHE_EVERY = 256  # prefix states are kept at multiples of this many tokens (and where prompts branch)


def prefill(model, tokens: Sequence[int], state=None, chunk_len: int = PREFILL_TOKENS):
    """Feed one row of tokens in parallel mode, `chunk_len` at a time (memory for one chunk, not for all)
    -> (logits [1, V] after the last token, state)."""
    if len(tokens) == 0:
        raise ValueError("nothing to feed: the prompt encodes to no tokens")
    ids = torch.as_tensor(tokens, dtype=torch.long, device=next(model.parameters()).device).view(1, -1)
    with torch.no_grad():
        for start in range(0, ids.shape[1], chunk_len):
            logits, state = model(ids[:, start:start + chunk_len], state, last_only=True)
    return logits[:, -1], state


def engine_for(model, tokenizer, engine: "Engine | None" = None, rows: int = 1) -> "Engine":
    """`engine` after checking that it runs `model`, or (None) a private one for `rows` rows, run by its reader."""
    if engine is None:
        return Engine(model, tokenizer, max_batch=rows)
    if engine.model is not model:
        raise ValueError("the engine runs another model than the one given")
    return engine


class EngineFull(RuntimeError):
    """The engine's queue of waiting requests is full; try again later."""


def check_tokenizer(model, tokenizer) -> None:
    """A ValueError unless every id of `tokenizer` is a valid input of `model`."""
    if tokenizer is None:
        raise ValueError("no tokenizer: pass one (e.g. rwkv_lm.tokenizer.load_tokenizer('world')), "
                         "or load a checkpoint that carries one")
    vocab = model.config.vocab_size
    if tokenizer.vocab_size > vocab:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {vocab}; "
                         "use the tokenizer the model was trained with (for official RWKV World models: 'world')")


class Phase(enum.Enum):
    """Where a request is in the engine; it only moves forward."""

    WAITING = "waiting"  # queued for a row
    PREFILLING = "prefilling"  # its prompt is being read (after a prefix cache lookup)
    DECODING = "decoding"  # in the batch, one token per step
    DONE = "done"  # finished or cancelled; its stream is ended (or ends this iteration)


@dataclass(eq=False)
class _Row:
    """A request inside the engine: its phase, how far its prompt is read, its state while it is read, its sampler."""

    stream: Stream
    sampler: RowSampler | None
    text: TextStream
    fed: int = 0  # prompt tokens read
    state: object = None  # while prefilling; afterwards the state lives in the batch
    logits: torch.Tensor | None = None  # [1, V] after the prompt, until its first token is drawn
    hashes: list[int] | None = None  # prefix hashes of the prompt, for requests that use the cache
    branch: int | None = None  # where this prompt leaves one read before: its state is worth keeping
    phase: Phase = Phase.WAITING
    reason: str | None = None  # why it is done
    started: bool = False  # some text has been streamed
    step_s: float = 0.0  # time of the work that makes its next token
    matcher: Matcher | None = None  # where its text stands in its grammar
    followers: list["_Row"] = field(default_factory=list)  # forks that start from this row's prompt (`submit_n`)
    last_logits: torch.Tensor | None = None  # [1, V] after the prompt read so far, for prompt logprobs

    @property
    def request(self) -> Request:
        return self.stream.request

    @property
    def done(self) -> bool:
        return self.phase is Phase.DONE


@dataclass
class Counters:
    """Totals since the engine started; `stats()` and the server's /metrics use these names."""

    requests: int = 0  # submitted
    finished: dict = field(default_factory=dict)  # finish reason -> requests ended so
    prompt_tokens: int = 0  # read by the model (cache hits not included)
    cached_prompt_tokens: int = 0  # taken from the prefix state cache instead
    generated_tokens: int = 0
    decode_steps: int = 0  # batched decode steps
    decode_step_rows: int = 0  # their batch sizes summed (/ decode_steps: the mean batch size)


class Engine:
    """Continuous batching over one model. `submit(Request) -> Stream`; `start()` for a loop thread.

    max_batch: rows decoded together; max_queue: requests that may wait beyond those (None: no limit; 0: none
    wait, a request is taken only while a row is free), after which `submit` raises EngineFull; cache: a
    StateCache, or its budget in bytes (0: none); device_lock: a lock held during each iteration, for engines
    that must take turns on one device; step: the batched decode step, `step(tokens [B], state) -> (logits [B, V],
    state)` (default: model.step; on a GPU, `rwkv_lm.runtime.decode_step(model, graphs=True)` replays it as CUDA
    graphs).
    """

    def __init__(self, model, tokenizer, *, max_batch: int = 32, max_queue: int | None = None,
                 cache: StateCache | int = 0, prefill_tokens: int = PREFILL_TOKENS,
                 device_lock: threading.Lock | None = None, step=None):
        check_tokenizer(model, tokenizer)
        if max_batch < 1 or prefill_tokens < 1 or (max_queue is not None and max_queue < 0):
            raise ValueError(f"max_batch and prefill_tokens must be >= 1 and max_queue >= 0, got {max_batch}, "
                             f"{prefill_tokens}, {max_queue}")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue, self.prefill_tokens = max_batch, max_queue, prefill_tokens
        self.cache = cache if isinstance(cache, StateCache) else (StateCache(cache) if cache else None)
        self.device = next(model.parameters()).device
        self._decode_step = step  # None: model.step, looked up at each step (a model patched or swapped later is seen)
        self.counters = Counters()
        self._masks = MaskFiller(model.config.vocab_size)
        # ids the model has but the tokenizer cannot spell (World: 65,530 of 65,536) are never drawn
        self._unspellable = tuple(range(tokenizer.vocab_size, model.config.vocab_size))
        self._waiting: deque[_Row] = deque()
        self._prefilling: list[_Row] = []
        self._decoding: list[_Row] = []  # in batch order
        self._batch_state = None  # the state of the decoding rows, one batch
        self._cancelled: set[Stream] = set()
        self._queue_lock = threading.Lock()  # submissions and cancellations (any thread)
        self._step_lock = threading.RLock()  # the rows and the batch (the stepping thread)
        self._device_lock = device_lock
        self._wakeup = threading.Condition(self._queue_lock)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._beat = time.monotonic()  # when the loop thread last began an iteration or went idle

    # -- submitting -----------------------------------------------------------------------------------------
    def submit(self, request: Request) -> Stream:
        """Queue a request; its text comes through the returned Stream."""
        return self.submit_n(request, 1)[0]

    def submit_n(self, request: Request, n: int) -> list[Stream]:
        """n continuations of one prompt: it is read once, then its state is forked n ways. Continuation i
        samples with seed `params.seed + i` (when a seed is set). Closing the first stream before its prompt is
        read cancels them all."""
        vocab = self.model.config.vocab_size
        if not request.prompt:
            raise ValueError("nothing to feed: the prompt encodes to no tokens")
        if any(not 0 <= t < vocab for t in request.prompt):
            raise ValueError(f"prompt token ids must lie in [0, {vocab}); was it encoded with another tokenizer?")
        if any(t >= vocab for t, _ in request.params.logit_bias):
            raise ValueError(f"logit_bias token ids must lie in [0, {vocab})")
        if not 1 <= n <= self.max_batch:
            raise ValueError(f"n must lie in [1, {self.max_batch}] (the rows this engine decodes together), got {n}")
        seed = request.params.seed
        rows = [self._new_row(request if i == 0 or seed is None else
                              dataclasses.replace(request, params=request.params.replace(seed=seed + i)))
                for i in range(n)]
        row, row.followers = rows[0], rows[1:]
        with self._queue_lock:
            held = len(self._waiting) + len(self._prefilling) + len(self._decoding)
            if self.max_queue is not None and held >= self.max_batch + self.max_queue:
                raise EngineFull(f"every row is taken and {len(self._waiting)} requests are already waiting "
                                 f"(the most this engine queues: {self.max_queue})")
            self._waiting.append(row)
            self.counters.requests += n
            self._wakeup.notify()
        return [r.stream for r in rows]

    def _new_row(self, request: Request) -> _Row:
        matcher = None if request.grammar is None else Matcher(request.grammar, self.tokenizer,
                                                                self.model.config.vocab_size, lead=request.lstrip)
        sampler = RowSampler(request.params, banned=(*request.banned, *self._unspellable), device=self.device)
        return _Row(Stream(request, self), sampler, TextStream(self.tokenizer, (*request.params.stop, *request.stop)),
                    matcher=matcher)

    def cancelled(self, stream: Stream) -> None:
        """Called by a closed stream: its row is dropped at the start of the next iteration."""
        with self._queue_lock:
            self._cancelled.add(stream)
            self._wakeup.notify()

    # -- running --------------------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> "Engine":
        """Run the scheduler loop in a daemon thread until `stop()`."""
        if not self.running:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="rwkv_lm-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """End the loop thread; requests still running are cancelled."""
        self._end_all("cancelled")  # first: a reader must never see the loop gone while its stream is open
        with self._queue_lock:
            self._stopping = True
            self._wakeup.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._end_all("cancelled")  # any submitted meanwhile

    def _end_all(self, reason: str, error: BaseException | None = None) -> None:
        with self._step_lock:
            for row in [*self._waiting, *self._prefilling, *self._decoding]:
                for each in (row, *row.followers):
                    each.stream.end(reason, error)
            self._waiting.clear()
            self._prefilling, self._decoding, self._batch_state = [], [], None

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _loop(self) -> None:
        try:
            while True:
                with self._queue_lock:
                    while not self._stopping and not self._has_work():
                        self._beat = time.monotonic()
                        self._wakeup.wait()
                    if self._stopping:
                        return
                self._beat = time.monotonic()
                self.step()
        except BaseException as e:  # the loop is dead: no request may wait for it
            self._end_all("error", e)
            raise

    def health(self, stall_s: float) -> str | None:
        """None while the loop thread runs and no iteration has taken `stall_s` seconds; else what is wrong."""
        if not self.running:
            return "the engine loop is not running"
        busy_s = time.monotonic() - self._beat
        with self._queue_lock:
            working = self._has_work()
        if working and busy_s > stall_s:
            return f"the engine loop has been in one iteration for {busy_s:.0f} s (more than {stall_s:g} s)"
        return None

    def _has_work(self) -> bool:
        return bool(self._waiting or self._prefilling or self._decoding or self._cancelled)

    def drive(self) -> None:
        """One iteration from the caller's thread (a stream read with no loop thread running)."""
        if not self.step() and not self.running:
            raise RuntimeError("the engine has nothing to run, yet a stream waits for it")

    def step(self) -> bool:
        """One iteration of the scheduler; False if there was nothing to do."""
        with self._step_lock:
            if self._device_lock is None:
                return self._step()
            with self._device_lock:
                return self._step()

    def _step(self) -> bool:
        self._drop_cancelled()
        self._admit()
        if not (self._decoding or self._prefilling):
            return False
        try:
            with torch.no_grad():
                self._iterate()
        except Exception as e:  # a failing decode step ends every request in flight; the engine stays up
            for row in [*self._decoding, *self._prefilling]:
                self._end(row, "error", e)
                for follower in row.followers:
                    self._end(follower, "error", e)
            self._prefilling, self._decoding, self._batch_state = [], [], None
        return True

    def _drop_cancelled(self) -> None:
        with self._queue_lock:
            cancelled, self._cancelled = self._cancelled, set()
            if cancelled:
                self._waiting = deque(r for r in self._waiting if r.stream not in cancelled)
        if not cancelled:
            return
        for row in [r for r in self._prefilling if r.stream in cancelled]:
            self._prefilling.remove(row)
            self._end(row, "cancelled")
            for follower in row.followers:
                self._end(follower, "cancelled")
        for row in self._prefilling:
            row.followers = [f for f in row.followers if f.stream not in cancelled]
        self._leave([i for i, r in enumerate(self._decoding) if r.stream in cancelled], "cancelled")
        for stream in cancelled:
            stream.end("cancelled")  # a request cancelled while it waited

    def _admit(self) -> None:
        with self._queue_lock:
            while self._waiting and self._rows() + 1 + len(self._waiting[0].followers) <= self.max_batch:
                row = self._waiting.popleft()
                self._prefilling.append(row)
        for row in self._prefilling:
            if row.phase is Phase.WAITING:
                self._start_prefill(row)

    def _rows(self) -> int:
        return len(self._decoding) + sum(1 + len(r.followers) for r in self._prefilling)

    def _start_prefill(self, row: _Row) -> None:
        request = row.request
        row.phase = Phase.PREFILLING
        row.state = request.state
        if (request.state is not None and request.state_key is None) or self.cache is None or request.prompt_logprobs is not None:
            if row.state is None:
                row.state = self.model.init_state(1)
            return
        row.hashes = prefix_hashes(request.prompt, request.state_key or "")
        hit = self.cache.lookup(request.prompt, row.hashes, request.state_key or "")
        if hit is not None:
            row.fed, row.state = len(hit.tokens), hit.state
            row.stream.cached_tokens = row.fed
            self.counters.cached_prompt_tokens += row.fed
            if row.fed == len(request.prompt):
                row.logits = hit.logits
        elif row.state is None:
            row.state = self.model.init_state(1)
        row.branch = self.cache.branch_point(row.hashes, row.fed)

    def _iterate(self) -> None:
        ready: list[_Row] = []
        logits = []
        masks = self._masks.start([r.matcher for r in self._decoding])  # computed while the model steps
        if self._decoding:
            tokens = torch.tensor([r.stream.tokens[-1] for r in self._decoding], device=self.device)
            start = time.perf_counter()
            step_logits, self._batch_state = (self._decode_step or self.model.step)(tokens, self._batch_state)
            elapsed = time.perf_counter() - start
            self.counters.decode_steps += 1
            self.counters.decode_step_rows += len(self._decoding)
            row_bytes = _row_nbytes(self._batch_state, len(self._decoding))
            for row, nbytes in zip(self._decoding, row_bytes):
                row.stream.state_bytes = nbytes
                row.step_s = elapsed
            ready, logits = list(self._decoding), [step_logits]

        budget, joined, read = self.prefill_tokens, [], []  # read: rows whose prompts end in this iteration
        for row in list(self._prefilling):
            reading = row.logits is None
            try:
                while row.logits is None and budget > 0:
                    budget -= self._prefill_some(row, budget)
            except Exception as e:  # this prompt cannot be read; the others go on
                self._prefilling.remove(row)
                self._end(row, "error", e)
                continue
            if row.logits is not None:
                self._prefilling.remove(row)
                if row.request.read_only:
                    self._keep_prompt_state(row, row.state, row.logits)
                    self._end(row, "length", state=row.state)
                    continue
                if reading:
                    read.append(row)
                joined += self._fork(row)
        ready += joined
        logits += [row.logits for row in joined]
        if not ready:
            masks.result()
            return
        # (one tensor as it is: in the engine's thread a copy is a parallel op that first wakes OpenMP's workers,
        # ~50 us against ~5 in the main thread)
        raw = logits[0] if len(logits) == 1 else torch.cat(logits)
        allowed = self._masks.finish(masks.result(), [row.matcher for row in ready])
        tokens = sample(raw, [row.sampler for row in ready], allowed).tolist()
        chances = token_logprobs(raw, tokens, [row.request.logprobs for row in ready], self.tokenizer.vocab_size)

        for row, token, chance in zip(ready, tokens, chances):
            self._take(row, token, chance)
        kept = [(row, row.state, row.logits) for row in read]  # (joining the batch clears them)
        self._leave([i for i, r in enumerate(self._decoding) if r.done], None)
        joining = [r for r in joined if not r.done]
        if joining:
            states = ([] if self._batch_state is None else [self._batch_state]) + [r.state for r in joining]
            self._batch_state = states[0] if len(states) == 1 else type(states[0]).cat(states)
            self._decoding += joining
            for row in joining:
                row.state, row.logits, row.phase = None, None, Phase.DECODING
        for row, state, logits in kept:  # once their first tokens are out: the copy adds nothing to that wait
            self._keep_prompt_state(row, state, logits)

    def _fork(self, row: _Row) -> list[_Row]:
        """A row whose prompt is read, and its followers, each with its own copy of the state."""
        for follower in row.followers:
            follower.state, follower.logits, follower.fed = row.state.clone(), row.logits, row.fed
            follower.stream.cached_tokens, follower.stream.prompt_logprobs = row.stream.cached_tokens, list(row.stream.prompt_logprobs)
        followers, row.followers = row.followers, []
        return [row, *followers]

    def _prefill_some(self, row: _Row, budget: int) -> int:
        """Read up to `budget` tokens of a row's prompt (stopping where a state is worth caching); the count read."""
        prompt, start = row.request.prompt, row.fed
        end = min(len(prompt), start + budget)
        if row.hashes is not None:  # stop at the next cache point
            end = min(end, (start // CACHE_EVERY + 1) * CACHE_EVERY)
            if row.branch is not None and row.branch > start:
                end = min(end, row.branch)
        began = time.perf_counter()
        top = row.request.prompt_logprobs
        if top is None:
            logits, row.state = prefill(self.model, prompt[start:end], row.state)
        else:  # every position's logits: each predicts the next token (the first token has no prediction)
            ids = torch.tensor([list(prompt[start:end])], device=self.device)
            every, row.state = self.model(ids, row.state)
            before = every[0, :-1] if row.last_logits is None else torch.cat([row.last_logits, every[0, :-1]])
            scored = prompt_logprobs(before, prompt[start + (start == 0):end], top, self.tokenizer.vocab_size)
            row.stream.prompt_logprobs += [None] * (start == 0) + scored
            logits = row.last_logits = every[0, -1:]
        row.fed = end
        self.counters.prompt_tokens += end - start
        row.step_s += time.perf_counter() - began  # the first token costs the whole prompt
        if end == len(prompt):
            row.logits = logits
        elif row.hashes is not None:  # (the whole prompt's state: _keep_prompt_state)
            self.cache.insert(prompt[:end], row.state, None, row.hashes, row.request.state_key or "")
        return end - start

    def _keep_prompt_state(self, row: _Row, state, logits) -> None:
        """Cache the state and logits after a row's whole prompt (for a request that uses the cache)."""
        if row.hashes is not None:
            self.cache.insert(row.request.prompt, state, logits, row.hashes, row.request.state_key or "")

    def _take(self, row: _Row, token: int, chance=None) -> None:
        """A token drawn for a row (with its logprobs, if recorded): stream its text, decide whether the row is done."""
        stream, request = row.stream, row.request
        if chance is not None:
            stream.logprobs.append(chance)
        stream.token_s.append(row.step_s)  # one append: a reader never sees a token without its time
        row.step_s = 0.0
        stream.tokens.append(token)
        stream.completion_tokens += 1
        self.counters.generated_tokens += 1
        if stream.first_token_s is None:
            stream.first_token_s = time.perf_counter() - stream.submitted
        row.sampler.observe(token, self.model.config.vocab_size)
        if token in request.end_tokens:
            self._finish_text(row, "stop")
            return
        if row.matcher is not None:
            row.matcher.consume(token)
        self._put(row, row.text.push(token))
        if row.text.stopped or (row.matcher is not None and row.matcher.complete):
            stream.stop_hit = row.text.stop_hit
            self._finish_text(row, "stop")
        elif stream.completion_tokens >= request.params.max_tokens:
            self._finish_text(row, "length")

    def _put(self, row: _Row, piece: str) -> None:
        if not row.started:
            piece = piece.lstrip(row.request.lstrip)
            row.started = bool(piece)
        if piece:
            row.stream.deliver(piece)

    def _finish_text(self, row: _Row, reason: str) -> None:
        self._put(row, row.text.finish())
        row.phase = Phase.DONE
        row.reason = reason
        if row.state is not None:  # finished at its first token: the state is the prompt's
            self._end(row, reason, state=row.state)

    def _leave(self, positions: list[int], reason: str | None) -> None:
        """Rows at these batch positions leave the batch, with their final states."""
        if not positions:
            return
        gone = set(positions)
        keep = [i for i in range(len(self._decoding)) if i not in gone]
        single = len(self._decoding) == 1
        for i in positions:
            row = self._decoding[i]
            wants_state = row.request.keep_state or row.hashes is not None
            state = (self._batch_state if single else self._batch_state.select([i])) if wants_state else None
            self._end(row, reason or row.reason, state=state)
        self._decoding = [self._decoding[i] for i in keep]
        self._batch_state = None if not keep else self._batch_state.select(keep)

    def _end(self, row: _Row, reason: str, error: BaseException | None = None, state=None) -> None:
        stream = row.stream
        row.phase = Phase.DONE
        if state is not None and row.hashes is not None and stream.tokens and reason != "error":
            # the state after the prompt and every drawn token but the last (which is never fed); after the prompt
            # alone (done at its first token), its logits too
            logits = row.logits if len(stream.tokens) == 1 else None
            self.cache.insert([*row.request.prompt, *stream.tokens[:-1]], state, logits, origin=row.request.state_key or "")
        if row.request.keep_state:
            stream.state = state
        self.counters.finished[reason] = self.counters.finished.get(reason, 0) + 1
        stream.end(reason, error)

    def snapshot(self, stream: Stream):
        """(state, last token drawn) of a running request; its final ones once it has ended."""
        with self._step_lock:
            for i, row in enumerate(self._decoding):
                if row.stream is stream:
                    single = len(self._decoding) == 1
                    return (self._batch_state if single else self._batch_state.select([i])), stream.tokens[-1]
        if not stream.done:
            raise RuntimeError("the request has drawn no token yet")
        return stream.state, stream.tokens[-1]

    # -- reading --------------------------------------------------------------------------------------------
    def stats(self) -> dict:
        """Rows now (waiting for a row, prefilling, decoding; active = the last two), the `Counters`, and the
        cache's numbers."""
        with self._queue_lock:
            waiting = len(self._waiting)
        return {"waiting": waiting, "prefilling": len(self._prefilling), "decoding": len(self._decoding),
                "active": len(self._prefilling) + len(self._decoding), **dataclasses.asdict(self.counters),
                "cache": None if self.cache is None else self.cache.stats()}


def _row_nbytes(state, batch_size: int) -> list[int]:
    """Bytes of each row's share of a batch state (a KV cache's rows hold their own lengths)."""
    if hasattr(state, "row_nbytes"):
        return state.row_nbytes()
    return [state.nbytes // batch_size] * batch_size
