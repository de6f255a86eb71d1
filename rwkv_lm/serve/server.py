"""An OpenAI-compatible HTTP server over one Engine (FastAPI on uvicorn): `rwkv-lm serve --model PATH`.

    POST /v1/completions, POST /v1/chat/completions   (stream: true for server-sent events)
    GET  /v1/models, /v1/models/{id}, /health (also HEAD; 503 when the engine loop is dead or stuck),
         /metrics (Prometheus text)

Errors are OpenAI's error JSON with the status that fits (`errors`): 400 (bad JSON or value; `param` names
the field), 401 (missing or wrong key, when an API key is set), 404 (no such model or endpoint), 408 (a body
too slow), 413 (a body or prompt over the limit), 503 (queue full, shutting down). The limits are `Limits`
(each a flag of `rwkv-lm serve`). A client that goes away mid-stream cancels its request: its row is free
within one engine iteration.
"""
from __future__ import annotations

import asyncio
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

from ..chat_template import render_prompt
from ..sampling import SamplingError
from . import errors
from .engine import Engine, EngineFull
from .errors import error_response
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
               allowed_origins: tuple[str, ...] = (), metrics_public: bool = False) -> FastAPI:
    """The app; it starts the engine's loop thread when it starts and stops it when it ends.

    api_key: required on every path but /health (and /metrics with `metrics_public`); allowed_origins: the
    browser origins CORS lets call the API ("*": any; none by default)."""

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="rwkv_lm", lifespan=lifespan)
    tokenizer = engine.tokenizer
    token_bytes = max_token_bytes(tokenizer)
    registry = CollectorRegistry()
    registry.register(EngineCollector(engine))
    http_requests = Counter("rwkv_lm_http_requests", "HTTP requests answered", ["path", "status"], registry=registry)
    model_card = {"id": model_name, "object": "model", "created": STARTED, "owned_by": "rwkv_lm"}

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
        return {"object": "list", "data": [model_card]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        _check_model(model_id)
        return model_card

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HttpRequest):
        _check_body(body)
        tokens = await _encode(body.prompt, "prompt")
        stream = _submit(Request(tokens, _params(body, COMPLETION_MAX_TOKENS), end_tokens=() if body.ignore_eos else (END_OF_TEXT_ID,)))
        reply = _Reply("cmpl", "text_completion", model_name, body, stream)
        if body.stream:
            return _sse(reply.chunks(lambda piece: {"text": piece}, first=None))
        text = await reply.collect(http)
        return reply.body({"text": text, "logprobs": None})

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, http: HttpRequest):
        _check_body(body)
        try:  # (an assistant turn with no content, one that only called tools, adds no text)
            prompt = render_prompt([m.as_dict() for m in body.messages if m.content is not None])
        except ValueError as e:
            raise ApiError(400, f"messages: {e}", param="messages") from None
        stream = _submit(Request.chat_reply(await _encode(prompt, "messages"), _params(body, CHAT_MAX_TOKENS)))
        reply = _Reply("chatcmpl", "chat.completion", model_name, body, stream)
        if body.stream:
            return _sse(reply.chunks(lambda piece: {"delta": {"content": piece}}, first={"delta": {"role": "assistant"}}))
        text = await reply.collect(http)
        return reply.body({"message": {"role": "assistant", "content": text}})

    def _check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise ApiError(404, f"the model {name!r} does not exist: this server serves {model_name!r}",
                           param="model", code="model_not_found")

    def _check_body(body) -> None:
        _check_model(body.model)
        check_request(body, limits)

    def _params(body, default_max_tokens):
        try:
            return body.sampling(min(default_max_tokens, limits.max_tokens))
        except SamplingError as e:
            raise ApiError(400, e.reason, param=e.param) from None

    async def _encode(text: str, param: str) -> list[int]:
        check_prompt_chars(text, limits, token_bytes, param)
        tokens = await asyncio.to_thread(tokenizer.encode, text)  # running streams and /health go on meanwhile
        if not tokens:
            raise ApiError(400, "the prompt encodes to no tokens", param=param)
        if len(tokens) > limits.max_prompt_tokens:
            raise ApiError(413, f"the prompt has {len(tokens):,} tokens; this server takes at most "
                                f"{limits.max_prompt_tokens:,}", code="context_length_exceeded")
        return tokens

    def _submit(request: Request):
        if not engine.running:
            raise ApiError(503, "the engine loop is not running (see /health)", code="engine_unavailable")
        try:
            return engine.submit(request)
        except EngineFull as e:
            raise ApiError(503, f"the server is busy: {e}; retry in a moment", code="overloaded") from None
        except ValueError as e:
            raise ApiError(400, str(e), param="prompt") from None

    return app


KNOWN_PATHS = {"/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions"}
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


class _Reply:
    """One request's answer in OpenAI's shapes: a whole body, or the chunks of a stream."""

    def __init__(self, prefix: str, kind: str, model: str, body, stream):
        self.id, self.kind, self.body_in, self.stream = f"{prefix}-{uuid.uuid4().hex}", kind, body, stream
        self.created, self.model = int(time.time()), model

    def usage(self) -> dict:
        s = self.stream
        return {"prompt_tokens": s.prompt_tokens, "completion_tokens": s.completion_tokens,
                "total_tokens": s.prompt_tokens + s.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": s.cached_tokens}}

    def finish_reason(self) -> str:
        """OpenAI's "stop" or "length"; "abort" when the server ended the request (it shut down)."""
        reason = self.stream.finish_reason
        if reason == "error":
            raise ApiError(500, f"the model failed: {self.stream.error}")
        return {"length": "length", "cancelled": "abort"}.get(reason, "stop")

    async def collect(self, http: HttpRequest) -> str:
        """The whole text; a client that goes away before it is done cancels the request."""
        reading = asyncio.ensure_future(self._read())
        try:
            while not (await asyncio.wait({reading}, timeout=DISCONNECT_POLL_S))[0]:
                if await http.is_disconnected():
                    break
        finally:
            await self.stream.aclose()
        return await reading

    async def _read(self) -> str:
        try:
            return "".join([piece async for piece in self.stream])
        except Exception as e:  # the model failed on this request: the server stays up
            raise ApiError(500, f"the model failed: {e}") from None

    def body(self, choice: dict) -> dict:
        return {"id": self.id, "object": self.kind, "created": self.created, "model": self.model,
                "choices": [{"index": 0, **choice, "finish_reason": self.finish_reason()}], "usage": self.usage()}

    async def chunks(self, piece_choice, first: dict | None):
        kind = self.kind + ".chunk" if self.kind == "chat.completion" else self.kind

        def event(choices, **extra) -> str:
            data = {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices, **extra}
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        try:
            if first is not None:
                yield event([{"index": 0, **first, "finish_reason": None}])
            try:
                async for piece in self.stream:
                    yield event([{"index": 0, **piece_choice(piece), "finish_reason": None}])
            except Exception as e:  # the model failed on this request: say so in the stream, end it cleanly
                yield f"data: {json.dumps(ApiError(500, f'the model failed: {e}').body())}\n\n"
            else:
                empty = piece_choice("")
                if "delta" in empty:
                    empty = {"delta": {}}
                yield event([{"index": 0, **empty, "finish_reason": self.finish_reason()}])
                if self.body_in.include_usage:
                    yield event([], usage=self.usage())
            yield "data: [DONE]\n\n"
        finally:  # also when the client goes away: the request is cancelled, its row freed
            await self.stream.aclose()
