"""The OpenAI-compatible server, tried as clients use it: the official `openai` client and raw HTTP against a
real server on a free port. Greedy text over HTTP equals `rwkv_lm.generate`'s; streams are well-formed
server-sent events; a client that goes away frees its row; every bad input gets OpenAI's error JSON with the
right status, and the server stays up."""
import json
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import rwkv_lm
from rwkv_lm import ChatSession, RWKVConfig, SamplingParams, complete
from rwkv_lm.serve import Engine, listener
from rwkv_lm.serve.limits import Limits
from rwkv_lm.serve.server import create_app
from rwkv_lm.testing import random_model

KEY = "sk-test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`rwkv-lm serve`'s app and uvicorn server over `engine`, in a thread, on a free port, until stopped."""

    def __init__(self, engine, limits=Limits(), **app_kwargs):
        self.port = free_port()
        app = create_app(engine, limits=limits, **app_kwargs)
        config = listener.config(app, "127.0.0.1", self.port, limits, log_level="warning")
        self.server = listener.Server(config, engine, limits.shutdown_timeout_s)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def model():
    cfg = RWKVConfig(vocab_size=65536, n_layer=2, n_embd=32, head_size=16, decay_lora=8, iclr_lora=8, value_lora=4, gate_lora=8)
    return random_model(cfg, seed=21)


@pytest.fixture(scope="module")
def engine(model, world):
    return Engine(model, world, max_batch=8, cache=64 << 20)


@pytest.fixture(scope="module")
def server(engine):
    server = Server(engine, Limits(max_prompt_tokens=400), model_name="tiny", api_key=KEY)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def headers(key=KEY):
    return {"Authorization": f"Bearer {key}"}


def test_completions_equal_generate(client, model, world):
    prompt = "The capital of France is"
    expected = complete(model, world, prompt, max_tokens=20, temperature=0)
    done = client.completions.create(model="tiny", prompt=prompt, max_tokens=20, temperature=0)
    assert done.choices[0].text == expected
    assert done.choices[0].finish_reason == "length"
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (len(world.encode(prompt)), 20)
    pieces = [c.choices[0].text for c in client.completions.create(model="tiny", prompt=prompt, max_tokens=20,
                                                                    temperature=0, stream=True)]
    assert "".join(pieces) == expected and len([p for p in pieces if p]) > 1


def test_chat_completions_equal_a_chat_session(client, model, world):
    expected = "".join(ChatSession(model, world, system="Be brief.").reply("Hello!", max_tokens=16, temperature=0))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    done = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0)
    assert done.choices[0].message.content == expected
    assert done.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens == done.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == done.choices[0].finish_reason


def test_a_stop_string_ends_with_finish_reason_stop(client, model, world):
    full = complete(model, world, "Once upon a time", max_tokens=30, temperature=0)
    stop = full[6:9]
    done = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=30, temperature=0, stop=[stop])
    assert done.choices[0].text == full[:full.index(stop)] and done.choices[0].finish_reason == "stop"


def test_raw_server_sent_events(server):
    body = {"prompt": "Hi", "max_tokens": 8, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=headers(), timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = "".join(response.iter_text())
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]", "every event ends in a blank line; [DONE] comes last"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert {c["object"] for c in chunks} == {"text_completion"} and len({c["id"] for c in chunks}) == 1
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"


def test_a_client_that_goes_away_frees_its_row(server, engine, client):
    body = {"prompt": "Tell me everything", "max_tokens": 16_000, "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=headers(), timeout=60) as response:
        lines = response.iter_lines()
        while not next(lines).startswith("data: {"):
            pass
        assert engine.stats()["active"] == 1
    deadline = time.monotonic() + 10
    while engine.stats()["active"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.stats()["active"] == 0
    assert engine.stats()["finished"].get("cancelled", 0) >= 1
    assert client.completions.create(model="tiny", prompt="Still there?", max_tokens=3).usage.completion_tokens == 3


def test_a_client_that_stops_waiting_for_a_whole_reply_frees_its_row(server, engine):
    body = {"prompt": "Tell me more", "max_tokens": 16_000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, headers=headers(), timeout=1.0)
    deadline = time.monotonic() + 10
    while engine.stats()["active"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.stats()["active"] == 0


def test_models_health_and_metrics(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and "active" in health
    shared = "A long shared beginning that two requests have in common, " * 3
    for end in ("first", "second", "third"):
        client.completions.create(model="tiny", prompt=shared + end, max_tokens=2)
    metrics = httpx.get(server.url + "/metrics", headers=headers()).text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in metrics.splitlines() if line and not line.startswith("#")}
    assert values["rwkv_lm_requests_total"] >= 3 and values["rwkv_lm_generated_tokens_total"] >= 6
    assert values["rwkv_lm_state_cache_hits_total"] >= 1 and values["rwkv_lm_state_cache_bytes"] > 0
    assert "rwkv_lm_waiting" in values and "rwkv_lm_decoding" in values and "rwkv_lm_decode_steps_total" in values
    assert any(k.startswith('rwkv_lm_http_requests_total{path="/v1/completions",status="200"}') for k in values)


BAD = [  # (name, method and body or raw bytes, status, words the message must contain, param)
    ("malformed JSON", b"{not json", 400, "not valid JSON", None),
    ("no prompt", {"max_tokens": 4}, 400, "prompt", "prompt"),
    ("empty prompt", {"prompt": ""}, 400, "empty", "prompt"),
    ("negative temperature", {"prompt": "Hi", "temperature": -1}, 400, "temperature", "temperature"),
    ("top_p zero", {"prompt": "Hi", "top_p": 0}, 400, "top_p", "top_p"),
    ("max_tokens zero", {"prompt": "Hi", "max_tokens": 0}, 400, "max_tokens", "max_tokens"),
    ("max_tokens a word", {"prompt": "Hi", "max_tokens": "many"}, 400, "max_tokens", "max_tokens"),
    ("more choices than rows", {"prompt": "Hi", "n": 9}, 400, "n=9", "n"),
    ("suffix", {"prompt": "Hi", "suffix": "end"}, 400, "suffix", "suffix"),
    ("best_of below n", {"prompt": "Hi", "n": 3, "best_of": 2}, 400, "best_of", "best_of"),
    ("best_of beyond n streamed", {"prompt": "Hi", "best_of": 3, "stream": True}, 400, "streamed", "best_of"),
    ("logit_bias out of range", {"prompt": "Hi", "logit_bias": {"5": 101}}, 400, "logit_bias", "logit_bias"),
    ("logit_bias beyond the vocabulary", {"prompt": "Hi", "logit_bias": {"70000": 1}}, 400, "logit_bias", "logit_bias"),
    ("token id beyond the vocabulary", {"prompt": [1, 70000]}, 400, "prompt", "prompt"),
    ("bad response_format", {"prompt": "Hi", "response_format": {"type": "xml"}}, 400, "type", "response_format"),
    ("bad schema", {"prompt": "Hi", "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no"}}}},
     400, "response_format", "response_format"),
    ("five stops", {"prompt": "Hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "stop"),
    ("prompt over the limit", {"prompt": "word " * 1000}, 413, "at most 400", None),
]
BAD_CHAT = [
    ("no messages", {"messages": []}, 400, "messages", "messages"),
    ("unknown role", {"messages": [{"role": "wizard", "content": "Hi"}]}, 400, "role", "messages.0.role"),
    ("empty message", {"messages": [{"role": "user", "content": "  "}]}, 400, "empty", "messages"),
    ("image part", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     400, "image_url", "messages.0.content.0.type"),
    ("audio", {"messages": [{"role": "user", "content": "Hi"}], "audio": {"voice": "alloy"}}, 400, "audio", "audio"),
    ("audio modality", {"messages": [{"role": "user", "content": "Hi"}], "modalities": ["text", "audio"]}, 400, "text",
     "modalities.1"),
    ("tool_choice names no tool", {"messages": [{"role": "user", "content": "Hi"}],
                                   "tool_choice": {"type": "function", "function": {"name": "f"}}}, 400, "tool_choice", None),
]


@pytest.mark.parametrize("name, body, status, words, param", BAD + BAD_CHAT, ids=[b[0] for b in BAD + BAD_CHAT])
def test_bad_input_gets_an_openai_error(server, name, body, status, words, param):
    path = "/v1/chat/completions" if (name, body, status, words, param) in BAD_CHAT else "/v1/completions"
    if isinstance(body, bytes):
        response = httpx.post(server.url + path, content=body, headers={**headers(), "content-type": "application/json"})
    else:
        response = httpx.post(server.url + path, json=body, headers=headers(), timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert words in error["message"] and error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert httpx.get(server.url + "/health").status_code == 200, "the server stays up"


@pytest.mark.parametrize("auth", [None, "Bearer wrong-key", "Basic abc"], ids=["missing", "wrong", "not-bearer"])
def test_a_missing_or_wrong_key_is_401(server, auth):
    response = httpx.post(server.url + "/v1/completions", json={"prompt": "Hi"},
                          headers={"Authorization": auth} if auth else {})
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_a_full_queue_is_503_and_the_server_stays_up(model, world):
    engine = Engine(model, world, max_batch=1, max_queue=1)
    server = Server(engine, Limits(max_tokens=100_000))
    try:
        body = {"prompt": "Go on and on", "max_tokens": 100_000, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as running:
            lines = running.iter_lines()  # (kept: a dropped iterator would close the response)
            next(lines)  # it has a row now
            with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60):
                deadline = time.monotonic() + 10
                while engine.stats()["waiting"] < 1 and time.monotonic() < deadline:
                    time.sleep(0.01)
                response = httpx.post(server.url + "/v1/completions", json={"prompt": "Me too"}, timeout=60)
                assert response.status_code == 503 and response.headers["retry-after"] == "1"
                assert "busy" in response.json()["error"]["message"]
        deadline = time.monotonic() + 10
        while engine.stats()["active"] + engine.stats()["waiting"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert httpx.post(server.url + "/v1/completions", json={"prompt": "Now?", "max_tokens": 2}).status_code == 200
    finally:
        server.stop()


def test_rwkv_lm_serve_command(tmp_path, model, world):
    """The command as a user runs it: a checkpoint, a port, a key; answers, then stops on SIGINT."""
    path = rwkv_lm.save(model, tmp_path / "m.safetensors", tokenizer="world")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "rwkv_lm.cli", "serve", "--model", str(path), "--port", str(port),
                             "--api-key", KEY, "--max-batch", "4", "--state-cache-mb", "16"],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0)
        assert client.models.list().data[0].id == "m"
        done = client.completions.create(model="m", prompt="Hello", max_tokens=6, temperature=0)
        assert done.choices[0].text == complete(model, world, "Hello", SamplingParams(max_tokens=6, temperature=0))
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_serve_command_rejects_bad_flags(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rwkv_lm.cli", "serve", "--model", str(tmp_path / "nope.pth"),
                           "--max-batch", "0"], capture_output=True, text=True)
    assert proc.returncode == 2 and "--max-batch must be >= 1" in proc.stderr
