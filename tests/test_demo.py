"""The Gradio demo through its API (gradio_client), on tiny random models served on a free port."""
import os
import re
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch

import rwkv_lm
from rwkv_lm import GPT, ChatSession, GPTConfig, RWKVConfig
from rwkv_lm.chat import CHAT_DEFAULTS
from rwkv_lm.testing import random_model
from rwkv_lm.tokenizer import train_bpe


# Gradio's queue calls a pandas option that pandas 3 deprecates; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning")
pytest.importorskip("gradio_client")
from gradio_client import Client  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402
from gradio_client.utils import QueueError, Status  # noqa: E402

from demo import __main__ as cli  # noqa: E402
from demo.app import Engines, build_app  # noqa: E402
from demo.inputs import sampling_params  # noqa: E402

CORPUS = ["The goose flies over the lake at dawn and the reeds remember the wind.",
          "Hello there! How are you today? I am fine, thank you, and you?"] * 20
# the chat endpoint's sampling inputs in order; they come after the message and the system prompt, before the seed
CHAT_SETTINGS = dict(max_tokens=24, temperature=1.0, top_p=0.8, top_k=0, presence_penalty=0.4, frequency_penalty=0.4)


def make_checkpoints(directory):
    """A tiny RWKV-7 and a tiny GPT with a BPE trained on a few sentences, saved as the demo loads them."""
    tok = train_bpe(CORPUS, vocab_size=320)
    rwkv = random_model(RWKVConfig(vocab_size=320, n_layer=2, n_embd=64, head_size=16, decay_lora=8, iclr_lora=8,
                                   value_lora=4, gate_lora=8))
    torch.manual_seed(1)
    gpt = GPT(GPTConfig(vocab_size=320, n_layer=2, n_embd=64, n_head=4)).eval()
    paths = directory / "rwkv7.safetensors", directory / "gpt.safetensors"
    rwkv_lm.save(rwkv, paths[0], tokenizer=tok.spec)
    rwkv_lm.save(gpt, paths[1], tokenizer=tok.spec)
    return paths


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(rwkv_path, baseline_path, max_batch=16, **build_kwargs):
    """Load both checkpoints as `python -m demo` does, start their engines, serve the app, yield (url, engines)."""
    rwkv, baseline = cli.load_model(rwkv_path, None), cli.load_model(baseline_path, None)
    with Engines(rwkv, baseline, max_batch=max_batch) as engines:
        app = build_app(engines, **build_kwargs)
        app.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
        try:
            yield app.local_url, engines
        finally:
            app.close()


def reply_text(history) -> str:
    """The text of the last message of a Chatbot value (Gradio 6 gives content as a list of parts)."""
    return "".join(part["text"] for part in history[-1]["content"] if part["type"] == "text")


def status_tokens(status: str) -> int:
    match = re.fullmatch(r"state: [\d.,]+ (MB|kB), ([\d,]+) tokens", status)
    assert match, status
    return int(match.group(2).replace(",", ""))


def chat(client, message, seed, system="", **settings):
    """One turn through the `chat` endpoint -> (every streamed output, the last)."""
    job = client.submit(message, system, *{**CHAT_SETTINGS, **settings}.values(), seed, api_name="/chat")
    last = job.result()
    return job.outputs(), last


def reference_turns(model, turns, **settings):
    """What a ChatSession of the package says to (message, seed) turns, one after the other
    -> (reply texts, tokens consumed)."""
    session = ChatSession(model, model.tokenizer)
    texts = ["".join(session.reply(message, sampling_params(*{**CHAT_SETTINGS, **settings}.values(), seed)))
             for message, seed in turns]
    return texts, session.num_tokens


def wait_until(condition, timeout=30.0):
    """Poll `condition` until it holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return make_checkpoints(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def server(checkpoints):
    with serve(*checkpoints, max_batch=8, max_queue=16, sweep_lengths=[8, 40]) as served:
        yield served


@pytest.fixture
def client(server):
    return Client(server[0], verbose=False)


def test_chat_streams_what_a_chat_session_says_and_a_turn_costs_only_its_tokens(server, client):
    rwkv = server[1].rwkv.model
    outputs, (history, _, status) = chat(client, "Hello goose", seed=1)
    # the message shows at once, before the model has read it; the reply follows
    assert [reply_text(history) for history, *_ in outputs[:1]] == [""]
    # the box is emptied on send, then left alone (what the user types next stays: tests/test_demo_browser.py)
    assert [box for _, box, _ in outputs[:1]] == [""]
    (first,), _ = reference_turns(rwkv, [("Hello goose", 1)])
    assert reply_text(history) == first != ""

    _, (history, _, status) = chat(client, "And the lake?", seed=2)
    # the state carried the first turn: the second fed only its own tokens, as one session doing both turns
    (_, second), tokens = reference_turns(rwkv, [("Hello goose", 1), ("And the lake?", 2)])
    assert reply_text(history) == second
    assert status_tokens(status) == tokens
    assert [m["role"] for m in history] == ["user", "assistant"] * 2


def test_a_system_prompt_is_read_first_and_a_new_one_starts_over(server, client):
    rwkv = server[1].rwkv.model
    _, (history, _, status) = chat(client, "Hi", seed=3, system="You are a goose.")
    session = ChatSession(rwkv, rwkv.tokenizer, system="You are a goose.")
    text = "".join(session.reply("Hi", sampling_params(*CHAT_SETTINGS.values(), 3)))
    assert reply_text(history) == text and status_tokens(status) == session.num_tokens

    _, (history, _, status) = chat(client, "Hi", seed=3, system="")
    (text,), tokens = reference_turns(rwkv, [("Hi", 3)])
    assert len(history) == 2 and reply_text(history) == text and status_tokens(status) == tokens


def test_regenerate_replaces_the_last_turn(server, client):
    rwkv = server[1].rwkv.model
    _, (first, _, status) = chat(client, "Tell me about geese", seed=5)
    again, status_again = client.predict(*CHAT_SETTINGS.values(), 5, api_name="/regenerate")
    assert reply_text(again) == reply_text(first)
    assert len(again) == 2 and status_tokens(status_again) == status_tokens(status)
    cleared, status = client.predict(api_name="/clear")
    assert cleared == [] and status_tokens(status) == 0


def test_arena_streams_both_models_with_their_speed_and_memory(server, client):
    job = client.submit("Hello goose", 40, 1.0, 0.8, 3, api_name="/arena")
    box, rwkv_pane, gpt_pane, rwkv_stats, gpt_stats, latency, memory = job.result()
    assert reply_text(rwkv_pane) and reply_text(gpt_pane)
    assert re.search(r"first token [\d.]+ s · [\d,.]+ tokens/s · \d+ tokens · state [\d.]+ kB", rwkv_stats), rwkv_stats
    assert "KV cache" in gpt_stats, gpt_stats
    rows = [dict(zip(memory["columns"], row)) for row in memory["data"]]
    by_model = {name: [r for r in rows if r["model"] == name] for name in ("RWKV-7", "GPT (baseline)")}
    assert all(len(points) > 5 for points in by_model.values())
    # the RNN state stays the same size while the KV cache grows with every token
    assert len({r["memory_mb"] for r in by_model["RWKV-7"]}) == 1
    gpt_memory = [r["memory_mb"] for r in by_model["GPT (baseline)"]]
    assert gpt_memory == sorted(gpt_memory) and gpt_memory[-1] > gpt_memory[0]
    assert latency["data"] and all(row[2] > 0 for row in latency["data"])


def test_sweep_measures_both_models_at_each_length(server, client):
    latency, memory = client.predict(api_name="/sweep")
    points = {(row[0], row[1]): row[3] for row in memory["data"]}
    assert set(points) == {(m, n) for m in ("RWKV-7", "GPT (baseline)") for n in (8, 40)}
    assert points["RWKV-7", 8] == points["RWKV-7", 40]
    assert points["GPT (baseline)", 40] > 4 * points["GPT (baseline)", 8]
    assert len(latency["data"]) == 4


def test_a_transformers_baseline_runs_in_the_arena_and_the_sweep_and_a_size_gap_is_named(checkpoints, tmp_path):
    pytest.importorskip("transformers")
    from test_hf import save_tiny_hf

    hf_dir = save_tiny_hf(tmp_path / "tiny-llama")  # 2 layers x 64: 69k parameters, the RWKV-7 here 117k
    baseline = cli.load_model(hf_dir, None)
    name = "tiny-llama (baseline)"
    with serve(checkpoints[0], hf_dir, sweep_lengths=[8, 40]) as (url, _):
        client = Client(url, verbose=False)
        _, rwkv_pane, hf_pane, _, hf_stats, _, memory = client.predict("Hello goose", 12, 1.0, 0.8, 3, api_name="/arena")
        assert reply_text(rwkv_pane) and "KV cache" in hf_stats
        # the transformer's reply is what its own session says: its KV cache and tokenizer, through the engine
        session = ChatSession(baseline, baseline.tokenizer)
        assert reply_text(hf_pane) == "".join(session.reply("Hello goose", sampling_params(12, 1.0, 0.8, seed=3)))
        _, memory = client.predict(api_name="/sweep")
        points = {(row[0], row[1]): row[3] for row in memory["data"]}
        assert points[name, 40] > 4 * points[name, 8] and points["RWKV-7", 8] == points["RWKV-7", 40]
        page = httpx.get(url).text
        assert "0.1M parameters" in page and "x the parameters of" not in page

    from demo.app import size_warning
    assert size_warning({"a": torch.nn.Linear(100, 100), "b": torch.nn.Linear(10, 10)}) \
        .startswith("⚠️ **a has 91.8x the parameters of b**")
    assert size_warning({"a": torch.nn.Linear(10, 19), "b": torch.nn.Linear(10, 10)}) == ""


def test_eight_clients_at_once_share_batched_steps_and_each_keep_their_own_conversation(server, monkeypatch):
    url, engines = server
    rwkv, engine = engines.rwkv.model, engines.rwkv
    messages = [[f"Client {i} says hi", f"Client {i} again" + "!" * i] for i in range(8)]
    before = engine.stats()
    # the engine waits until all eight have sent their first message, so those replies surely overlap
    # (unheld, a tiny reply on an idle machine might end before the next client's message comes)
    gate, step = threading.Event(), engine.step
    monkeypatch.setattr(engine, "step", lambda: gate.wait(60) and step())

    def converse(i):
        client = Client(url, verbose=False)
        replies = []
        for message in messages[i]:
            _, (history, _, status) = chat(client, message, seed=100 + i, max_tokens=12)
            replies.append(reply_text(history))
        return replies, status_tokens(status)

    with ThreadPoolExecutor(8) as pool:
        results = pool.map(converse, range(8))
        wait_until(lambda: engine.stats()["requests"] - before["requests"] == 8)
        gate.set()
        results = list(results)
    after = engine.stats()
    steps, rows = after["decode_steps"] - before["decode_steps"], after["decode_step_rows"] - before["decode_step_rows"]
    assert after["requests"] - before["requests"] == 16 and after["active"] == 0
    assert rows / steps > 2, f"{rows} rows in {steps} steps: the replies did not share batched steps"
    monkeypatch.undo()
    for i, (replies, tokens) in enumerate(results):
        expected = reference_turns(rwkv, [(m, 100 + i) for m in messages[i]], max_tokens=12)
        assert (replies, tokens) == expected, f"client {i}"


def test_stop_closes_the_generator_and_frees_the_row(server, client, monkeypatch):
    engine = server[1].rwkv
    rwkv = engine.model
    steps = []
    step = rwkv.step
    monkeypatch.setattr(rwkv, "step", lambda *args: steps.append(1) or step(*args))
    cancelled = engine.stats()["finished"].get("cancelled", 0)
    # with this seed the tiny model talks on to 1024 tokens (seconds of work), so only Stop can end it early
    job = client.submit("Talk for a long time", "", 1024, 1.0, 1.0, 0, 0.0, 0.0, 9, api_name="/chat")
    stream = iter(job)
    next(stream), next(stream), next(stream)
    job.cancel()  # returns once the server has closed the generator
    stopped_at = len(steps)
    client.predict(api_name="/clear")  # a round trip through the queue after the stop
    assert len(steps) == stopped_at < 1000
    stats = engine.stats()
    assert stats["active"] == stats["waiting"] == 0
    assert stats["finished"].get("cancelled", 0) == cancelled + 1
    _, (history, _, _) = chat(client, "Still there?", seed=1)
    assert reply_text(history)


def test_clear_during_a_reply_leaves_nothing_of_it(client):
    # in the browser Clear cancels the reply; through the API it waits for the reply to let go of the session
    job = client.submit("Talk for a long time", "", 60, 1.0, 1.0, 0, 0.0, 0.0, 9, api_name="/chat")
    stream = iter(job)
    next(stream), next(stream)
    history, status = client.predict(api_name="/clear")
    assert history == [] and status_tokens(status) == 0
    _, (history, _, status) = chat(client, "Hello again", seed=1)
    assert len(history) == 2


def test_bad_input_becomes_a_message_and_the_app_stays_up(server, client):
    settings = list(CHAT_SETTINGS.values())
    cases = [
        (("", "", *settings, 1), "Type a message first"),
        (("x" * 100_000, "", *settings, 1), "100,000 characters"),
        (("hi", "", 5000, *settings[1:], 1), "greater than maximum"),
        (("hi", "", settings[0], 1.0, 7.0, *settings[3:], 1), "greater than maximum"),
        (("hi", "", 0, *settings[1:], 1), "less than minimum"),
        (("hi", "", *settings, -7), "less than minimum"),
        (("hi", "y" * 100_000, *settings, 1), "system prompt takes at most"),
    ]
    for args, message in cases:
        with pytest.raises(AppError, match=message):
            client.predict(*args, api_name="/chat")
    with pytest.raises(AppError, match="no reply to regenerate"):
        Client(server[0], verbose=False).predict(*settings, 1, api_name="/regenerate")
    with pytest.raises(AppError, match="Type a message first"):
        client.predict("   ", 10, 1.0, 0.8, 1, api_name="/arena")
    _, (history, _, _) = chat(client, "Fine now?", seed=1)
    assert reply_text(history)


def test_the_chat_api_needs_only_a_message_names_its_fields_and_keeps_the_console_clean(client, capfd):
    endpoint = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/chat"]
    assert [r["label"] for r in endpoint["returns"]] == ["RWKV-7", "Message", "Status"]
    required = [p["parameter_name"] for p in endpoint["parameters"] if not p["parameter_has_default"]]
    assert required == ["message"]
    defaults = {p["parameter_name"]: p["parameter_default"] for p in endpoint["parameters"]}
    assert {name: defaults[name] for name in CHAT_SETTINGS} == {name: getattr(CHAT_DEFAULTS, name) for name in CHAT_SETTINGS}
    history, _, status = client.predict("Hello", api_name="/chat")  # the box: left as the user's typing left it
    assert history[0]["content"][0]["text"] == "Hello" and status_tokens(status) > 0
    capfd.readouterr()
    for settings, message in (({"max_tokens": "abc"}, "max_tokens must be a number, got 'abc'"),
                              ({"top_p": 5}, "top_p: Value 5 is greater than maximum value 1"),
                              ({"message": ""}, "Type a message first")):
        with pytest.raises(AppError, match=message):
            client.predict(**{"message": "Hi", **settings}, api_name="/chat")
    assert "Traceback" not in capfd.readouterr().err, "a bad input is the user's message, not a server error"


def test_the_cli_and_the_demo_chat_with_the_same_defaults_and_the_cli_shows_them(capsys):
    from rwkv_lm.cli import build_parser

    args = build_parser().parse_args(["chat", "--model", "m.safetensors"])
    flags = [name for name in vars(CHAT_DEFAULTS) if name != "stop" and hasattr(args, name)]  # (no flag: logit_bias)
    assert len(flags) >= 8 and {name: getattr(args, name) for name in flags} == {name: getattr(CHAT_DEFAULTS, name) for name in flags}
    assert sampling_params(*(getattr(CHAT_DEFAULTS, name) for name in CHAT_SETTINGS)) == CHAT_DEFAULTS
    with pytest.raises(SystemExit):
        build_parser().parse_args(["chat", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"--top-p TOP_P (default: {CHAT_DEFAULTS.top_p})" in help_text
    assert f"(default: {CHAT_DEFAULTS.penalty_decay})" in help_text


def test_a_full_queue_tells_the_next_client_the_demo_is_busy(checkpoints, monkeypatch):
    with serve(*checkpoints, concurrency_limit=1, max_queue=1, sweep_lengths=[8]) as (url, engines):
        rwkv = engines.rwkv.model
        # the one worker is held inside the model until the test lets it go
        gate, forward = threading.Event(), rwkv.forward
        monkeypatch.setattr(rwkv, "forward", lambda *args, **kwargs: gate.wait(60) and forward(*args, **kwargs))
        busy, waiting, turned_away = (Client(url, verbose=False) for _ in range(3))
        running = busy.submit("Keep talking", "", *CHAT_SETTINGS.values(), 1, api_name="/chat")
        next(iter(running))  # the user's message is shown; the reply waits at the gate
        queued = waiting.submit("Me next", 8, 1.0, 0.8, 1, api_name="/arena")
        wait_until(lambda: queued.communicator.event_id is not None)  # it joined the queue
        with pytest.raises(QueueError, match="Queue is full"):
            turned_away.submit("And me", "", *CHAT_SETTINGS.values(), 1, api_name="/chat").result(timeout=30)
        gate.set()
        assert reply_text(running.result(timeout=60)[0]) and reply_text(queued.result(timeout=60)[1])


def test_the_command_says_what_is_wrong_with_its_models(checkpoints, tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "DEFAULT_RWKV", tmp_path / "rwkv7.safetensors")
    monkeypatch.setattr(cli, "DEFAULT_BASELINE", tmp_path / "gpt.safetensors")
    with pytest.raises(SystemExit, match=r"default model .*rwkv7.safetensors is missing\. Make them with the commands in train/README.md"):
        cli.main([])
    with pytest.raises(SystemExit, match="no such file"):
        cli.main(["--rwkv", str(tmp_path / "nothing.pth"), "--baseline", str(tmp_path / "nothing.pth")])
    with pytest.raises(SystemExit, match="the first model must be an RWKV-7, got a GPT"):
        cli.main(["--rwkv", str(checkpoints[1]), "--baseline", str(checkpoints[1])])


def test_an_official_pth_without_a_world_vocabulary_takes_the_tokenizer_option(checkpoints, tmp_path):
    model = rwkv_lm.load(checkpoints[0])
    pth = rwkv_lm.export_official(model, tmp_path / "rwkv7.pth")
    with pytest.raises(SystemExit, match="carries no tokenizer; pass one with --tokenizer"):
        cli.load_model(pth, None)
    (tmp_path / "tokenizer.json").write_text(model.tokenizer.spec)
    loaded = cli.load_model(pth, str(tmp_path / "tokenizer.json"))
    assert loaded.tokenizer.encode("Hello goose") == model.tokenizer.encode("Hello goose")


def test_python_m_demo_listens_where_the_gradio_environment_says(checkpoints, tmp_path):
    # 127.0.0.2 is loopback too, but only an app bound to it answers there
    port = free_port()
    env = {**os.environ, "GRADIO_SERVER_NAME": "127.0.0.2", "GRADIO_SERVER_PORT": str(port)}
    log = tmp_path / "demo.log"
    with open(log, "w") as out:
        demo = subprocess.Popen([sys.executable, "-m", "demo", "--rwkv", str(checkpoints[0]),
                                 "--baseline", str(checkpoints[1])], cwd=Path(__file__).resolve().parents[1],
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.2:{port}/"
        deadline = time.monotonic() + 120
        while True:
            assert demo.poll() is None, f"python -m demo ended:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"nothing answered at {url}:\n{log.read_text()}"
            try:
                if httpx.get(url, timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        _, (history, _, _) = chat(Client(url, verbose=False), "Hello goose", seed=1)
        assert reply_text(history)
    finally:
        demo.terminate()
        demo.wait(30)


@pytest.mark.parametrize("port", ["abc", "0", "70000"])
def test_a_bad_gradio_server_port_is_named(port, monkeypatch, capsys):
    monkeypatch.setenv("GRADIO_SERVER_PORT", port)
    with pytest.raises(SystemExit):
        cli.main(["--port", "7860"])
    assert f"GRADIO_SERVER_PORT='{port}' is not a port number" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--max-batch", "--concurrency"])
def test_a_batch_or_concurrency_below_one_is_named(flag, capsys):
    with pytest.raises(SystemExit):
        cli.main([flag, "0"])
    assert f"{flag} must be >= 1, got 0" in capsys.readouterr().err
