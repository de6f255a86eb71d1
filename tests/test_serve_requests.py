"""What agents and evaluation harnesses ask of the engine: output held to a grammar in a batch with free rows,
logprobs equal to log_softmax of the model's own logits (drawn tokens and the prompt's), n continuations from
one prompt read, logit_bias and a prompt read without drawing."""
import json

import jsonschema
import pytest
import torch

from rwkv_lm import RWKVConfig, SamplingParams
from rwkv_lm.serve import Engine, Request
from rwkv_lm.serve.grammar import Grammar
from rwkv_lm.testing import random_model

SCHEMA = {"type": "object", "properties": {"mood": {"enum": ["happy", "sad"]}, "n": {"type": "integer", "maximum": 99},
                                           "ok": {"type": "boolean"}},
          "required": ["mood", "n", "ok"], "additionalProperties": False}


@pytest.fixture(scope="module")
def model():
    cfg = RWKVConfig(vocab_size=65536, n_layer=2, n_embd=32, head_size=16, decay_lora=8, iclr_lora=8, value_lora=4, gate_lora=8)
    return random_model(cfg, seed=31)


def test_constrained_rows_validate_beside_free_rows(model, world):
    prompt = world.encode("Answer in JSON:")
    with Engine(model, world, max_batch=8) as engine:
        constrained = [engine.submit(Request(prompt, SamplingParams(max_tokens=60, temperature=1.0, seed=i),
                                             grammar=Grammar.json_schema(SCHEMA))) for i in range(6)]
        free = [engine.submit(Request(prompt, SamplingParams(max_tokens=20, temperature=1.0, seed=i))) for i in range(2)]
        texts = [s.text() for s in constrained]
        for s in free:
            s.text()
    for stream, text in zip(constrained, texts):
        assert stream.finish_reason == "stop", text
        jsonschema.validate(json.loads(text), SCHEMA)
    assert all(s.completion_tokens == 20 for s in free), "free rows are not held to the grammar"


def test_logprobs_equal_log_softmax_of_the_model(model, world):
    prompt = world.encode("The capital of France is")
    stream = Engine(model, world).submit(Request(prompt, SamplingParams(max_tokens=6, temperature=0.8, seed=3),
                                                 logprobs=3, prompt_logprobs=2))
    stream.text()
    with torch.no_grad():
        logits, _ = model(torch.tensor([prompt + stream.tokens]))
    expected = logits[0, :, :world.vocab_size].float().log_softmax(-1)  # (the ids World spells)
    everything = [*stream.prompt_logprobs, *stream.logprobs]
    assert everything[0] is None and len(everything) == len(prompt) + len(stream.tokens)
    for position, chance in enumerate(everything[1:], start=1):
        row = expected[position - 1]
        assert chance.token == (prompt + stream.tokens)[position]
        assert abs(chance.logprob - row[chance.token].item()) < 1e-4
        top = row.topk(len(chance.top))
        assert [t for t, _ in chance.top] == top.indices.tolist()
        assert max(abs(lp - v) for (_, lp), v in zip(chance.top, top.values.tolist())) < 1e-4
    assert [len(c.top) for c in stream.logprobs] == [3] * 6


def test_prompt_logprobs_across_prefill_chunks_and_read_only(model, world):
    prompt = world.encode("One two three four five six seven eight nine ten eleven twelve.")
    whole = Engine(model, world).submit(Request(prompt, SamplingParams(max_tokens=1), prompt_logprobs=0, read_only=True))
    chunked = Engine(model, world, prefill_tokens=5).submit(Request(prompt, SamplingParams(max_tokens=1),
                                                                    prompt_logprobs=0, read_only=True))
    assert whole.text() == "" and chunked.text() == ""
    assert whole.finish_reason == "length" and whole.completion_tokens == 0
    assert len(whole.prompt_logprobs) == len(prompt)
    for a, b in zip(whole.prompt_logprobs[1:], chunked.prompt_logprobs[1:]):
        assert a.token == b.token and abs(a.logprob - b.logprob) < 1e-4


def test_n_forks_one_prompt_read_and_equal_separate_seeded_requests(model, world):
    prompt = world.encode("Once upon a time, " * 20)
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=40)
    with Engine(model, world, max_batch=8) as engine:
        forks = engine.submit_n(Request(prompt, params), 4)
        texts = [s.text() for s in forks]
        assert engine.counters.prompt_tokens == len(prompt), "the prompt was read once"
    separate = [Engine(model, world).submit(Request(prompt, params.replace(seed=40 + i))).text() for i in range(4)]
    assert texts == separate
    assert len(set(texts)) > 1


def test_logit_bias_forces_and_forbids(model, world):
    prompt = world.encode("Hello")
    forced = world.encode(" yes")[0]
    stream = Engine(model, world).submit(Request(prompt, SamplingParams(max_tokens=4, temperature=1.0, seed=1,
                                                                        logit_bias={forced: 100})))
    stream.text()
    assert stream.tokens == [forced] * 4
    greedy = Engine(model, world).submit(Request(prompt, SamplingParams(max_tokens=1, temperature=0)))
    greedy.text()
    banned = Engine(model, world).submit(Request(prompt, SamplingParams(max_tokens=1, temperature=0,
                                                                        logit_bias={greedy.tokens[0]: -100})))
    banned.text()
    assert banned.tokens != greedy.tokens
    with pytest.raises(ValueError, match="logit_bias"):
        Engine(model, world).submit(Request(prompt, SamplingParams(logit_bias={70000: 1})))


def tuned_state(model, seed):
    generator = torch.Generator().manual_seed(seed)
    return model.init_state(1).map(lambda t: torch.randn(t.shape, generator=generator, dtype=t.dtype) * 3)


def test_prefix_cache_keeps_starting_states_apart(model, world):
    prompt = world.encode("Two starting states.")
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=5)  # a random model's argmax hardly feels its state
    calm, wild = tuned_state(model, 1), tuned_state(model, 2)
    alone = {name: Engine(model, world).submit(Request(prompt, params, state=state)).text()
             for name, state in (("calm", calm), ("wild", wild))}
    alone["zeros"] = Engine(model, world).submit(Request(prompt, params)).text()
    assert len(set(alone.values())) == 3
    engine = Engine(model, world, cache=64 << 20)
    for _ in range(2):  # the second round reads from the cache
        got = {"calm": engine.submit(Request(prompt, params, state=calm, state_key="calm")).text(),
               "zeros": engine.submit(Request(prompt, params)).text(),
               "wild": engine.submit(Request(prompt, params, state=wild, state_key="wild")).text()}
        assert got == alone
    assert engine.counters.cached_prompt_tokens >= 3 * len(prompt), "each starting state's prompt came from the cache"


def test_generate_and_chat_session_take_a_grammar(model, world):
    from rwkv_lm import ChatSession, generate

    text = generate(model, world, "JSON:", SamplingParams(max_tokens=80, seed=3), grammar=Grammar.json_schema(SCHEMA)).text()
    jsonschema.validate(json.loads(text), SCHEMA)
    session = ChatSession(model, world)
    reply = "".join(session.reply("Mood?", SamplingParams(max_tokens=80, seed=4), grammar=Grammar.json_schema(SCHEMA)))
    jsonschema.validate(json.loads(reply), SCHEMA)
    assert "".join(session.reply("Again?", max_tokens=3))  # the conversation goes on after a constrained reply
