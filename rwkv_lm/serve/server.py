"""An OpenAI-compatible HTTP server over one Engine (FastAPI on uvicorn): `rwkv-lm serve --model PATH`.

    POST /v1/completions, POST /v1/chat/completions   (stream: true for server-sent events)
    GET  /v1/models, /v1/models/{id}, /health (also HEAD; 503 when the engine loop is dead or stuck),
         /metrics (Prometheus text)
    GET  /tokenizer_info, POST /tokenize, /detokenize   (vLLM's; lm-evaluation-harness tokenizes through them)

The request fields of issue 19 (response_format, tools, logprobs and echo, n, logit_bias, stop_token_ids,
token-id and several prompts, tuned states as "MODEL:STATE") are built in the engine and in small modules
beside this one: grammar.py, tools.py, logprobs.py, choices.py.

Errors are OpenAI's error JSON with the status that fits (`errors`): 400 (bad JSON or value; `param` names
the field), 401 (missing or wrong key, when an API key is set), 404 (no such model or endpoint), 408 (a body
too slow), 413 (a body or prompt over the limit), 503 (queue full, shutting down). The limits are `Limits`
(each a flag of `rwkv-lm serve`). A client that goes away mid-stream cancels its request: its row is free
within one engine iteration.
"""
from __future__ import annotations

import asyncio
import copy
import dataclasses
import hmac
import json
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request as HttpRequest
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import PlainTextResponse, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..chat_template import TURN_END, render_prompt
from ..sampling import SamplingError
from . import errors
from . import tools as tool_format
from .choices import LogprobWriter
from .cache import state_key
from .engine import Engine, EngineFull
from .errors import error_response
from .grammar import GrammarError
from .guards import BodyLimit, check_prompt_chars, check_request
from .limits import Limits, max_token_bytes
from .openai_api import ApiError, ChatRequest, CompletionRequest
from ..tokenizer import END_OF_TEXT_ID
from .request import Request

COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
CHAT_MAX_TOKENS = 1024
DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there


class EngineCollector:
    """The engine's numbers as Prometheus metrics, read at each scrape."""

    def __init__(self, engine: Engine):
        self.engine = engine

    COUNTERS = {"requests": "requests submitted", "prompt_tokens": "prompt tokens read by the model",
                "cached_prompt_tokens": "prompt tokens taken from the state cache",
                "generated_tokens": "tokens generated", "decode_steps": "batched decode steps",
                "decode_step_rows": "rows summed over decode steps (/ decode_steps: the mean batch size)"}
    GAUGES = {"waiting": "requests waiting for a row", "prefilling": "requests reading their prompt now",
              "decoding": "rows in the decoding batch now"}

    def collect(self):
        s = self.engine.stats()
        for name, doc in self.COUNTERS.items():
            yield CounterMetricFamily(f"rwkv_lm_{name}", doc, value=s[name])
        for name, doc in self.GAUGES.items():
            yield GaugeMetricFamily(f"rwkv_lm_{name}", doc, value=s[name])
        finished = CounterMetricFamily("rwkv_lm_finished_requests", "requests ended, by reason", labels=["reason"])
        for reason, n in s["finished"].items():
            finished.add_metric([reason], n)
        yield finished
        cache = s["cache"] or {"hits": 0, "misses": 0, "bytes": 0, "entries": 0, "max_bytes": 0}
        yield CounterMetricFamily("rwkv_lm_state_cache_hits", "prompts that began with a cached prefix", value=cache["hits"])
        yield CounterMetricFamily("rwkv_lm_state_cache_misses", "prompts that did not", value=cache["misses"])
        yield GaugeMetricFamily("rwkv_lm_state_cache_bytes", "bytes of states held", value=cache["bytes"])
        yield GaugeMetricFamily("rwkv_lm_state_cache_entries", "states held", value=cache["entries"])


def create_app(engine: Engine, *, model_name: str = "rwkv", api_key: str | None = None, limits: Limits = Limits(),
               allowed_origins: tuple[str, ...] = (), metrics_public: bool = False, states: dict | None = None) -> FastAPI:
    """The app; it starts the engine's loop thread when it starts and stops it when it ends.

    api_key: required on every path but /health (and /metrics with `metrics_public`); allowed_origins: the
    browser origins CORS lets call the API ("*": any; none by default); states: tuned states by name (batch-1
    model states): a request for model "{model_name}:{name}" starts from that state."""
    states = dict(states or {})
    keys = {name: state_key(state) for name, state in states.items()}  # the prefix cache's, by the state itself

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="rwkv_lm", lifespan=lifespan)
    tokenizer = engine.tokenizer
    token_bytes = max_token_bytes(tokenizer)
    tokenizer.encode("")  # (the World encoder is made on its first use: 0.2 s that would fall on the first request)
    registry = CollectorRegistry()
    registry.register(EngineCollector(engine))
    http_requests = Counter("rwkv_lm_http_requests", "HTTP requests answered", ["path", "status"], registry=registry)
    cards = {name: {"id": name, "object": "model", "created": STARTED, "owned_by": "rwkv_lm"}
             for name in [model_name, *(f"{model_name}:{state}" for state in states)]}

    # outermost first: CORS answers preflights, the key and the count come before a body is read
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes, timeout_s=limits.body_timeout_s)
    public = {"/health"} | ({"/metrics"} if metrics_public else set())
    app.add_middleware(_KeyAndCount, api_key=api_key, counter=http_requests, public=public)
    if allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    errors.install(app)

    @app.get("/health")
    @app.head("/health", include_in_schema=False)
    async def health():
        problem = engine.health(limits.stall_s)
        if problem is not None:
            return error_response(ApiError(503, problem, code="engine_unavailable"))
        return {"status": "ok", "model": model_name, **engine.stats()}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(generate_latest(registry), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": list(cards.values())}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        _check_model(model_id)
        return cards[model_id]

    # vLLM's tokenizer endpoints: lm-evaluation-harness's `tokenizer_backend=remote` tokenizes through them
    @app.get("/tokenizer_info")
    async def tokenizer_info():
        return {"eos_token": None, "bos_token": None, "pad_token": None, "model_max_length": limits.max_prompt_tokens,
                "vocab_size": tokenizer.vocab_size}

    @app.post("/tokenize")
    async def tokenize(body: dict):
        if not isinstance(body.get("prompt"), str):
            raise ApiError(400, "prompt: a string to tokenize", param="prompt")
        tokens = tokenizer.encode(body["prompt"])
        return {"tokens": tokens, "count": len(tokens), "max_model_len": limits.max_prompt_tokens}

    @app.post("/detokenize")
    async def detokenize(body: dict):
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) and 0 <= t < tokenizer.vocab_size for t in tokens):
            raise ApiError(400, f"tokens: a list of token ids in [0, {tokenizer.vocab_size})", param="tokens")
        return {"prompt": tokenizer.decode(tokens)}

    def _start(body) -> dict:
        """The Request fields for the state the request's model names (none: the model's zero state)."""
        name = (body.model or "").removeprefix(model_name + ":") if ":" in (body.model or "") else None
        if name is None:
            return {}
        if name not in states:
            raise ApiError(404, f"the model {body.model!r} does not exist: this server has no state {name!r} "
                                f"(its states: {', '.join(sorted(states)) or 'none'})", param="model", code="model_not_found")
        return {"state": states[name], "state_key": keys[name]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HttpRequest):
        _check_body(body)
        params = _params(body, COMPLETION_MAX_TOKENS)
        end_tokens = (() if body.ignore_eos else (END_OF_TEXT_ID,)) + tuple(body.stop_token_ids or ())
        echo_logprobs = body.logprobs if body.echo else None
        prompts = [await _encode(p, "prompt") for p in body.prompt]
        ranked = body.rows > body.n  # best_of: every row's logprobs are recorded to rank them by
        logprobs = body.logprobs if body.logprobs is not None or not ranked else 0
        requests = [Request(tokens, params, end_tokens=end_tokens, grammar=_grammar(body), logprobs=logprobs,
                            prompt_logprobs=echo_logprobs, read_only=body.max_tokens == 0, **_start(body))
                    for tokens in prompts]
        reply = _Reply("cmpl", "text_completion", body.model or model_name, body, _submit(requests, body.rows, "best_of" if ranked else "n"),
                       _CompletionShape(body, tokenizer), rows=body.rows)
        if body.stream:
            return _sse(reply.chunks())
        return await reply.whole(http)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, http: HttpRequest):
        _check_body(body)
        functions, forced = body.functions(), body.forced_functions()
        try:
            prompt = render_prompt(tool_format.render_messages([m.as_dict() for m in body.messages], functions))
        except ValueError as e:
            raise ApiError(400, f"messages: {e}", param="messages") from None
        grammar = _grammar(body) if not forced else tool_format.calls_grammar(forced, body.parallel_tool_calls, TURN_END)
        request = dataclasses.replace(Request.chat_reply(await _encode(prompt, "messages"), _params(body, CHAT_MAX_TOKENS)),
                                      grammar=grammar,
                                      logprobs=(body.top_logprobs or 0) if body.logprobs else None,
                                      end_tokens=(END_OF_TEXT_ID, *(body.stop_token_ids or ())), **_start(body))
        reply = _Reply("chatcmpl", "chat.completion", body.model or model_name, body, _submit([request], body.n),
                       _ChatShape(body, tokenizer, functions))
        if body.stream:
            return _sse(reply.chunks())
        return await reply.whole(http)

    def _grammar(body):
        try:
            return body.grammar()
        except GrammarError as e:
            raise ApiError(400, f"response_format: {e}", param="response_format") from None

    def _check_model(name: str | None) -> None:
        if name is not None and name not in cards and not name.startswith(model_name + ":"):
            raise ApiError(404, f"the model {name!r} does not exist: this server serves {model_name!r}",
                           param="model", code="model_not_found")

    def _check_body(body) -> None:
        _check_model(body.model)
        check_request(body, limits)
        refused = body.refused()
        if refused is not None:
            raise ApiError(400, f"{refused[0]}: {refused[1]}", param=refused[0])

    def _params(body, default_max_tokens):
        try:
            return body.sampling(min(default_max_tokens, limits.max_tokens))
        except SamplingError as e:
            raise ApiError(400, e.reason, param=e.param) from None

    async def _encode(text: str | list[int], param: str) -> list[int]:
        """A prompt's tokens (a string encoded, or token ids as given), within the limits."""
        if isinstance(text, str):
            check_prompt_chars(text, limits, token_bytes, param)
            tokens = await asyncio.to_thread(tokenizer.encode, text)  # running streams and /health go on meanwhile
        else:
            tokens = list(text)
        if not tokens:
            raise ApiError(400, "the prompt encodes to no tokens", param=param)
        if len(tokens) > limits.max_prompt_tokens:
            raise ApiError(413, f"the prompt has {len(tokens):,} tokens; this server takes at most "
                                f"{limits.max_prompt_tokens:,}", code="context_length_exceeded")
        return tokens

    def _submit(requests: list[Request], n: int, param: str = "n") -> list:
        """Streams for every request, n each (stream i * n + j: request i's j-th); `param`: the field that asked for n."""
        if len(requests) * n > engine.max_batch:
            raise ApiError(400, f"{len(requests)} prompts x {param}={n} exceeds the {engine.max_batch} rows this server "
                                "decodes together; ask for fewer", param=param)
        if not engine.running:
            raise ApiError(503, "the engine loop is not running (see /health)", code="engine_unavailable")
        streams = []
        try:
            for request in requests:
                streams += engine.submit_n(request, n)
        except EngineFull as e:
            _close(streams)
            raise ApiError(503, f"the server is busy: {e}; retry in a moment", code="overloaded") from None
        except GrammarError as e:
            _close(streams)
            raise ApiError(400, f"response_format: {e}", param="response_format") from None
        except ValueError as e:
            _close(streams)
            raise ApiError(400, str(e), param="logit_bias" if "logit_bias" in str(e) else "prompt") from None
        return streams

    return app


KNOWN_PATHS = {"/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions", "/tokenizer_info",
               "/tokenize", "/detokenize"}
STARTED = int(time.time())


class _KeyAndCount:
    """ASGI middleware: the API key on every path but the `public` ones, and a count of answers by path and
    status. (A plain ASGI layer, not BaseHTTPMiddleware, so that endpoints still see their client go away.)"""

    def __init__(self, app, api_key: str | None, counter, public: set[str]):
        self.app, self.counter, self.public = app, counter, public
        self.expected = None if api_key is None else api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"] if scope["path"] in KNOWN_PATHS else "other"
        if self.expected is not None and scope["path"] not in self.public:
            scheme, _, given = dict(scope["headers"]).get(b"authorization", b"").strip().partition(b" ")
            if not (scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.expected)):
                self.counter.labels(path, 401).inc()
                error = ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                                 code="invalid_api_key")
                return await error_response(error, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
        status = []

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            self.counter.labels(path, status[0] if status else 500).inc()


def _sse(chunks) -> StreamingResponse:
    return StreamingResponse(chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _close(streams) -> None:
    for stream in streams:
        stream.close(wait=False)


class _CompletionShape:
    """A completions choice: its text (after the prompt, with echo) and logprobs."""

    def __init__(self, body: CompletionRequest, tokenizer):
        self.body, self.tokenizer = body, tokenizer

    def start(self, stream) -> None:
        # the logprobs' text offsets count from the prompt's end (1,000 World tokens decode in ~7 ms: only if asked)
        offsets = self.body.logprobs is not None and not self.body.echo
        self.writer = LogprobWriter(self.tokenizer, len(self.tokenizer.decode(stream.request.prompt)) if offsets else 0)
        self.seen = 0

    def head(self, stream) -> dict | None:
        """What comes before the generated text: the prompt, with echo."""
        if not self.body.echo:
            return None
        entries = stream.prompt_logprobs
        return {"text": self.tokenizer.decode(stream.request.prompt),
                "logprobs": self._logprobs(entries, stream.request.prompt) if self.body.logprobs is not None else None}

    def piece(self, stream, text: str) -> dict:
        entries, self.seen = stream.logprobs[self.seen:], len(stream.logprobs)
        tokens = [e.token for e in entries]
        return {"text": text, "logprobs": self._logprobs(entries, tokens) if self.body.logprobs is not None else None}

    def _logprobs(self, entries, tokens) -> dict:
        return self.writer.completion(entries, tokens)

    def whole(self, stream, text: str) -> tuple[dict, str | None]:
        parts = [p for p in (self.head(stream), self.piece(stream, text)) if p is not None]
        out = {"text": "".join(p["text"] for p in parts), "logprobs": None}
        if self.body.logprobs is not None:
            out["logprobs"] = {k: sum((p["logprobs"][k] for p in parts), []) for k in parts[0]["logprobs"]}
        return out, None

    def deltas(self, stream, text: str) -> list[dict]:
        return [self.piece(stream, text)]

    def end(self, stream) -> tuple[list[dict], str | None]:
        return [self.piece(stream, "")], None


class _ChatShape:
    """A chat choice: the message (text, and the tool calls read from it), logprobs; deltas when streamed, with
    tool calls as OpenAI streams them (a call's id and name first, then its arguments in pieces)."""

    def __init__(self, body: ChatRequest, tokenizer, functions: list[dict]):
        self.body, self.tokenizer, self.functions = body, tokenizer, functions

    def start(self, stream) -> None:
        self.writer, self.seen = LogprobWriter(self.tokenizer), 0
        self.reader = tool_format.CallReader(self.functions)

    def head(self, stream) -> dict:
        return {"delta": {"role": "assistant", "content": ""}, "logprobs": None}

    def _logprobs(self, stream) -> dict | None:
        entries, self.seen = stream.logprobs[self.seen:], len(stream.logprobs)
        return {"content": self.writer.chat(entries)} if self.body.logprobs else None

    def deltas(self, stream, text: str) -> list[dict]:
        """The chunks a piece of text makes (none while it might still be the start of a tool call)."""
        return self._chunks(stream, self.reader.feed(text) if self.functions else [("content", text)])

    def end(self, stream) -> tuple[list[dict], str | None]:
        """The last chunks (text held back, the rest of a call) and the finish reason the text implies."""
        chunks = self._chunks(stream, self.reader.finish()) or [{"delta": {}, "logprobs": self._logprobs(stream)}]
        return chunks, ("tool_calls" if self.reader.complete else None)

    def _chunks(self, stream, events: list[tuple]) -> list[dict]:
        deltas: list[dict] = []  # (a run of content, or of one call's arguments, is one delta)
        for kind, *what in events:
            last = deltas[-1] if deltas else {}
            if kind == "content":
                if "content" in last:
                    last["content"] += what[0]
                else:
                    deltas.append({"content": what[0]})
            elif kind == "call":
                call = self.reader.calls[what[0]]
                deltas.append({"tool_calls": [{"index": what[0], "id": call.id, "type": "function",
                                               "function": {"name": call.name, "arguments": ""}}]})
            elif "tool_calls" in last and "id" not in last["tool_calls"][0] and last["tool_calls"][0]["index"] == what[0]:
                last["tool_calls"][0]["function"]["arguments"] += what[1]
            else:
                deltas.append({"tool_calls": [{"index": what[0], "function": {"arguments": what[1]}}]})
        return [{"delta": d, "logprobs": self._logprobs(stream) if i == 0 else None} for i, d in enumerate(deltas)]

    def whole(self, stream, text: str) -> tuple[dict, str | None]:
        reader = tool_format.read_calls(text, self.functions)
        message = {"role": "assistant", "content": (reader.content or None) if reader.calls else text}
        if reader.calls:
            message["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                                     for c in reader.calls]
        return {"message": message, "logprobs": self._logprobs(stream)}, ("tool_calls" if reader.complete else None)


class _Reply:
    """One request's answer in OpenAI's shapes: a whole body, or the chunks of a stream; choice i is stream i, or
    with `rows` > n (best_of), each prompt's `rows` streams give its n with the highest logprob per token."""

    def __init__(self, prefix: str, kind: str, model: str, body, streams: list, shape, rows: int | None = None):
        self.id, self.kind, self.body_in, self.streams = f"{prefix}-{uuid.uuid4().hex}", kind, body, streams
        self.rows = rows or body.n
        self.created, self.model = int(time.time()), model
        self.shapes = [copy.copy(shape) for _ in streams]
        for shape_i, stream in zip(self.shapes, streams):
            shape_i.start(stream)

    def usage(self) -> dict:
        firsts = self.streams[::self.rows]  # the rows of one prompt read it once; all rows' tokens count (as OpenAI's best_of)
        prompt = sum(s.prompt_tokens for s in firsts)
        completion = sum(s.completion_tokens for s in self.streams)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": sum(s.cached_tokens for s in firsts)}}

    def finish_reason(self, stream, implied: str | None = None) -> str:
        """OpenAI's "stop", "length" (or "tool_calls", `implied` by the text); "abort" when the server ended the
        request (it shut down)."""
        if stream.finish_reason == "error":
            raise ApiError(500, f"the model failed: {stream.error}")
        return implied or {"length": "length", "cancelled": "abort"}.get(stream.finish_reason, "stop")

    async def whole(self, http: HttpRequest) -> dict:
        """The whole answer; a client that goes away before it is done cancels the request."""
        reading = asyncio.ensure_future(asyncio.gather(*(self._read(s) for s in self.streams)))
        try:
            while not (await asyncio.wait({reading}, timeout=DISCONNECT_POLL_S))[0]:
                if await http.is_disconnected():
                    break
        finally:
            for stream in self.streams:
                await stream.aclose()
        texts = await reading
        choices = []
        for i, j in enumerate(self._best()):
            stream, shape, text = self.streams[j], self.shapes[j], texts[j]
            choice, implied = shape.whole(stream, text)
            choices.append({"index": i, **choice, "finish_reason": self.finish_reason(stream, implied)})
        return {"id": self.id, "object": self.kind, "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage()}

    def _best(self) -> list[int]:
        """The streams that are choices: of each prompt's rows, the n with the highest log probability per token
        (OpenAI's "best": the mean of the model's own logprobs of the tokens drawn, so a row that ended early is
        not favoured for being short), best first; all of them, in order, when rows is n."""
        n, picked = self.body_in.n, []
        for first in range(0, len(self.streams), self.rows):
            group = range(first, first + self.rows)
            if self.rows > n:
                group = sorted(group, key=lambda j: -_mean(e.logprob for e in self.streams[j].logprobs))
            picked += group[:n]
        return picked

    async def _read(self, stream) -> str:
        try:
            return "".join([piece async for piece in stream])
        except Exception as e:  # the model failed on this request: the server stays up
            raise ApiError(500, f"the model failed: {e}") from None

    async def chunks(self):
        kind = self.kind + ".chunk" if self.kind == "chat.completion" else self.kind

        def event(choices, **extra) -> str:
            data = {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices, **extra}
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        try:
            for i, (stream, shape) in enumerate(zip(self.streams, self.shapes)):
                head = shape.head(stream)
                if head is not None:
                    yield event([{"index": i, **head, "finish_reason": None}])
            try:
                async for i, piece in _merged(self.streams):
                    stream, shape = self.streams[i], self.shapes[i]
                    if piece is None:
                        last, implied = shape.end(stream)
                        reason = self.finish_reason(stream, implied)
                        for j, choice in enumerate(last, 1):
                            yield event([{"index": i, **choice, "finish_reason": reason if j == len(last) else None}])
                        continue
                    for choice in shape.deltas(stream, piece):
                        yield event([{"index": i, **choice, "finish_reason": None}])
            except Exception as e:  # the model failed on this request: say so in the stream, end it cleanly
                error = e if isinstance(e, ApiError) else ApiError(500, f"the model failed: {e}")
                yield f"data: {json.dumps(error.body())}\n\n"
            else:
                if self.body_in.include_usage:
                    yield event([], usage=self.usage())
            yield "data: [DONE]\n\n"
        finally:  # also when the client goes away: the requests are cancelled, their rows freed
            for stream in self.streams:
                await stream.aclose()


async def _merged(streams):
    """(stream index, piece) as pieces come from any of the streams; (index, None) once a stream ends."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i, stream):
        try:
            async for piece in stream:
                await queue.put((i, piece, None))
            await queue.put((i, None, None))
        except Exception as e:  # noqa: BLE001  (handed to the reader, which reports it)
            await queue.put((i, None, e))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        for _ in streams:
            while True:
                i, piece, error = await queue.get()
                if error is not None:
                    raise error
                yield i, piece
                if piece is None:
                    break
    finally:
        for task in tasks:
            task.cancel()


def _mean(values) -> float:
    values = list(values)
    return sum(values) / max(len(values), 1)
