"""The server against what real clients send (issue 18): each defect found by trying it as a hostile but
realistic client, reproduced over a real socket (the openai client, httpx, raw sockets), and the stop-string
matcher against a brute-force reference."""
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

import rwkv_lm
from rwkv_lm import RWKVConfig
from rwkv_lm.serve import Engine, TextStream
from rwkv_lm.serve.limits import Limits
from rwkv_lm.serve.stops import StopMatcher
from rwkv_lm.testing import random_model
from test_serve_http import KEY, Server, free_port, headers

LIMITS = Limits(max_prompt_tokens=400, max_tokens=1000, max_stop_chars=50, max_body_bytes=64 << 10,
                body_timeout_s=1.0, header_timeout_s=1.0, keep_alive_s=1.0, stall_s=60.0)


@pytest.fixture(scope="module")
def model():
    cfg = RWKVConfig(vocab_size=65536, n_layer=2, n_embd=32, head_size=16, decay_lora=8, iclr_lora=8, value_lora=4, gate_lora=8)
    return random_model(cfg, seed=22)


class ThreadNotingTokenizer:
    """The World tokenizer, noting the thread of each `encode`."""

    def __init__(self, tokenizer):
        self.tokenizer, self.encode_threads = tokenizer, []

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def encode(self, text):
        self.encode_threads.append(threading.current_thread())
        return self.tokenizer.encode(text)


@pytest.fixture(scope="module")
def tokenizer(world):
    return ThreadNotingTokenizer(world)


@pytest.fixture(scope="module")
def engine(model, tokenizer):
    return Engine(model, tokenizer, max_batch=8)


@pytest.fixture
def fresh_engine(model, world):
    """An engine for a server of one test's own (an engine runs under one server at a time)."""
    return Engine(model, world, max_batch=4)


@pytest.fixture(scope="module")
def server(engine):
    server = Server(engine, LIMITS, model_name="tiny", api_key=KEY)
    yield server
    server.stop()


def post(server, path, body=None, *, content=None, extra_headers=None):
    """POST `body` as JSON in ASCII (a lone surrogate as its escape, as JavaScript's JSON.stringify writes it), or
    raw `content`."""
    if content is None:
        content, extra_headers = json.dumps(body).encode(), {"Content-Type": "application/json", **(extra_headers or {})}
    return httpx.post(server.url + path, content=content, headers={**headers(), **(extra_headers or {})}, timeout=60)


def assert_openai_error(response, status, param=None, words=""):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["param"] == param, error
    assert words in error["message"], error
    return error


# -- 1. stop strings ---------------------------------------------------------------------------------------------
def reference_cut(text, stops):
    """The text before the stop completed first (of two completed together, the longer), by brute force."""
    for end in range(1, len(text) + 1):
        hits = [s for s in stops if text[:end].endswith(s)]
        if hits:
            stop = max(hits, key=len)
            return text[:end - len(stop)], stop
    return text, None


@pytest.mark.parametrize("seed", range(30))
def test_stop_matcher_equals_brute_force_on_any_cut_of_the_text(seed):
    rng = random.Random(seed)
    alphabet = "ab" if seed % 2 else "abc"
    text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
    stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 4))]
    matcher, out, hit, fed = StopMatcher(stops), [], None, 0
    longest = max(map(len, stops))
    while fed < len(text) and hit is None:
        piece = text[fed:fed + rng.randint(1, 5)]
        found = matcher.feed(piece)
        if found is not None:
            begin, hit = found
            out.append(text[:fed + begin])
        else:
            assert matcher.pending < longest, "the holdback stays shorter than the longest stop"
        fed += len(piece)
    assert (out[0] if out else text, hit) == reference_cut(text, stops), (text, stops)


def test_text_stream_holds_back_only_a_possible_stop(world):
    stop = "x" * 40 + "END"
    stream = TextStream(world, stop=(stop,))
    shown = "".join(stream.push(t) for t in world.encode("x" * 100))
    assert len(shown) >= 100 - 42, "no more than the longest stop - 1 characters are held back"
    shown += "".join(stream.push(t) for t in world.encode("END and more"))
    assert shown == "x" * 60 and stream.stop_hit == stop


def test_a_stop_string_over_the_limit_is_400_naming_stop(server):
    response = post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 2, "stop": ["x" * 51]})
    assert_openai_error(response, 400, "stop", "at most 50")
    assert post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 2, "stop": ["x" * 50]}).status_code == 200


# -- 2. a huge body ------------------------------------------------------------------------------------------------
def raw_exchange(port, data: bytes, timeout=10.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def test_a_body_over_the_limit_is_413_before_it_is_read(server):
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {100 << 20}\r\n\r\n").encode()
    answer = raw_exchange(server.port, head + b'{"prompt": "')  # the rest never comes: the answer may not wait for it
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["type"] == "invalid_request_error"


def test_a_chunked_body_over_the_limit_is_413(server):
    def body():
        yield b'{"prompt": "'
        for _ in range(100):
            yield b"word " * 2000
        yield b'"}'
    response = post(server, "/v1/completions", content=body())
    assert_openai_error(response, 413, None, "larger than this server takes")


def test_a_prompt_long_in_characters_is_413_without_tokenizing(server, tokenizer):
    calls = len(tokenizer.encode_threads)
    prompt = "a" * (400 * 128 + 1)  # more characters than 400 tokens of the longest World token (128 bytes) hold
    assert len(json.dumps({"prompt": prompt})) < LIMITS.max_body_bytes
    error = assert_openai_error(post(server, "/v1/completions", {"prompt": prompt}), 413, None, "characters")
    assert error["code"] == "context_length_exceeded"
    assert len(tokenizer.encode_threads) == calls, "the prompt was never tokenized"


def test_prompts_are_tokenized_off_the_event_loop(server, tokenizer):
    assert post(server, "/v1/completions", {"prompt": "Hello there", "max_tokens": 2}).status_code == 200
    assert tokenizer.encode_threads
    assert all(t is not server.thread for t in tokenizer.encode_threads), "encode ran on the event loop's thread"


# -- 3. lone surrogates -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": "a\ud800b"}, "prompt"),
    ("/v1/completions", {"prompt": ["a\udfffb"]}, "prompt.0"),
    ("/v1/completions", {"prompt": "Hi", "stop": ["\ud800"]}, "stop.0"),
    ("/v1/completions", {"prompt": "Hi", "model": "m\ud800", "stream": True}, "model"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a\ud800b"}]}, "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]},
     "messages.0.content.0.text"),
], ids=["prompt", "prompt-list", "stop", "model-streamed", "chat", "chat-part"])
def test_a_lone_surrogate_is_a_400_naming_the_field(server, path, body, param):
    response = post(server, path, body)
    assert_openai_error(response, 400, param, "lone surrogate")
    assert httpx.get(server.url + "/health").status_code == 200


# -- 4. --max-queue 0 ----------------------------------------------------------------------------------------------
def test_max_queue_zero_takes_requests_while_a_row_is_free(model, world):
    engine = Engine(model, world, max_batch=1, max_queue=0)
    server = Server(engine, Limits(max_tokens=100_000))
    try:
        assert httpx.post(server.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200
        body = {"prompt": "Go on", "max_tokens": 100_000, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as running:
            lines = running.iter_lines()
            next(lines)  # it holds the only row
            response = httpx.post(server.url + "/v1/completions", json={"prompt": "Me too"}, timeout=60)
            assert_openai_error(response, 503, None, "busy")
    finally:
        server.stop()


# -- 5. shutdown ---------------------------------------------------------------------------------------------------
def start_serve(tmp_path, model, *flags):
    path = tmp_path / "m.safetensors"
    if not path.exists():
        rwkv_lm.save(model, path, tokenizer="world")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "rwkv_lm.cli", "serve", "--model", str(path), "--port", str(port),
                             *flags], stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, proc.stderr.read()
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return proc, f"http://127.0.0.1:{port}"
        except httpx.TransportError:
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)


ENDLESS = {"prompt": "Go on", "max_tokens": 16_000, "stream": True, "ignore_eos": True}


def test_sigterm_ends_endless_streams_with_a_final_chunk_and_exits(tmp_path, model):
    proc, url = start_serve(tmp_path, model, "--shutdown-timeout", "1")
    try:
        with httpx.stream("POST", url + "/v1/completions", json=ENDLESS, timeout=60) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: {")
            proc.send_signal(signal.SIGTERM)
            events = [line for line in lines if line]
        assert events[-1] == "data: [DONE]"
        last = json.loads(events[-2].removeprefix("data: "))
        assert "choices" in last and last["choices"][0]["finish_reason"] == "abort", events[-3:]
        assert proc.wait(timeout=60) == -signal.SIGTERM  # (uvicorn ends by raising the signal it caught, once done)
        assert "Traceback" not in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()


def test_a_second_signal_exits_at_once(tmp_path, model):
    proc, url = start_serve(tmp_path, model, "--shutdown-timeout", "600")
    try:
        with httpx.stream("POST", url + "/v1/completions", json=ENDLESS, timeout=60) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: {")
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 30
            while True:  # the first signal is handled once new connections are refused (two pending would be one)
                try:
                    httpx.get(url + "/health", timeout=5)
                except (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError):
                    break  # refused, or reset where it came in as the listener closed: not served either way
                assert time.monotonic() < deadline, "the server still takes connections"
            assert next(line for line in lines if line).startswith("data: {"), "the first signal lets streams run on"
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        proc.kill()
        proc.wait()


# -- 6. max_tokens ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path, field", [("/v1/completions", "max_tokens"), ("/v1/chat/completions", "max_completion_tokens")])
def test_max_tokens_over_the_limit_is_400_naming_it(server, path, field):
    body = {"prompt": "Hi"} if "chat" not in path else {"messages": [{"role": "user", "content": "Hi"}]}
    assert_openai_error(post(server, path, {**body, field: 10**12}), 400, field, "1,000")


# -- 8. errors in OpenAI's shape -------------------------------------------------------------------------------------
def test_a_wrong_method_is_405_in_openai_shape(server):
    response = httpx.get(server.url + "/v1/completions", headers=headers())
    assert_openai_error(response, 405, None, "GET is not allowed")


@pytest.mark.parametrize("name, content, content_type, words", [
    ("invalid UTF-8", b'{"prompt": "\xff\xfe"}', "application/json", "not valid UTF-8"),
    ("deep JSON", b"[" * 20_000 + b"]" * 20_000, "application/json", "nests too deeply"),
    ("form body (curl -d)", b"prompt=hi", "application/x-www-form-urlencoded", "Content-Type: application/json"),
    ("no content type", b'"just a string"', None, "JSON object"),
])
def test_a_body_that_is_no_json_object_is_400_in_openai_shape(server, name, content, content_type, words):
    extra = {"Content-Type": content_type} if content_type else {}
    assert_openai_error(post(server, "/v1/completions", content=content, extra_headers=extra), 400, None, words)


@pytest.mark.parametrize("body, param", [
    ({"prompt": "Hi", "seed": 2**64}, "seed"),
    ({"prompt": "Hi", "seed": -2**63 - 1}, "seed"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": [5.5]}, "prompt.0"),  # ([5] is a prompt of token ids)
    ({"prompt": "Hi", "max_tokens": "5"}, "max_tokens"),
    ({"prompt": "Hi", "stream": "yes"}, "stream"),
    ({"prompt": "Hi", "temperature": "0.5"}, "temperature"),
    ({"prompt": "Hi", "stop": [1]}, "stop.0"),
], ids=["seed-2^64", "seed-below-int64", "prompt-int", "prompt-list-int", "max_tokens-string", "stream-string",
        "temperature-string", "stop-int"])
def test_wrong_types_and_ranges_name_the_field_as_sent(server, body, param):
    error = assert_openai_error(post(server, "/v1/completions", body), 400, param)
    assert "str" not in error["param"].split(".") and "list" not in error["message"].split(":")[0]


@pytest.mark.parametrize("messages, param", [
    ([{"role": "user", "content": 5}], "messages.0.content"),
    ([{"role": "user", "content": [{"type": "image_url", "text": "x"}]}], "messages.0.content.0.type"),
    ([{"role": "user"}], "messages.0"),
    (["Hi"], "messages.0"),
], ids=["content-int", "content-part-type", "no-content", "message-string"])
def test_chat_errors_name_the_field_without_pydantic_branches(server, messages, param):
    assert_openai_error(post(server, "/v1/chat/completions", {"messages": messages}), 400, param)


# -- 9. models and strict types ------------------------------------------------------------------------------------
def test_an_unknown_model_is_404_model_not_found(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="../../etc/passwd", prompt="Hi", max_tokens=2)
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    assert client.models.retrieve("tiny").id == "tiny"


def test_a_reply_without_model_names_the_listed_model(server):
    listed = httpx.get(server.url + "/v1/models", headers=headers()).json()["data"][0]["id"]
    assert post(server, "/v1/completions", {"prompt": "Hi", "max_tokens": 2}).json()["model"] == listed == "tiny"


def test_an_assistant_message_with_null_content_is_taken(server):
    messages = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": None},
                {"role": "user", "content": "Well?"}]
    response = post(server, "/v1/chat/completions", {"messages": messages, "max_tokens": 3})
    assert response.status_code == 200, response.text
    assert_openai_error(post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": None}]}),
                        400, "messages.0", "needs content")


# -- 10. browsers and probes -----------------------------------------------------------------------------------------
def test_cors_is_off_by_default_and_on_for_allowed_origins(fresh_engine):
    preflight = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    server = Server(fresh_engine, LIMITS, model_name="tiny", api_key=KEY)
    try:
        response = httpx.options(server.url + "/v1/completions", headers=preflight)
        assert "access-control-allow-origin" not in response.headers
    finally:
        server.stop()
    server = Server(fresh_engine, LIMITS, model_name="tiny", api_key=KEY, allowed_origins=("http://app.example",))
    try:
        response = httpx.options(server.url + "/v1/completions", headers=preflight)
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == "http://app.example"
        response = httpx.post(server.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 1},
                              headers={**headers(), "Origin": "http://app.example"})
        assert response.status_code == 200 and response.headers["access-control-allow-origin"] == "http://app.example"
    finally:
        server.stop()


def test_head_health(server):
    response = httpx.head(server.url + "/health")
    assert response.status_code == 200 and response.content == b""


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # (the loop's end, as expected)
def test_health_is_503_when_the_engine_loop_is_dead(fresh_engine):
    engine = fresh_engine
    server = Server(engine)
    try:
        def broken_step():
            raise RuntimeError("the scheduler broke")
        engine.step = broken_step
        response = httpx.post(server.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=30)
        assert response.status_code == 500, "the request in flight ends: it does not hang"
        assert_openai_error(httpx.get(server.url + "/health"), 503, None, "not running")
        assert_openai_error(httpx.post(server.url + "/v1/completions", json={"prompt": "Hi"}), 503, None, "not running")
    finally:
        server.stop()


def test_health_is_503_while_the_engine_loop_is_stuck(fresh_engine):
    engine = fresh_engine
    server = Server(engine, Limits(stall_s=0.2))
    release = threading.Event()
    step = engine.step

    def stuck_step():
        release.wait(timeout=60)
        return step()
    engine.step = stuck_step
    try:
        body = {"prompt": "Hi", "max_tokens": 2, "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60):
            deadline = time.monotonic() + 30
            while (health := httpx.get(server.url + "/health")).status_code == 200:
                assert time.monotonic() < deadline, "health never saw the stuck loop"
                time.sleep(0.05)
            assert_openai_error(health, 503, None, "one iteration")
            release.set()
        deadline = time.monotonic() + 30
        while httpx.get(server.url + "/health").status_code != 200:  # (until a step takes less than 0.2 s again)
            assert time.monotonic() < deadline, "health stayed 503 after the loop went on"
            time.sleep(0.05)
    finally:
        release.set()
        server.stop()


# -- 11. connections -----------------------------------------------------------------------------------------------
def closed_within(sock, seconds: float, trickle: bytes = b"") -> bool:
    """Whether the server closes `sock` within `seconds` (sending `trickle` one byte at a time meanwhile)."""
    deadline = time.monotonic() + seconds
    sock.settimeout(0.1)
    sent = 0
    while time.monotonic() < deadline:
        try:
            if sock.recv(65536) == b"":
                return True
        except socket.timeout:
            pass
        except ConnectionResetError:
            return True
        if sent < len(trickle):
            try:
                sock.sendall(trickle[sent:sent + 1])
            except (BrokenPipeError, ConnectionResetError):
                return True
            sent += 1
    return False


def test_idle_and_slow_head_connections_are_closed(server):
    with socket.create_connection(("127.0.0.1", server.port)) as idle, \
            socket.create_connection(("127.0.0.1", server.port)) as slow:
        assert closed_within(idle, 20)
        assert closed_within(slow, 20, trickle=b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: y\r\n" * 100)


def test_an_idle_keep_alive_connection_is_closed(server):
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(65536).startswith(b"HTTP/1.1 200")
        assert closed_within(s, 20)


def test_a_request_that_is_no_http_is_400_json(server):
    answer = raw_exchange(server.port, b"HELLO THERE\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert "not valid HTTP" in json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["message"]


def test_a_slow_body_is_408(server):
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n").encode()
    answer = raw_exchange(server.port, head + b'{"prompt": "')
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert "did not arrive" in json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["message"]


def test_connections_beyond_the_limit_get_503_json(fresh_engine):
    server = Server(fresh_engine, Limits(max_connections=3, header_timeout_s=30))
    held = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(3)]
    try:
        deadline = time.monotonic() + 20
        while (response := httpx.get(server.url + "/health")).status_code == 200:  # (until the server has taken them)
            assert time.monotonic() < deadline, "a connection beyond the limit was served"
            time.sleep(0.05)
        assert_openai_error(response, 503, None, "connections open")
        assert response.json()["error"]["code"] == "too_many_connections"
        for s in held:
            s.close()
        deadline = time.monotonic() + 20
        while httpx.get(server.url + "/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        for s in held:
            s.close()
        server.stop()


# -- 12. the key ---------------------------------------------------------------------------------------------------
def test_the_bearer_scheme_is_case_insensitive_and_401_says_how(server):
    body = {"prompt": "Hi", "max_tokens": 1}
    for scheme in ("bearer", "BEARER", "Bearer"):
        ok = httpx.post(server.url + "/v1/completions", json=body, headers={"Authorization": f"{scheme} {KEY}"})
        assert ok.status_code == 200, scheme
    refused = httpx.post(server.url + "/v1/completions", json=body)
    assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"


def test_metrics_and_docs_need_the_key_unless_metrics_are_public(fresh_engine, server):
    for path in ("/metrics", "/docs", "/openapi.json"):
        assert httpx.get(server.url + path).status_code == 401, path
        assert httpx.get(server.url + path, headers=headers()).status_code == 200, path
    assert httpx.get(server.url + "/health").status_code == 200
    public = Server(fresh_engine, LIMITS, api_key=KEY, metrics_public=True)
    try:
        assert httpx.get(public.url + "/metrics").status_code == 200
        assert httpx.get(public.url + "/docs").status_code == 401
    finally:
        public.stop()


@pytest.mark.parametrize("flag", ["--max-tokens-limit", "--max-body-mb", "--shutdown-timeout", "--max-connections"])
def test_serve_rejects_a_limit_that_is_not_positive(tmp_path, flag):
    proc = subprocess.run([sys.executable, "-m", "rwkv_lm.cli", "serve", "--model", str(tmp_path / "nope.pth"), flag, "0"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and f"{flag} must be > 0" in proc.stderr
