"""Streaming generation: greedy text equals a plain argmax loop, chunked prefill, whole characters only,
stop strings, early exit, batches, and clear errors."""
import pytest
import torch

import rwkv_lm
from rwkv_lm import RWKVConfig, SamplingParams, complete, generate, generate_batch
from rwkv_lm.serve import PREFILL_TOKENS, prefill
from rwkv_lm.serve import TextStream
from rwkv_lm.testing import random_model

from conftest import assert_close


@pytest.fixture(scope="module")
def world_model():
    cfg = RWKVConfig(vocab_size=65536, n_layer=2, n_embd=32, head_size=16, decay_lora=8, iclr_lora=8, value_lora=4, gate_lora=8)
    return random_model(cfg, seed=3)


def argmax_loop(model, tokens, n):
    with torch.no_grad():
        logits, state = model(torch.tensor([tokens]))
        logits, out = logits[:, -1], []
        for _ in range(n):
            out.append(int(logits.argmax(-1)))
            logits, state = model.step(torch.tensor(out[-1:]), state)
    return out


def test_greedy_equals_argmax_loop(world_model, world):
    prompt = "The capital of France is"
    expected = argmax_loop(world_model, world.encode(prompt), 24)
    pieces = list(generate(world_model, world, prompt, max_tokens=24, temperature=0))
    assert "".join(pieces) == world.decode(expected)
    assert len(pieces) > 1, "text arrives in pieces, not at the end"


def test_chunked_prefill_equals_one_pass(tiny_model):
    tokens = torch.randint(0, 101, (77,), generator=torch.Generator().manual_seed(0)).tolist()
    whole, whole_state = prefill(tiny_model, tokens, chunk_len=1000)
    chunked, chunked_state = prefill(tiny_model, tokens, chunk_len=16)
    assert_close(chunked, whole, 1e-5, "logits")
    assert_close(chunked_state.layers[-1].wkv, whole_state.layers[-1].wkv, 1e-5, "state")


def test_long_prompt_bounded_state_and_chunks(tiny_config, monkeypatch):
    cfg = RWKVConfig(**{**tiny_config.__dict__, "n_layer": 1})
    model = random_model(cfg)
    widest = []
    forward = type(model).forward

    def spy(self, tokens, state=None, **kw):
        widest.append(tokens.shape[1])
        return forward(self, tokens, state, **kw)

    monkeypatch.setattr(type(model), "forward", spy)
    short = prefill(model, list(range(1, 11)))[1]
    long = prefill(model, [1 + i % 100 for i in range(100_000)])[1]
    assert short.nbytes == long.nbytes
    assert max(widest) == PREFILL_TOKENS, "the model never sees more than one chunk at a time"


def test_hundred_thousand_character_prompt(world_model, world):
    prompt = "".join(f"line {i}: the quick brown fox.\n" for i in range(3500))[:100_000]
    assert len(prompt) == 100_000
    text = complete(world_model, world, prompt, max_tokens=3, temperature=0)
    assert isinstance(text, str)


def test_never_half_a_character(world):
    stream = TextStream(world)
    ch = "你".encode("utf-8")
    assert [stream.push(b + 1) for b in ch] == ["", "", "你"]  # ids 1..256 are the single bytes
    stream.push(ch[0] + 1)
    assert stream.finish() == "\ufffd", "a character cut off at the end shows as one replacement mark"


def test_stop_strings_are_held_back_and_cut(world):
    stream = TextStream(world, stop=("END", "\n\n"))
    out = [stream.push(t) for t in world.encode("abc E")]
    assert "".join(out) == "abc ", "'E' may start 'END', so it waits"
    out = [stream.push(t) for t in world.encode("NDING more")]
    assert "".join(out) == "" and stream.stop_hit == "END"
    stream = TextStream(world, stop=("END",))
    assert "".join(stream.push(t) for t in world.encode("abc E")) + stream.finish() == "abc E"


def test_generate_stops_at_stop_string(world_model, world):
    full = complete(world_model, world, "Once upon a time", max_tokens=30, temperature=0)
    stop = full[5:9]
    cut = complete(world_model, world, "Once upon a time", max_tokens=30, temperature=0, stop=[stop])
    assert cut == full[:full.index(stop)]


def test_breaking_out_stops_at_once(world_model, world, monkeypatch):
    steps = []
    step = type(world_model).step
    monkeypatch.setattr(type(world_model), "step", lambda self, *a: steps.append(1) or step(self, *a))
    stream = generate(world_model, world, "Hi", max_tokens=100, temperature=0)
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()
    assert len(steps) <= 3 * 4, "a piece needs at most a few tokens; no work after the break"


def test_token_zero_ends_the_text(world_model, world):
    model = random_model(world_model.config, seed=3)
    with torch.no_grad():  # logits = ln_out.bias @ head^T for every input: token 0 always wins
        model.ln_out.weight.zero_()
        model.head.weight[0] = model.ln_out.bias * 100
    assert complete(model, world, "Hello", max_tokens=10, temperature=0) == ""


def test_callback_sees_every_piece(world_model, world):
    seen = []
    text = complete(world_model, world, "Hi", max_tokens=12, temperature=0.8, seed=1, callback=seen.append)
    assert "".join(seen) == text and len(seen) > 1
    assert text == complete(world_model, world, "Hi", SamplingParams(max_tokens=12, temperature=0.8, seed=1))


def test_batch_rows_equal_single_prompts(world_model, world):
    prompts = ["The capital of France is", "A", "你好，世界", "def fibonacci(n):\n    "]
    singles = [complete(world_model, world, p, max_tokens=16, temperature=0) for p in prompts]
    assert generate_batch(world_model, world, prompts, max_tokens=16, temperature=0) == singles


def test_batch_rows_leave_at_their_stop(world_model, world):
    prompts = ["Once upon a time", "Hello"]
    singles = [complete(world_model, world, p, max_tokens=20, temperature=0) for p in prompts]
    stop = singles[0][3:6]
    expected = [s[:s.index(stop)] if stop in s else s for s in singles]
    assert generate_batch(world_model, world, prompts, max_tokens=20, temperature=0, stop=[stop]) == expected


def test_bad_input(world_model, world, tiny_model):
    with pytest.raises(ValueError, match="prompt must be a non-empty string"):
        list(generate(world_model, world, ""))
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        generate(world_model, world, "Hi", temperature=-1)
    with pytest.raises(ValueError, match=r"tokenizer has 65530 tokens but the model only 101"):
        generate(tiny_model, world, "Hi")
    with pytest.raises(ValueError, match="no tokenizer"):
        generate(tiny_model, None, "Hi")
    with pytest.raises(ValueError, match="non-empty list"):
        generate_batch(world_model, world, "not a list")


def test_load_brings_the_tokenizer(tmp_path, world_model, tiny_model):
    path = rwkv_lm.save(world_model, tmp_path / "w.safetensors", tokenizer="world")
    assert rwkv_lm.load(path).tokenizer.spec == "world"
    assert rwkv_lm.load(rwkv_lm.save(tiny_model, tmp_path / "t.safetensors")).tokenizer is None
    official = rwkv_lm.load(rwkv_lm.export_official(world_model, tmp_path / "w.pth", dtype=torch.float32))
    assert official.tokenizer.spec == "world", "official 65536-token files are World models"
    bad = rwkv_lm.save(tiny_model, tmp_path / "b.safetensors", tokenizer="no-such-tokenizer.json")
    with pytest.raises(rwkv_lm.CheckpointError, match="its tokenizer cannot be loaded"):
        rwkv_lm.load(bad)
