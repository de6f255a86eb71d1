"""Several replicas of `rwkv-lm serve` behind one OpenAI endpoint, on Ray Serve (`pip install 'rwkv-lm[cluster]'`).

    rwkv-lm serve --model M.safetensors --replicas 2 [--replica-cpus 1] [--replica-gpus 0] [--ray-address ADDR]
    serve run rwkv_lm.serve.cluster:build_app model=/abs/M.safetensors replicas=2     (Ray's own CLI)
    serve deploy deploy/serve_config.yaml                                             (an existing cluster)

Two deployments:
- `EngineReplica` (N replicas, each with `replica_cpus` CPUs / `replica_gpus` GPUs): one Engine with its own
  prefix state cache, and the very app of `rwkv-lm serve` (`server.create_app`), called in-process for each
  request it is handed; its routes, errors, API key check and counters are the plain server's.
- `Gateway` (the HTTP ingress, no CPU reserved): reads each request's affinity key
  (`rwkv_lm.serve.routing`) and hands the raw request to an EngineReplica through a deployment handle whose
  request router is `AffinityRouter`; the answer streams back as it comes. A replica that dies mid-stream
  ends that stream with an OpenAI error event (a request not yet answered gets a 502); Ray starts a new one.
  GET /health and /metrics ask every replica: /health lists each replica's health (200 while one answers,
  "degraded" while some do not), /metrics is every replica's metrics, each sample labelled replica="RANK".
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import ray
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, Field
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from .errors import error_response
from .openai_api import ApiError
from .routing import Route, affinity_key, choose

APP_NAME = "rwkv_lm"


class ClusterOptions(BaseModel):
    """What `build_app` takes: the plain server's options plus the replicas' (the `args:` of a Serve config)."""

    model: str = Field(description="checkpoint path, readable at this path on every node that runs a replica")
    tokenizer: str | None = None
    dtype: str = "fp32"
    device: str | None = Field(None, description="default: cuda with replica_gpus > 0, else cpu")
    isa: str | None = None
    cuda_graphs: bool | None = None
    replicas: int = Field(2, ge=1)
    replica_cpus: float = Field(1, gt=0, description="CPUs per replica; also its torch threads")
    replica_gpus: float = Field(0, ge=0)
    max_batch: int = Field(32, ge=1)
    max_queue: int = Field(256, ge=0)
    state_cache_mb: float = Field(512, ge=0)
    limits: dict = Field(default_factory=dict, description="rwkv_lm.serve.limits.Limits fields; those of a "
                         "connection (body size and timeouts, connections, shutdown) are Ray's proxy's here")
    model_name: str | None = None
    api_key: str | None = None
    allowed_origins: list[str] = []
    metrics_public: bool = False
    queue_threshold: int | None = Field(None, ge=1, description="requests in flight at a conversation's replica "
                                        "past which it goes to the least loaded one (default: max_batch)")


class AffinityRouter(RequestRouter):
    """Ray Serve's request router for EngineReplica: `routing.choose` over the replicas' ranks and Ray's
    cached counts of their requests in flight."""

    def initialize_state(self, queue_threshold: int = 32):
        self.queue_threshold = queue_threshold

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        by_rank = {r.replica_metadata.get("rank"): r for r in candidate_replicas}
        if None in by_rank:  # a replica that has not said its rank: no affinity until it has
            return [candidate_replicas]
        route = next((a for a in pending_request.args if isinstance(a, Route)), None) if pending_request else None
        loads = {rank: self.replica_queue_len_cache.get(r.replica_id) for rank, r in by_rank.items()}
        return [[by_rank[rank] for rank in tier] for tier in choose(route, loads, self.queue_threshold)]


class EngineReplica:
    """One Engine and the plain server's app; `forward` answers one HTTP request with it."""

    def __init__(self, options: ClusterOptions):
        import torch

        from ..runtime import decode_step, load
        from ..tokenizer import load_tokenizer
        from .engine import Engine
        from .limits import Limits
        from .server import create_app

        torch.set_num_threads(max(1, int(options.replica_cpus)))
        device = options.device or ("cuda" if options.replica_gpus > 0 else "cpu")
        # what `rwkv-lm serve` builds from the same options
        model = load(options.model, device=device, weights=options.dtype, isa=options.isa)
        tokenizer = load_tokenizer(options.tokenizer) if options.tokenizer else model.tokenizer
        self.engine = Engine(model, tokenizer, max_batch=options.max_batch, max_queue=options.max_queue,
                             cache=int(options.state_cache_mb * 2**20),
                             step=decode_step(model, graphs=options.cuda_graphs))
        self.app = create_app(self.engine, model_name=options.model_name or Path(options.model).stem,
                              api_key=options.api_key, limits=Limits(**options.limits),
                              allowed_origins=tuple(options.allowed_origins), metrics_public=options.metrics_public)
        self.engine.start()  # what the app's lifespan does under uvicorn
        context = serve.get_replica_context()
        self.identity = {"rank": context.rank.rank, "replica_id": context.replica_id.unique_id, "pid": os.getpid(),
                         "node_id": ray.get_runtime_context().get_node_id()}

    def record_replica_metadata(self) -> dict:
        """Published to the routers once the replica is up: the rank that keys are hashed on."""
        return {"rank": self.identity["rank"]}

    async def forward(self, route: Route, method: str, path: str, query: bytes, headers: list, body: bytes):
        """The app's answer to one request: first {"status", "headers", "replica"}, then the body's chunks.
        Closing this generator (the client went away) is a disconnect: the app cancels the request."""
        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                 "method": method, "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
                 "query_string": query, "headers": headers, "client": None, "server": None}
        sent, gone = asyncio.Queue(), asyncio.Event()
        body_read = False

        async def receive():
            nonlocal body_read
            if not body_read:
                body_read = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        task = asyncio.ensure_future(self.app(scope, receive, sent.put))
        task.add_done_callback(lambda _: sent.put_nowait(None))
        try:
            while (message := await sent.get()) is not None:
                if message["type"] == "http.response.start":
                    yield {"status": message["status"], "replica": self.identity,
                           "headers": [(k.decode(), v.decode()) for k, v in message.get("headers", [])]}
                elif message["type"] == "http.response.body":
                    if message.get("body"):
                        yield message["body"]
                    if not message.get("more_body"):
                        break
            if task.done():
                task.result()  # an exception of the app's own
        finally:
            gone.set()
            if not task.done():
                await asyncio.wait({task}, timeout=5)

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.stop()


class Gateway:
    """The HTTP ingress: each request to the EngineReplica its affinity key picks; /health and /metrics to all."""

    def __init__(self, engines, replicas: int):
        self.engines, self.replicas = engines.options(stream=True), replicas

    async def __call__(self, request: HttpRequest):
        body = await request.body()
        path = request.url.path
        if request.method == "GET" and path in ("/health", "/metrics"):
            answers = await self._each_replica(path, request.headers.raw)
            refused = next((a for a in answers if a[1] in (401, 403)), None)
            if refused is not None:  # the replicas' own answer: a missing or wrong API key
                return Response(refused[2], status_code=refused[1], media_type="application/json")
            return self._health(answers) if path == "/health" else self._metrics(answers)
        route = Route(key=affinity_key(path, body, request.headers))
        call = self.engines.forward.remote(route, request.method, path, request.url.query.encode(),
                                           request.headers.raw, body)
        try:
            start = await call.__anext__()
        except Exception as e:  # the replica died before it answered
            return error_response(ApiError(502, f"the replica serving this request was lost ({type(e).__name__}); retry it",
                                   code="replica_lost"))
        headers = {k: v for k, v in start["headers"] if k.lower() != "content-length"}
        headers["x-rwkv-lm-replica"] = str(start["replica"]["rank"])
        events = headers.get("content-type", "").startswith("text/event-stream")
        return StreamingResponse(_rest(call, events), status_code=start["status"], headers=headers)

    async def _each_replica(self, path: str, headers: list) -> list[tuple[dict, int, bytes]]:
        """(replica, status, body) of GET `path` from each replica that answers, asked by rank."""
        async def ask(rank):
            call = self.engines.forward.remote(Route(rank=rank), "GET", path, b"", headers, b"")
            start = await call.__anext__()
            return start["replica"], start["status"], b"".join([chunk async for chunk in call])

        # one after another: calls made while handling one request share its id, and Ray's router loses all
        # but one of those that wait for a replica at the same time (Ray 2.60)
        found = {}
        for rank in range(self.replicas):
            try:
                answer = await ask(rank)
            except Exception:  # the replica died meanwhile: it is left out
                continue
            found.setdefault(answer[0]["rank"], answer)  # a rank restarting was answered by another
        return [found[rank] for rank in sorted(found)]

    def _health(self, answers):
        replicas = [{"replica": replica, **json.loads(body)} for replica, status, body in answers if status == 200]
        status = "ok" if len(replicas) == self.replicas else "degraded" if replicas else "down"
        return JSONResponse({"status": status, "replicas_expected": self.replicas, "replicas": replicas},
                            status_code=200 if replicas else 503)

    def _metrics(self, answers):
        families: dict[str, Metric] = {}
        for replica, status, body in answers:
            for family in text_string_to_metric_families(body.decode()):
                merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
                merged.samples += [s._replace(labels={**s.labels, "replica": str(replica["rank"])})
                                   for s in family.samples]
        registry = CollectorRegistry()
        registry.register(_Families(list(families.values())))
        return PlainTextResponse(generate_latest(registry), media_type="text/plain; version=0.0.4")


class _Families:
    def __init__(self, families):
        self.families = families

    def collect(self):
        return self.families


async def _rest(call, events: bool):
    """The rest of a replica's answer; if the replica dies, an event stream ends with an error event."""
    finished = False
    try:
        async for chunk in call:
            yield chunk
        finished = True
    except Exception as e:  # the replica died mid-answer: the other requests go on
        finished = True
        if events:
            error = ApiError(502, f"the replica serving this stream was lost ({type(e).__name__}); retry the request",
                             code="replica_lost")
            yield f"data: {json.dumps(error.body())}\n\ndata: [DONE]\n\n".encode()
    finally:
        if not finished:  # the client went away: the replica cancels the request
            call.cancel()


def build_app(args: ClusterOptions) -> serve.Application:
    """The Serve application (an application builder: `serve run rwkv_lm.serve.cluster:build_app k=v ...`)."""
    options = args if isinstance(args, ClusterOptions) else ClusterOptions.model_validate(args)
    per_replica = options.max_batch + options.max_queue  # the engine queues; Ray's router queues beyond
    router = RequestRouterConfig(request_router_class=AffinityRouter,
                                 request_router_kwargs={"queue_threshold": options.queue_threshold or options.max_batch})
    engines = serve.deployment(EngineReplica).options(
        num_replicas=options.replicas, max_ongoing_requests=per_replica, request_router_config=router,
        ray_actor_options={"num_cpus": options.replica_cpus, "num_gpus": options.replica_gpus})
    gateway = serve.deployment(Gateway).options(num_replicas=1, max_ongoing_requests=per_replica * options.replicas,
                                                ray_actor_options={"num_cpus": 0})
    return gateway.bind(engines.bind(options), options.replicas)


def run(options: ClusterOptions, *, host: str = "127.0.0.1", port: int = 8000, ray_address: str | None = None) -> None:
    """Serve until interrupted: on the Ray cluster at `ray_address`, else on a local one started for the run.
    A ValueError if the replicas cannot start."""
    if ray_address:
        ray.init(address=ray_address)
    else:  # enough logical CPUs for the replicas even where the machine has fewer cores
        ray.init(num_cpus=max(os.cpu_count() or 1, int(options.replicas * options.replica_cpus + 0.999)),
                 include_dashboard=False)
    signal.signal(signal.SIGTERM, _interrupt)  # `docker stop`, Kubernetes: end as Ctrl-C does, Ray cleaned up
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build_app(options), name=APP_NAME, route_prefix="/", blocking=True)
    except RuntimeError as e:  # a replica that cannot start (a bad model file, too little memory): Ray gave up
        raise ValueError(f"the replicas did not start: {e} (their logs: the Ray session's logs/serve/)") from None
    finally:  # the app lives as long as this command: `serve deploy` is the way to leave it running
        if ray_address:
            serve.delete(APP_NAME)
        ray.shutdown()


def _interrupt(signum, frame):
    raise KeyboardInterrupt
