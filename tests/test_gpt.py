import pytest
import torch

import rwkv_lm
from rwkv_lm import GPT, GPTConfig, GPTState
from conftest import assert_close


@pytest.fixture
def gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=101, n_layer=2, n_embd=32, n_head=4, dim_ffn=48)).reset_parameters().eval()


@pytest.fixture
def tokens():
    return torch.randint(0, 101, (2, 13), generator=torch.Generator().manual_seed(1))


def test_step_matches_parallel(gpt, tokens):
    full, _ = gpt(tokens)
    state, steps = gpt.init_state(2), []
    for t in range(tokens.shape[1]):
        logits, state = gpt.step(tokens[:, t], state)
        steps.append(logits)
    assert_close(torch.stack(steps, 1), full, 1e-5, "step vs parallel")


def test_prefill_in_pieces_matches_whole(gpt, tokens):
    full, _ = gpt(tokens)
    a, state = gpt(tokens[:, :5])
    b, state = gpt(tokens[:, 5:6], state)
    c, state = gpt(tokens[:, 6:], state, last_only=True)
    assert_close(torch.cat([a, b], 1), full[:, :6], 1e-5, "pieces")
    assert_close(c[:, 0], full[:, -1], 1e-5, "last_only after pieces")


def test_cache_grows_with_context(gpt, tokens):
    _, short = gpt(tokens[:, :4])
    _, long = gpt(tokens)
    per_token = 2 * 2 * 2 * 32 * 4  # k and v, 2 layers, batch 2, n_embd 32, fp32
    assert long.nbytes - short.nbytes == (13 - 4) * per_token
    assert gpt.init_state(2).nbytes < short.nbytes


def test_batch_of_different_lengths(gpt, tokens):
    """cat left-pads shorter caches; each row continues exactly as it would alone, and select trims the padding."""
    _, s0 = gpt(tokens[:1, :3])
    _, s1 = gpt(tokens[1:, :9])
    both = GPTState.cat([s0, s1])
    nxt = torch.stack([tokens[0, 3], tokens[1, 9]])
    logits, both = gpt.step(nxt, both)
    alone0, _ = gpt(tokens[:1, :4])
    alone1, _ = gpt(tokens[1:, :10])
    assert_close(logits[0], alone0[0, -1], 1e-5, "short row")
    assert_close(logits[1], alone1[0, -1], 1e-5, "long row")
    row0 = both.select([0])
    assert row0.k[0].shape[2] == 4 and row0.pos.tolist() == [4]
    again, _ = gpt.step(tokens[0, 4:5], row0)
    assert_close(again[0], gpt(tokens[:1, :5])[0][0, -1], 1e-5, "after select")
    assert both.clone().nbytes == both.nbytes and both.detach().to("cpu").pos.tolist() == [4, 10]
    again = GPTState.from_tensors(both.tensors())
    assert all(torch.equal(a, b) for a, b in zip(again.tensors().values(), both.tensors().values()))


def test_state_from_another_model_is_refused(gpt, tokens):
    with pytest.raises(ValueError, match="state does not fit"):
        gpt(tokens, GPT(GPTConfig(vocab_size=101, n_layer=3, n_embd=32, n_head=4)).init_state(2))
    with pytest.raises(ValueError, match="outside this model's vocabulary"):
        gpt(tokens + 200)


def test_save_and_load(gpt, tokens, tmp_path):
    path = rwkv_lm.save(gpt, tmp_path / "gpt.safetensors")
    loaded = rwkv_lm.load(path, fast=False)  # bit for bit: the same modules
    assert isinstance(loaded, GPT) and loaded.config == gpt.config and loaded.config.to_dict()["arch"] == "gpt"
    assert torch.equal(loaded(tokens)[0], gpt(tokens)[0])
    with torch.no_grad():  # prepared for the CPU (the kernels' products): the same logits to rounding
        torch.testing.assert_close(rwkv_lm.load(path)(tokens)[0], gpt(tokens)[0], rtol=0, atol=1e-5)
