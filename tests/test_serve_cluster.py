"""`rwkv-lm serve --replicas 2 --api-key KEY` as clients use it: a local Ray cluster (one for the module: Ray is heavy), two
replicas of one CPU each, deployed from deploy/serve_config.yaml, the official `openai` client. Each turn of a
conversation is read from its replica's prefix cache; greedy replies equal a single server's; a replica killed
mid-stream ends that stream with an error event while the other streams go on, and Ray brings it back; a bad
request disturbs no other."""
import importlib
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import yaml

ray = pytest.importorskip("ray", reason="the cluster tests need Ray Serve: pip install 'rwkv-lm[cluster]'")
serve = pytest.importorskip("ray.serve", reason="the cluster tests need Ray Serve: pip install 'rwkv-lm[cluster]'")

from test_serve_http import Server, free_port  # noqa: E402

from rwkv_lm import RWKVConfig, save  # noqa: E402
from rwkv_lm.runtime import decode_step, load  # noqa: E402
from rwkv_lm.serve import Engine  # noqa: E402
from rwkv_lm.serve.routing import rendezvous  # noqa: E402
from rwkv_lm.testing import random_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REPLICAS = 2
KEY = "sk-cluster"
SETTLE_S = 180  # how long a replica may take to come back (bounds a wait, asserts nothing about speed)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    cfg = RWKVConfig(vocab_size=65536, n_layer=2, n_embd=32, head_size=16, decay_lora=8, iclr_lora=8, value_lora=4, gate_lora=8)
    return save(random_model(cfg, seed=21), tmp_path_factory.mktemp("cluster") / "tiny.safetensors", tokenizer="world")


@pytest.fixture(scope="module")
def cluster(model_path):
    """The app of deploy/serve_config.yaml (the config `serve deploy` takes), on the test's model and port."""
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load((ROOT / "deploy" / "serve_config.yaml").read_text())
    app = config["applications"][0]
    app["args"].update(model=str(model_path), replicas=REPLICAS, replica_cpus=1, max_batch=8, model_name="tiny",
                       api_key=KEY)
    ServeDeploySchema.model_validate(config)
    module, _, builder = app["import_path"].partition(":")
    ray.init(num_cpus=REPLICAS, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(getattr(importlib.import_module(module), builder)(app["args"]), name=app["name"], route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def client(cluster):
    return openai.OpenAI(base_url=cluster + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def single(model_path):
    """A single `rwkv-lm serve` of the same file (what the replicas load, loaded the same way)."""
    model = load(model_path)
    engine = Engine(model, model.tokenizer, max_batch=8, cache=64 << 20, step=decode_step(model))
    server = Server(engine, model_name="tiny")
    yield openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    server.stop()


def health(url) -> dict:
    return httpx.get(url + "/health", timeout=60).json()


def session_on(rank: int, tag: str) -> str:
    """A session id whose requests go to replica `rank`."""
    return next(f"{tag}-{i}" for i in range(1000) if rendezvous(f"session:{tag}-{i}", list(range(REPLICAS))) == rank)


def test_each_turn_is_read_from_its_replicas_cache(client):
    def converse(i):
        messages = [{"role": "system", "content": f"You are assistant number {i}."}]
        served, previous_prompt = [], None
        for turn in range(3):
            messages.append({"role": "user", "content": f"Question {turn} of conversation {i}?"})
            raw = client.chat.completions.with_raw_response.create(model="tiny", messages=messages, max_tokens=6,
                                                                   temperature=0)
            reply = raw.parse()
            served.append(raw.headers["x-rwkv-lm-replica"])
            if previous_prompt is not None:
                assert reply.usage.prompt_tokens_details.cached_tokens >= previous_prompt, (i, turn)
            previous_prompt = reply.usage.prompt_tokens
            messages.append({"role": "assistant", "content": reply.choices[0].message.content or "."})
        return served

    with ThreadPoolExecutor(4) as pool:
        served = list(pool.map(converse, range(20)))
    assert all(len(set(s)) == 1 for s in served), "a conversation moved between replicas"
    assert {s[0] for s in served} == {str(r) for r in range(REPLICAS)}, "the conversations did not spread"


def test_greedy_replies_equal_a_single_servers(client, single):
    for i, messages in enumerate([[{"role": "user", "content": "Hello!"}],
                                  [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"}]]):
        expected = single.chat.completions.create(model="tiny", messages=messages, max_tokens=24, temperature=0)
        got = client.chat.completions.create(model="tiny", messages=messages, max_tokens=24, temperature=0)
        assert got.choices[0].message.content == expected.choices[0].message.content
        chunks = client.chat.completions.create(model="tiny", messages=messages, max_tokens=24, temperature=0,
                                                stream=True, extra_headers={"x-session-id": session_on(i % REPLICAS, "g")})
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.choices[0].message.content
    prompt = "The capital of France is"
    expected = single.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0)
    assert client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0).choices[0].text \
        == expected.choices[0].text


def test_health_and_metrics_cover_every_replica(cluster):
    state = health(cluster)
    assert state["status"] == "ok" and [r["replica"]["rank"] for r in state["replicas"]] == list(range(REPLICAS))
    assert httpx.get(cluster + "/metrics", timeout=60).status_code == 401  # the key guards it, as on one server
    text = httpx.get(cluster + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=60).text
    for rank in range(REPLICAS):
        assert f'rwkv_lm_requests_total{{replica="{rank}"}}' in text
    assert text.count("# TYPE rwkv_lm_requests_total counter") == 1


def test_a_bad_request_disturbs_no_other(client, cluster, single):
    prompts = [f"Story {i}: once upon a time" for i in range(4)]
    expected = [single.completions.create(model="tiny", prompt=p, max_tokens=40, temperature=0).choices[0].text
                for p in prompts]

    def good(prompt):
        return "".join(c.choices[0].text for c in client.completions.create(model="tiny", prompt=prompt, max_tokens=40,
                                                                              temperature=0, stream=True))

    with ThreadPoolExecutor(4) as pool:
        texts = pool.map(good, prompts)
        with pytest.raises(openai.BadRequestError) as bad:
            client.completions.create(model="tiny", prompt="Hi", max_tokens=40, temperature=-1)
        raw = httpx.post(cluster + "/v1/completions", content=b"{not json", timeout=60,
                         headers={"content-type": "application/json", "Authorization": f"Bearer {KEY}"})
        assert list(texts) == expected
    assert bad.value.body["param"] == "temperature"
    assert raw.status_code == 400 and "not valid JSON" in raw.json()["error"]["message"]


def test_a_replica_killed_mid_stream(client, cluster):
    before = {r["replica"]["rank"]: r["replica"] for r in health(cluster)["replicas"]}
    victim, survivor = 0, 1
    survivor_stream = client.completions.create(model="tiny", prompt="A long story", max_tokens=3000, temperature=0,
                                                stream=True, extra_body={"ignore_eos": True},
                                                stream_options={"include_usage": True},
                                                extra_headers={"x-session-id": session_on(survivor, "s")})
    victim_stream = client.completions.create(model="tiny", prompt="Another story", max_tokens=3000, temperature=0,
                                              stream=True, extra_body={"ignore_eos": True},
                                              extra_headers={"x-session-id": session_on(victim, "v")})
    survivor_chunks = iter(survivor_stream)
    first = next(survivor_chunks)
    next(iter(victim_stream))
    survived = []
    reader = threading.Thread(target=lambda: survived.extend([first, *survivor_chunks]))
    reader.start()
    os.kill(before[victim]["pid"], signal.SIGKILL)
    with pytest.raises(openai.APIError, match="replica .* was lost"):
        for _ in victim_stream:
            pass
    reader.join(timeout=SETTLE_S)
    assert survived[-1].usage.completion_tokens == 3000, "the other replica's stream was cut"
    assert [c.choices[0].finish_reason for c in survived if c.choices][-1] == "length"

    # the victim's conversations are answered meanwhile (by the survivor), and again by the victim once it is back
    session = session_on(victim, "v")
    done = client.completions.create(model="tiny", prompt="Later", max_tokens=5, extra_headers={"x-session-id": session})
    assert done.usage.completion_tokens == 5
    deadline = time.monotonic() + SETTLE_S
    while (state := health(cluster))["status"] != "ok":
        assert time.monotonic() < deadline, f"the killed replica did not come back: {state}"
        time.sleep(1)
    assert before[victim]["pid"] not in {r["replica"]["pid"] for r in state["replicas"]}
    raw = client.completions.with_raw_response.create(model="tiny", prompt="Later", max_tokens=5,
                                                      extra_headers={"x-session-id": session})
    assert raw.headers["x-rwkv-lm-replica"] == str(victim) and raw.parse().usage.completion_tokens == 5


def test_the_kuberay_manifest_carries_a_valid_serve_config():
    from ray.serve.schema import ServeDeploySchema

    service = yaml.safe_load((ROOT / "deploy" / "rayservice.yaml").read_text())
    config = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
    local = yaml.safe_load((ROOT / "deploy" / "serve_config.yaml").read_text())
    assert config.applications[0].import_path == local["applications"][0]["import_path"]
    from rwkv_lm.serve.cluster import ClusterOptions

    ClusterOptions.model_validate(config.applications[0].args)
    assert service["spec"]["rayClusterConfig"]["rayVersion"] == ray.__version__
