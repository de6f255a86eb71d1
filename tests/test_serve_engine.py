"""The serving engine: batched requests give what each gives alone, the prefix cache changes nothing but the
work, cancelled rows leave at once, long prompts do not stall the streams, and failures stay contained."""
import asyncio
import time

import pytest
import torch

from rwkv_lm import GPT, GPTConfig, RWKVConfig, SamplingParams
from rwkv_lm.serve import Engine, EngineFull, Request, StateCache
from rwkv_lm.testing import random_model


@pytest.fixture(scope="module")
def rwkv():
    cfg = RWKVConfig(vocab_size=65536, n_layer=2, n_embd=32, head_size=16, decay_lora=8, iclr_lora=8, value_lora=4, gate_lora=8)
    return random_model(cfg, seed=11)


@pytest.fixture(scope="module")
def rwkv_fast():
    """On the CPU fast path: batched decode steps in the fused C kernels (shapes they take)."""
    from rwkv_lm.runtime.cpu import optimize

    cfg = RWKVConfig(vocab_size=65536, n_layer=2, n_embd=64, head_size=16, decay_lora=16, iclr_lora=16, value_lora=16, gate_lora=16)
    return optimize(random_model(cfg, seed=13))


@pytest.fixture(scope="module")
def gpt():
    torch.manual_seed(12)
    return GPT(GPTConfig(vocab_size=65536, n_layer=2, n_embd=32, n_head=2)).reset_parameters().eval()


PROMPTS = ["The capital of France is", "A", "你好，世界", "def fibonacci(n):\n    ", "Once upon a time, in a land far away,",
           "ROMEO:", "1, 2, 3, 4,", "The quick brown fox jumps over the lazy dog. " * 6]
SETTINGS = [SamplingParams(max_tokens=12, temperature=0), SamplingParams(max_tokens=5, temperature=0),
            SamplingParams(max_tokens=20, temperature=0, presence_penalty=0.5, frequency_penalty=0.3, penalty_decay=0.9),
            SamplingParams(max_tokens=9, temperature=0, stop=("e",)),
            SamplingParams(max_tokens=16, temperature=0.9, top_p=0.8, seed=5),
            SamplingParams(max_tokens=3, temperature=0), SamplingParams(max_tokens=14, temperature=0.7, top_k=5, seed=9),
            SamplingParams(max_tokens=11, temperature=0, frequency_penalty=1.0)]


def alone(model, tokenizer, prompt, params, **kw):
    stream = Engine(model, tokenizer, max_batch=1).submit(Request(tokenizer.encode(prompt), params, **kw))
    return stream.text(), stream


@pytest.mark.parametrize("arch", ["rwkv", "rwkv-fast", "gpt"])
def test_eight_concurrent_requests_each_equal_the_request_alone(arch, rwkv, rwkv_fast, gpt, world):
    model = {"rwkv": rwkv, "rwkv-fast": rwkv_fast, "gpt": gpt}[arch]
    expected = [alone(model, world, p, s) for p, s in zip(PROMPTS, SETTINGS)]
    with Engine(model, world, max_batch=8, prefill_tokens=16) as engine:
        streams = [engine.submit(Request(world.encode(p), s)) for p, s in zip(PROMPTS, SETTINGS)]
        got = [s.text() for s in streams]
        assert engine.counters.decode_step_rows / engine.counters.decode_steps > 2, "the requests were decoded together"
    for (text, ref), stream, out in zip(expected, streams, got):
        if not stream.request.params.greedy:  # a draw may flip on the last bits of a batched product
            assert 0 < stream.completion_tokens <= stream.request.params.max_tokens
            continue
        assert out == text
        assert (stream.finish_reason, stream.completion_tokens) == (ref.finish_reason, ref.completion_tokens)
    assert {s.finish_reason for s in streams} == {"length", "stop"}


def test_requests_arriving_while_others_decode_join_the_batch(rwkv, world):
    prompts, params = PROMPTS[:4], SamplingParams(max_tokens=14, temperature=0)
    expected = [alone(rwkv, world, p, params)[0] for p in prompts]
    engine = Engine(rwkv, world, max_batch=3)  # stepped by hand: the fourth waits for a free row
    streams = [engine.submit(Request(world.encode(prompts[0]), params))]
    for prompt in prompts[1:]:
        for _ in range(4):
            engine.step()
        streams.append(engine.submit(Request(world.encode(prompt), params)))
    assert engine.stats()["waiting"] == 1 and engine.stats()["decoding"] == 3
    assert [s.text() for s in streams] == expected


def test_a_long_prompt_is_read_in_chunks_while_the_others_stream(rwkv, world):
    engine = Engine(rwkv, world, max_batch=4, prefill_tokens=16)
    talker = engine.submit(Request(world.encode("Hello"), SamplingParams(max_tokens=200, temperature=0)))
    engine.step()
    reader = engine.submit(Request(list(range(1, 301)), SamplingParams(max_tokens=1, temperature=0)))
    before = talker.completion_tokens
    while not reader.tokens:
        engine.step()
    assert talker.completion_tokens - before >= 300 // 16, "one decode step per prefill chunk"
    talker.close()


def test_cache_points_do_not_shrink_the_prefill_budget(rwkv, world):
    engine = Engine(rwkv, world, cache=StateCache(64 << 20), prefill_tokens=512)
    stream = engine.submit(Request(list(range(1, 601)), SamplingParams(max_tokens=1)))
    engine.step()
    assert engine.counters.prompt_tokens == 512, "two cache points' worth in one iteration"
    assert len(engine.cache) == 2, "the states at 256 and 512 are kept"
    stream.text()
    assert engine.counters.prompt_tokens == 600


def test_a_long_prompt_read_in_chunks_equals_one_pass(rwkv, world):
    prompt = list(range(1, 301))
    params = SamplingParams(max_tokens=8, temperature=0)
    chunked = Engine(rwkv, world, prefill_tokens=7).submit(Request(prompt, params)).text()
    whole = Engine(rwkv, world, prefill_tokens=1000).submit(Request(prompt, params)).text()
    assert chunked == whole


def test_shared_beginnings_share_only_their_state(rwkv, world):
    """Two prompts that share a beginning, then differ: the second reads only its own end, and what it says is
    what it says with no cache at all; nothing of the first leaks into it."""
    system = "System: You are a terse assistant who answers in French.\n\n" * 30  # past a cache point
    a, b = system + "User: Hi!\n\nAssistant:", system + "User: What is two plus two?\n\nAssistant:"
    params = SamplingParams(max_tokens=10, temperature=0)
    cache = StateCache(64 << 20)
    engine = Engine(rwkv, world, cache=cache)
    first = engine.submit(Request(world.encode(a), params))
    first_text = first.text()
    second = engine.submit(Request(world.encode(b), params))
    second_text = second.text()
    third = engine.submit(Request(world.encode(b.replace("two plus two", "the time")), params))
    third_text = third.text()
    assert first_text == alone(rwkv, world, a, params)[0]
    assert second_text == alone(rwkv, world, b, params)[0]
    assert third_text == alone(rwkv, world, b.replace("two plus two", "the time"), params)[0]
    shared = len(world.encode(system))
    assert first.cached_tokens == 0 and 0 < second.cached_tokens <= shared
    # the second found where the two prompts part and kept the state there: the third reads from it
    assert shared - 16 <= third.cached_tokens <= shared
    assert cache.stats()["hits"] == 2 and cache.stats()["misses"] == 1


def test_a_conversation_sent_again_reads_only_its_new_message(rwkv, world):
    from rwkv_lm.chat_template import render_prompt

    cache = StateCache(64 << 20)
    engine = Engine(rwkv, world, cache=cache)
    params = SamplingParams(max_tokens=12, temperature=0)
    prompt = world.encode(render_prompt([{"role": "user", "content": "Tell me about the sea."}]))
    first = engine.submit(Request.chat_reply(prompt, params))
    first.text()
    # the conversation as the client sends it back: the reply's tokens, then the next message
    followup = prompt + first.tokens + world.encode("\n\nUser: And the sky?\n\nAssistant:")
    second = engine.submit(Request.chat_reply(followup, params))
    second.text()
    assert second.cached_tokens == len(prompt) + len(first.tokens) - 1, "all but the reply's last token, never fed"
    again = engine.submit(Request.chat_reply(followup, params))
    assert again.text() == Engine(rwkv, world).submit(Request.chat_reply(followup, params)).text()
    assert again.cached_tokens == len(followup), "the same prompt again: the state and logits after it are cached"


def test_a_prompt_state_is_copied_into_the_cache_after_its_first_token_is_out(rwkv, world):
    """The state after a whole prompt is copied into the cache once the first token is streamed, so the copy adds
    nothing to the time to first token; a read-only request (no token drawn) still leaves it there."""
    copies = []

    class Watched(StateCache):
        def insert(self, tokens, state, logits=None, hashes=None, origin=""):
            copies.append((len(tokens), len(stream.tokens), logits is not None))
            return super().insert(tokens, state, logits, hashes, origin)

    engine = Engine(rwkv, world, cache=Watched(64 << 20))
    prompt = world.encode("The quick brown fox jumps over the lazy dog. " * 30)  # past one cache point
    stream = engine.submit(Request(prompt, SamplingParams(max_tokens=3, temperature=0)))
    stream.text()
    assert copies[:2] == [(256, 0, False), (len(prompt), 1, True)], "a cache point in the prompt, then its end"
    stream = engine.submit(Request(prompt[:300], SamplingParams(max_tokens=1), read_only=True))
    stream.text()
    assert copies[-1] == (300, 0, True) and engine.cache.lookup(prompt[:300]).logits is not None


def test_logprobs_leave_out_the_ids_the_tokenizer_cannot_spell(world):
    """A model's ids past its tokenizer's (World: 65,530 of 65,536) are never drawn, and the logprobs leave them out
    of the distribution too, even where they are the model's most likely: a caller gets only tokens it can read."""
    cfg = RWKVConfig(vocab_size=65536, n_layer=1, n_embd=32, head_size=16, decay_lora=8, iclr_lora=8, value_lora=4, gate_lora=8)
    model = random_model(cfg, seed=3)
    with torch.no_grad():  # every position's logits: the head's row sums, the unspellable rows on top
        model.ln_out.weight.zero_(), model.ln_out.bias.fill_(1.0)
        model.head.weight[world.vocab_size:] = 1.0
    logits = model.head.weight.sum(1)
    expected = logits[:world.vocab_size].log_softmax(-1)
    prompt = world.encode("Hello")
    stream = Engine(model, world).submit(Request(prompt, SamplingParams(max_tokens=2, temperature=0), logprobs=3,
                                                 prompt_logprobs=3))
    stream.text()
    for entry in [*stream.logprobs, *stream.prompt_logprobs[1:]]:
        assert [t for t, _ in entry.top] == expected.topk(3).indices.tolist()
        assert entry.logprob == pytest.approx(expected[entry.token].item(), abs=1e-5)
    assert all(t < world.vocab_size for t in stream.tokens)


def test_the_cache_keeps_to_its_budget_dropping_the_least_recently_used(rwkv, world):
    # a state, the logits after it and its key (4 bytes a token; these prompts are at most 12 tokens)
    entry_bytes = rwkv.init_state(1).nbytes + 4 * rwkv.config.vocab_size + 4 * 12
    cache = StateCache(3 * entry_bytes)
    engine = Engine(rwkv, world, cache=cache)
    params = SamplingParams(max_tokens=2, temperature=0)
    for i in range(6):
        engine.submit(Request(world.encode(f"Prompt number {i} is here"), params)).text()
        assert cache.bytes <= cache.max_bytes
    assert len(cache) >= 3 and cache.stats()["bytes"] == cache.bytes <= 3 * entry_bytes
    first = engine.submit(Request(world.encode("Prompt number 0 is here"), params))
    first.text()
    last = engine.submit(Request(world.encode("Prompt number 5 is here"), params))
    last.text()
    assert first.cached_tokens == 0 and last.cached_tokens > 0


def test_the_budget_counts_each_entry_s_token_key(rwkv):
    """A long prompt leaves an entry every 256 tokens, each keyed by its whole prefix: those keys are counted."""
    state = rwkv.init_state(1)
    cache = StateCache(64 << 20)
    for n in (256, 512, 10_000):
        cache.insert(list(range(n)), state)
    assert cache.bytes == 3 * state.nbytes + 4 * (256 + 512 + 10_000)
    assert cache.lookup(list(range(10_001))).tokens.tolist() == list(range(10_000))


def test_a_gpt_kv_cache_is_cached_too(gpt, world):
    engine = Engine(gpt, world, cache=StateCache(64 << 20))
    params = SamplingParams(max_tokens=6, temperature=0)
    prompt = "Shared beginning of a prompt. " * 4
    for end in ("One", "Two"):  # the second finds where the prompts part and keeps the cache there
        engine.submit(Request(world.encode(prompt + end), params)).text()
    third = engine.submit(Request(world.encode(prompt + "Three"), params))
    assert third.text() == alone(gpt, world, prompt + "Three", params)[0]
    assert third.cached_tokens > 0


def test_closing_a_stream_frees_its_row_within_one_iteration(rwkv, world):
    with Engine(rwkv, world, max_batch=4) as engine:
        keep = engine.submit(Request(world.encode("Stay"), SamplingParams(max_tokens=40, temperature=0)))
        gone = engine.submit(Request(world.encode("Leave"), SamplingParams(max_tokens=10_000, temperature=0),
                                     end_tokens=()))
        next(iter(gone))
        steps = engine.counters.decode_steps
        gone.close()
        # the step under way when it was closed, and the next one, which drops it first
        assert gone.finish_reason == "cancelled" and gone.completion_tokens <= steps + 3
        assert engine.stats()["decoding"] <= 1
        assert keep.text() == alone(rwkv, world, "Stay", keep.request.params)[0]
        deadline = time.monotonic() + 5
        while engine.stats()["active"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.stats()["active"] == 0


def test_async_streams(rwkv, world):
    params = SamplingParams(max_tokens=10, temperature=0)

    async def both(engine):
        async def read(prompt):
            return "".join([piece async for piece in engine.submit(Request(world.encode(prompt), params))])
        return await asyncio.gather(read("Hello"), read("World"))

    with Engine(rwkv, world) as engine:
        assert asyncio.run(both(engine)) == [alone(rwkv, world, p, params)[0] for p in ("Hello", "World")]


def test_a_full_queue_refuses_and_bad_prompts_are_clear(rwkv, world):
    engine = Engine(rwkv, world, max_batch=1, max_queue=1)
    for _ in range(2):  # one for the row, one waiting
        engine.submit(Request([1, 2], SamplingParams(max_tokens=2)))
    with pytest.raises(EngineFull, match="waiting"):
        engine.submit(Request([1, 2], SamplingParams(max_tokens=2)))
    no_queue = Engine(rwkv, world, max_batch=1, max_queue=0)  # 0: a request only while a row is free
    no_queue.submit(Request([1, 2], SamplingParams(max_tokens=2)))
    with pytest.raises(EngineFull, match="every row is taken"):
        no_queue.submit(Request([1, 2], SamplingParams(max_tokens=2)))
    with pytest.raises(ValueError, match="no tokens"):
        engine.submit(Request([], SamplingParams()))
    with pytest.raises(ValueError, match=r"lie in \[0, 65536\)"):
        engine.submit(Request([70_000], SamplingParams()))


def test_a_failing_model_ends_its_requests_and_the_engine_goes_on(rwkv, world, monkeypatch):
    engine = Engine(rwkv, world)
    step = type(rwkv).step
    monkeypatch.setattr(type(rwkv), "step", lambda self, *a: (_ for _ in ()).throw(RuntimeError("boom")))
    broken = engine.submit(Request([1, 2, 3], SamplingParams(max_tokens=5)))
    with pytest.raises(RuntimeError, match="boom"):
        broken.text()
    assert broken.finish_reason == "error"
    monkeypatch.setattr(type(rwkv), "step", step)
    assert engine.submit(Request([1, 2, 3], SamplingParams(max_tokens=5, temperature=0))).text() == \
        alone(rwkv, world, world.decode([1, 2, 3]), SamplingParams(max_tokens=5, temperature=0))[0]


def test_a_prompt_the_model_refuses_fails_alone(rwkv, world, monkeypatch):
    """A prompt the model cannot read ends only its own request; the prompts admitted with it read on and equal
    their requests alone."""
    params = SamplingParams(max_tokens=6, temperature=0)
    prompts = [world.encode(p) for p in ("The capital of France is", "Once upon a time", "ROMEO: what light")]
    poison = 4242
    expected = [alone(rwkv, world, world.decode(p), params)[0] for p in prompts]
    forward = rwkv.forward

    def refusing(ids, state=None, **kw):
        if (ids == poison).any():
            raise ValueError("this prompt cannot be read")
        return forward(ids, state, **kw)

    monkeypatch.setattr(rwkv, "forward", refusing)
    engine = Engine(rwkv, world, max_batch=8)
    streams = [engine.submit(Request(p, params)) for p in prompts]
    bad = engine.submit(Request(prompts[0][:2] + [poison] + prompts[0][2:], params))
    assert [s.text() for s in streams] == expected
    with pytest.raises(ValueError, match="cannot be read"):
        bad.text()
    assert bad.finish_reason == "error"
    assert all(s.finish_reason == "length" for s in streams)


def test_ids_the_tokenizer_cannot_spell_are_never_drawn(world):
    """A World model has 65,536 outputs, the World vocabulary 65,530 tokens: a model whose head favours the six
    others still gives text (drawing one ended the request with an error before)."""
    cfg = RWKVConfig(vocab_size=65536, n_layer=1, n_embd=32, head_size=16, decay_lora=8, iclr_lora=8, value_lora=4, gate_lora=8)
    model = random_model(cfg, seed=3)
    with torch.no_grad():
        model.head.weight[world.vocab_size:] *= 1000  # the unspellable ids dominate every step
    stream = Engine(model, world).submit(Request(world.encode("Hi"), SamplingParams(max_tokens=8, temperature=1, seed=0)))
    stream.text()
    assert stream.finish_reason == "length" and all(t < world.vocab_size for t in stream.tokens)


def test_the_cache_trims_the_heap_after_every_trim_every_bytes_it_drops(rwkv, monkeypatch):
    """Dropped states are handed back to the OS in batches (glibc keeps freed memory otherwise: bench/soak_serve.py)."""
    from rwkv_lm.serve import memory

    trims = []
    monkeypatch.setattr(memory.FreedMemory, "_trim", staticmethod(lambda pad: trims.append(pad)))
    monkeypatch.setattr(memory, "TRIM_EVERY", 3 * rwkv.init_state(1).nbytes)
    state = rwkv.init_state(1)
    cache = StateCache(state.nbytes + 4 * 10)  # room for one entry: each insert drops the one before
    for n in range(1, 8):
        cache.insert(list(range(n)), state)
    assert len(trims) == 2  # 6 entries dropped, a trim after every 3
