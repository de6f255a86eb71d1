"""What agents and evaluation harnesses send, through the official `openai` client, streamed and not:
response_format (50 sampled answers, all valid against the schema), tool calls (a round trip; streamed as OpenAI
streams them, equal to the whole reply), logprobs and echo (equal to log_softmax of the model's logits), n choices
from one prompt read, best_of (ranked by logprob per token computed directly), logit_bias, stop_token_ids, prompts as token
ids and several prompts, tuned states (a chat session says what the server says), README's examples."""
import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jsonschema
import openai
import pytest
import torch
from test_serve_http import Server

from rwkv_lm import ChatSession, RWKVConfig, SamplingParams, prepare
from rwkv_lm.serve import Engine, Request
from rwkv_lm.testing import random_model

REPO = Path(__file__).resolve().parents[1]

SCHEMA = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 12}, "days": {"type": "integer", "minimum": 1, "maximum": 30},
    "units": {"enum": ["metric", "imperial"]}, "alerts": {"type": "boolean"}},
    "required": ["city", "days", "units", "alerts"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                            "parameters": SCHEMA}}


@pytest.fixture(scope="module")
def model():
    """Prepared as `rwkv-lm serve` prepares what it loads: the batch-invariant kernels, so n choices decoded side by
    side get the bits each gets alone (model.py's torch ops round a batch's rows differently, which flips a sample
    now and then)."""
    cfg = RWKVConfig(vocab_size=65536, n_layer=2, n_embd=32, head_size=16, decay_lora=8, iclr_lora=8, value_lora=4, gate_lora=8)
    return prepare(random_model(cfg, seed=23))


@pytest.fixture(scope="module")
def calm(model):
    generator = torch.Generator().manual_seed(8)
    return model.init_state(1).map(lambda t: torch.randn(t.shape, generator=generator, dtype=t.dtype) * 3)


@pytest.fixture(scope="module")
def client(model, world, calm):
    server = Server(Engine(model, world, max_batch=16, cache=64 << 20), model_name="tiny", states={"calm": calm})
    yield openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    server.stop()


def chat(client, **kw):
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Plan a trip."}], **kw)


def joined_stream(chunks):
    """Streamed chat chunks -> {choice index: (content, tool calls as dicts, finish reason, logprob entries)}."""
    out = {}
    for chunk in chunks:
        for c in chunk.choices:
            text, calls, reason, logprobs = out.get(c.index, ("", {}, None, []))
            text += c.delta.content or ""
            for call in c.delta.tool_calls or ():
                entry = calls.setdefault(call.index, {"id": None, "name": "", "arguments": ""})
                entry["id"] = call.id or entry["id"]
                entry["name"] += (call.function.name or "") if call.function else ""
                entry["arguments"] += (call.function.arguments or "") if call.function else ""
            logprobs += (c.logprobs.content or []) if c.logprobs else []
            out[c.index] = (text, calls, c.finish_reason or reason, logprobs)
    return out


def test_json_schema_answers_all_validate(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "trip", "schema": SCHEMA, "strict": True}}
    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda seed: chat(client, response_format=fmt, temperature=1.0, seed=seed,
                                                  max_tokens=120), range(50)))
    for reply in replies:
        assert reply.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(reply.choices[0].message.content), SCHEMA)
    streamed = joined_stream(chat(client, response_format=fmt, temperature=1.0, seed=7, max_tokens=120, stream=True))
    jsonschema.validate(json.loads(streamed[0][0]), SCHEMA)


def test_json_object_on_completions(client, world):
    # a random model never closes a string by chance: a bias towards the closing tokens, which only the grammar
    # decides where they may go
    closers = {str(world.encode(t)[0]): 8 for t in ('"', "}", '"}', ":", "1")}
    for stream in (False, True):
        reply = client.completions.create(model="tiny", prompt="JSON:", max_tokens=200, temperature=0.7, seed=3,
                                          logit_bias=closers, stream=stream,
                                          extra_body={"response_format": {"type": "json_object"}})
        text = "".join(c.choices[0].text for c in reply) if stream else reply.choices[0].text
        assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize("stream", [False, True])
def test_tool_call_round_trip(client, stream):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    reply = chat(client, tools=[WEATHER], tool_choice="required", temperature=1.0, seed=4, max_tokens=150, stream=stream)
    if stream:
        _, calls, reason, _ = joined_stream(reply)[0]
        call = calls[0]
        call_id, name, arguments = call["id"], call["name"], call["arguments"]
    else:
        reason, message = reply.choices[0].finish_reason, reply.choices[0].message
        assert message.content is None
        call_id, name, arguments = message.tool_calls[0].id, message.tool_calls[0].function.name, message.tool_calls[0].function.arguments
    assert reason == "tool_calls" and name == "get_weather" and call_id.startswith("call_")
    jsonschema.validate(json.loads(arguments), SCHEMA)
    messages += [{"role": "assistant", "content": None, "tool_calls": [
                     {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}]},
                 {"role": "tool", "tool_call_id": call_id, "content": "18 C, sunny"}]
    final = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER], tool_choice="none",
                                           max_tokens=8, temperature=0)
    assert final.choices[0].finish_reason in ("stop", "length") and final.choices[0].message.content


def streamed_reply(chunks):
    """A streamed chat reply -> (content, [(id, name, arguments)], finish reason, what came in order), checking
    OpenAI's shape: a call's first delta has its index, id, type, name and arguments "", the later ones only
    the index and the next piece of the arguments."""
    content, calls, reason, order = "", [], None, []
    for chunk in chunks:
        for c in chunk.choices:
            if c.delta.content:
                content += c.delta.content
                order.append("content")
            for call in c.delta.tool_calls or ():
                if call.id is not None:
                    assert (call.index, call.type, call.function.arguments) == (len(calls), "function", "")
                    calls.append([call.id, call.function.name, ""])
                    order.append("call")
                else:
                    assert call.index == len(calls) - 1 and call.type is None and call.function.name is None
                    calls[-1][2] += call.function.arguments
                    order.append("arguments")
            reason = c.finish_reason or reason
    return content, [tuple(c) for c in calls], reason, order


def whole_reply(reply):
    message = reply.choices[0].message
    calls = [(c.id, c.function.name, c.function.arguments) for c in message.tool_calls or ()]
    return message.content or "", calls, reply.choices[0].finish_reason


def assert_streamed_as_whole(streamed, whole):
    """The same reply (content, names and arguments, finish reason), each argument piece in a chunk of its own."""
    content, calls, reason, order = streamed
    assert (content, [c[1:] for c in calls], reason) == (whole[0], [c[1:] for c in whole[1]], whole[2])
    pieces = [after.count("arguments") for after in " ".join(order).split("call")[1:]]
    assert all(n >= 2 for n, call in zip(pieces, calls) if len(call[2]) > 8), order  # given out as written


@pytest.mark.parametrize("choice", ["required", "named"])
def test_tool_calls_stream_as_they_are_written(client, choice):
    other = {"type": "function", "function": {"name": "noop", "parameters": {"type": "object", "properties": {},
                                                                         "additionalProperties": False}}}
    kw = dict(tools=[other, WEATHER], temperature=1.0, max_tokens=300,
              tool_choice="required" if choice == "required" else {"type": "function", "function": {"name": "get_weather"}},
              parallel_tool_calls=choice == "required")
    most = 0
    for seed in range(6):
        whole = whole_reply(chat(client, seed=seed, **kw))
        streamed = streamed_reply(chat(client, seed=seed, stream=True, **kw))
        assert_streamed_as_whole(streamed, whole)
        assert whole[0] == "" and whole[2] == "tool_calls"
        for _, name, arguments in whole[1]:
            jsonschema.validate(json.loads(arguments), SCHEMA if name == "get_weather" else {"type": "object"})
        most = max(most, len(whole[1]))
        if choice == "named":
            assert [c[1] for c in whole[1]] == ["get_weather"]
    if choice == "required":
        assert most >= 2, "some seed gives parallel calls"


def scripted_step(model, script):
    """A decode step that, once a row has drawn script[0], makes each next token of `script` the only choice:
    the reply a model trained on tool calls would write, made by the server's own path."""
    at = None

    def step(tokens, state):
        nonlocal at
        logits, state = model.step(tokens, state)
        token = tokens[0].item()
        at = at + 1 if at is not None and at + 1 < len(script) and script[at + 1] == token else (0 if token == script[0] else None)
        if at is not None and at + 1 < len(script):
            logits = torch.full_like(logits, -1e4)
            logits[:, script[at + 1]] = 0
        return logits, state
    return step


def test_auto_tool_calls_after_text_stream_as_they_are_written(model, world):
    arguments = [{"city": "Paris", "days": 3, "units": "metric", "alerts": False},
                 {"city": "Oslo", "days": 1, "units": "imperial", "alerts": True}]
    text = "Let me look.\n" + "\n".join(f'<tool_call>{json.dumps({"name": "get_weather", "arguments": a})}</tool_call>'
                                         for a in arguments)
    script = world.encode(text + "\n\n")
    server = Server(Engine(model, world, max_batch=1, step=scripted_step(model, script)), model_name="tiny")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        kw = dict(tools=[WEATHER], tool_choice="auto", max_tokens=200, temperature=0, logit_bias={str(script[0]): 100})
        whole = whole_reply(chat(client, **kw))
        streamed = streamed_reply(chat(client, stream=True, **kw))
    finally:
        server.stop()
    assert whole[0] == "Let me look." and whole[2] == "tool_calls"
    assert [json.loads(c[2]) for c in whole[1]] == arguments
    assert_streamed_as_whole(streamed, whole)
    assert streamed[3][0] == "content" and streamed[3].count("call") == 2  # the text came before the first call


def test_named_tool_choice_calls_that_function(client):
    other = {"type": "function", "function": {"name": "noop", "parameters": {"type": "object", "properties": {}}}}
    reply = chat(client, tools=[other, WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}},
                 parallel_tool_calls=False, temperature=1.0, seed=9, max_tokens=150)
    calls = reply.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["get_weather"]


def test_echo_logprobs_equal_log_softmax(client, model, world):
    text = "The quick brown fox jumps over the lazy dog"
    prompt = world.encode(text)
    with torch.no_grad():
        expected = model(torch.tensor([prompt]))[0][0, :, :world.vocab_size].float().log_softmax(-1)
    for as_ids in (False, True):
        reply = client.completions.create(model="tiny", prompt=prompt if as_ids else text, max_tokens=0, echo=True,
                                          logprobs=2, temperature=0)
        lp = reply.choices[0].logprobs
        assert reply.choices[0].text == text and lp.tokens[0] == world.decode(prompt[:1])
        assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(prompt)
        for i in range(1, len(prompt)):
            assert abs(lp.token_logprobs[i] - expected[i - 1, prompt[i]].item()) < 1e-4
            assert max(lp.top_logprobs[i].values()) == pytest.approx(expected[i - 1].max().item(), abs=1e-4)
        assert lp.text_offset == [len(world.decode(prompt[:i])) for i in range(len(prompt))]
        assert reply.usage.completion_tokens == 0


def test_logprobs_streamed_equal_whole(client):
    whole = client.completions.create(model="tiny", prompt="Hello", max_tokens=8, logprobs=3, temperature=0)
    chunks = list(client.completions.create(model="tiny", prompt="Hello", max_tokens=8, logprobs=3, temperature=0, stream=True))
    streamed = [lp for c in chunks if c.choices and c.choices[0].logprobs for lp in c.choices[0].logprobs.token_logprobs]
    assert streamed == pytest.approx(whole.choices[0].logprobs.token_logprobs)
    reply = chat(client, logprobs=True, top_logprobs=2, max_tokens=6, temperature=0)
    streamed = joined_stream(chat(client, logprobs=True, top_logprobs=2, max_tokens=6, temperature=0, stream=True))[0][3]
    content = reply.choices[0].logprobs.content
    assert [e.token for e in content] == [e.token for e in streamed] and len(content[0].top_logprobs) == 2
    assert all(e.logprob <= 0 and bytes(e.bytes).decode("utf-8", "replace") for e in content)


@pytest.mark.parametrize("stream", [False, True])
def test_n_choices_read_the_prompt_once(client, stream):
    kw = dict(max_tokens=6, temperature=1.0, seed=100)
    reply = chat(client, n=3, stream=stream, stream_options={"include_usage": True} if stream else None, **kw)
    if stream:
        chunks = list(reply)
        texts = [t for _, (t, _, _, _) in sorted(joined_stream(chunks).items())]
        usage = chunks[-1].usage
    else:
        texts, usage = [c.message.content for c in reply.choices], reply.usage
    alone = [chat(client, **{**kw, "seed": 100 + i}).choices[0].message.content for i in range(3)]
    assert texts == alone
    assert usage.prompt_tokens == chat(client, max_tokens=1).usage.prompt_tokens
    assert usage.completion_tokens == 18


def test_best_of_returns_the_rows_with_the_highest_logprob_per_token(client, model, world):
    prompt, kw = "Once upon", dict(max_tokens=6, temperature=1.0, seed=40)
    reply = client.completions.create(model="tiny", prompt=[prompt, "Two"], n=2, best_of=4, **kw)
    # the four rows of the first prompt, as the engine draws them (row i with seed + i), scored directly
    tokens = world.encode(prompt)
    rows = [Engine(model, world).submit(Request(tokens, SamplingParams(**{**kw, "seed": 40 + i}))) for i in range(4)]
    texts = [row.text() for row in rows]
    scores = []
    with torch.no_grad():
        for row in rows:
            drawn = row.tokens
            logits = model(torch.tensor([tokens + drawn]))[0][0, len(tokens) - 1:-1, :world.vocab_size].float().log_softmax(-1)
            scores.append(logits[torch.arange(len(drawn)), drawn].mean().item())
    best = sorted(range(4), key=lambda i: -scores[i])[:2]
    assert len(set(texts)) == 4 and [c.text for c in reply.choices[:2]] == [texts[i] for i in best]
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    alone = client.completions.create(model="tiny", prompt="Two", n=4, **kw)
    assert reply.usage.completion_tokens == sum(len(row.tokens) for row in rows) + alone.usage.completion_tokens
    assert reply.usage.prompt_tokens == len(tokens) + alone.usage.prompt_tokens
    with_logprobs = client.completions.create(model="tiny", prompt=prompt, n=1, best_of=4, logprobs=1, **kw)
    assert with_logprobs.choices[0].text == texts[best[0]]
    chosen = with_logprobs.choices[0].logprobs.token_logprobs
    assert sum(chosen) / len(chosen) == pytest.approx(scores[best[0]], abs=1e-4)
    for bad in (dict(n=3, best_of=2), dict(best_of=2, stream=True)):
        with pytest.raises(openai.BadRequestError, match="best_of") as e:
            client.completions.create(model="tiny", prompt=prompt, max_tokens=2, **bad)
        assert e.value.body["param"] == "best_of"


def test_logit_bias_stop_token_ids_and_several_prompts(client, world):
    forced = world.encode(" yes")[0]
    reply = client.completions.create(model="tiny", prompt="Say", max_tokens=3, logit_bias={str(forced): 100})
    assert reply.choices[0].text == " yes" * 3
    stopped = client.completions.create(model="tiny", prompt="Say", max_tokens=3, logit_bias={str(forced): 100},
                                        extra_body={"stop_token_ids": [forced]})
    assert stopped.choices[0].text == "" and stopped.choices[0].finish_reason == "stop"
    several = client.completions.create(model="tiny", prompt=[world.encode(p) for p in ("One", "Two", "Three")], max_tokens=4,
                                        temperature=0, n=2)
    assert [c.index for c in several.choices] == list(range(6))
    single = client.completions.create(model="tiny", prompt="Two", max_tokens=4, temperature=0)
    assert several.choices[2].text == several.choices[3].text == single.choices[0].text


def test_a_tuned_state_by_model_name(client, model, world, calm):
    assert [m.id for m in client.models.list().data] == ["tiny", "tiny:calm"]
    prompt = "Tell me"
    expected = Engine(model, world).submit(Request(world.encode(prompt), SamplingParams(max_tokens=8, seed=2),
                                                   state=calm)).text()
    for _ in range(2):  # the second from the prefix cache, under the state's own key
        reply = client.completions.create(model="tiny:calm", prompt=prompt, max_tokens=8, seed=2)
        assert reply.choices[0].text == expected
    plain = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, seed=2)
    assert plain.choices[0].text != expected
    with pytest.raises(openai.NotFoundError, match="no state .wild."):
        client.completions.create(model="tiny:wild", prompt=prompt, max_tokens=2)


def test_a_chat_session_from_a_tuned_state_says_what_the_server_says(client, model, world, calm):
    system, message = "Be brief.", "Hi"
    messages = [{"role": "system", "content": system}, {"role": "user", "content": message}]
    for temperature in (0.0, 1.0):  # greedy, and sampled (this random model's state sways its logits only slightly)
        says = []
        for state, name in ((calm, "tiny:calm"), (None, "tiny")):
            served = client.chat.completions.create(model=name, messages=messages, max_tokens=10, temperature=temperature,
                                                    seed=1)
            session = ChatSession(model, world, system=system, state=state)
            says.append("".join(session.reply(message, SamplingParams(max_tokens=10, temperature=temperature, seed=1))))
            assert says[-1] == served.choices[0].message.content
    assert says[0] != says[1]


def test_the_readme_examples_run(model, world, calm):
    """README's openai-client examples, as written, against a server named as they name it."""
    block = re.search(r"```python\n(client = openai\.OpenAI.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    closers = [world.encode(t)[0] for t in ('"', "}", '"}', '",', "1")]

    def closing_step(tokens, state):  # a random model never ends a JSON string by itself: help it a little
        logits, state = model.step(tokens, state)
        logits[:, closers] += 8
        return logits, state

    server = Server(Engine(model, world, max_batch=16, step=closing_step), model_name="rwkv", states={"calm": calm})
    try:
        real = openai.OpenAI
        shim = type("openai", (), {"OpenAI": lambda **kw: real(**{**kw, "base_url": server.url + "/v1", "max_retries": 0})})
        namespace = {"openai": shim}
        exec(compile(block, "README.md", "exec"), namespace)
    finally:
        server.stop()
    assert namespace["arguments"] and all(isinstance(json.loads(a), dict) for a in namespace["arguments"].values())
