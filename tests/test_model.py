"""The model: parallel mode against RNN mode, state handling, the official init, and bad input."""
import pytest
import torch

from rwkv_lm import RWKV, RWKVConfig, RWKVState
from rwkv_lm.testing import random_model

from conftest import assert_close


def test_parallel_matches_rnn_mode():
    cfg = RWKVConfig(vocab_size=211, n_layer=3, n_embd=128, head_size=64, decay_lora=16, iclr_lora=16, value_lora=8, gate_lora=32)
    model = random_model(cfg, seed=1)
    tokens = torch.randint(0, cfg.vocab_size, (3, 37), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, state = model(tokens)
        stepped, s = [], None
        for t in range(tokens.shape[1]):
            out, s = model.step(tokens[:, t], s)
            stepped.append(out)
    assert_close(torch.stack(stepped, 1), logits, 1e-5, "logits")
    for a, b in zip(state.tensors().values(), s.tensors().values()):
        assert_close(b, a, 1e-5, "state")


def test_prefill_in_pieces_equals_whole(tiny_model):
    tokens = torch.randint(0, 101, (2, 40))
    with torch.no_grad():
        whole, s_whole = tiny_model(tokens)
        first, s = tiny_model(tokens[:, :17])
        second, s = tiny_model(tokens[:, 17:], s)
        last, _ = tiny_model(tokens, last_only=True)
    assert_close(torch.cat([first, second], 1), whole, 1e-5, "logits")
    assert_close(last[:, 0], whole[:, -1], 1e-6, "last_only logits")
    assert_close(s.layers[-1].wkv, s_whole.layers[-1].wkv, 1e-5, "wkv state")


def test_state_is_constant_size_and_immutable(tiny_model, tiny_config):
    cfg = tiny_config
    state = tiny_model.init_state(2)
    expected = cfg.n_layer * 2 * (2 * cfg.n_embd * 4 + cfg.n_head * cfg.head_size**2 * 4)
    assert state.nbytes == expected
    with torch.no_grad():
        _, after = tiny_model(torch.randint(0, 101, (2, 30)), state)
    assert after.nbytes == expected
    assert state.layers[0].wkv.abs().sum() == 0, "the input state was modified in place"
    copy = after.clone()
    assert copy.layers[1].wkv is not after.layers[1].wkv and torch.equal(copy.layers[1].wkv, after.layers[1].wkv)
    assert after.to("cpu").batch_size == 2
    assert torch.equal(RWKVState.cat([after.select([1]), after.select([0])]).layers[0].wkv[0], after.layers[0].wkv[1])
    assert RWKVState.from_tensors(after.tensors()).nbytes == expected


def test_gradients_flow_through_state(tiny_model):
    tiny_model.train()
    tokens = torch.randint(0, 101, (2, 20))
    _, state = tiny_model(tokens[:, :10])
    logits, _ = tiny_model(tokens[:, 10:], state)
    logits.sum().backward()
    grads = {n: p.grad for n, p in tiny_model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["blocks.1.att.w1"].abs().sum() > 0


def test_official_init():
    cfg = RWKVConfig(vocab_size=300, n_layer=4, n_embd=128, head_size=32)
    torch.manual_seed(0)
    m = RWKV(cfg).reset_parameters()
    att0, att3 = m.blocks[0].att, m.blocks[3].att
    assert att0.x_r[0, 0, 0] == 1.0 and 0 < att0.x_r[0, 0, -1] < 0.01  # 1 - (i/C)^0.2 at layer 0
    assert torch.allclose(att3.ln_x.weight, torch.full((128,), 1.0))  # ((1 + 3) / 4) ** 0.7
    assert torch.allclose(att0.ln_x.weight, torch.full((128,), 0.25**0.7))
    assert m.blocks[2].att.output.weight.abs().sum() == 0 and m.blocks[2].ffn.value.weight.abs().sum() == 0
    assert att0.w1.abs().sum() == 0 and att0.w2.abs().sum() > 0
    assert m.emb.weight.abs().max() <= 1e-4
    assert not hasattr(att0, "v0") and hasattr(att3, "v0")
    w = m.blocks[1].att.key.weight
    assert torch.allclose(w @ w.T, 0.01 * torch.eye(128), atol=1e-5)  # orthogonal, gain 0.1
    assert cfg.decay_lora == 32 and RWKVConfig(n_embd=768).gate_lora == 128 and RWKVConfig(n_embd=768).value_lora == 32


def test_config_from_state_dict(tiny_config, tiny_model):
    assert RWKVConfig.from_state_dict(tiny_model.state_dict()) == tiny_config


def test_bad_tokens_and_state(tiny_model):
    with pytest.raises(ValueError, match="token id 101 is outside"):
        tiny_model(torch.tensor([[1, 101]]))
    with pytest.raises(ValueError, match="token id -1"):
        tiny_model.step(torch.tensor([-1]))
    with pytest.raises(ValueError, match=r"shape \[B, T\]"):
        tiny_model(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="empty"):
        tiny_model(torch.zeros(1, 0, dtype=torch.long))
    other = random_model(RWKVConfig(vocab_size=101, n_layer=2, n_embd=64, head_size=16), seed=3)
    with pytest.raises(ValueError, match="state does not fit this model"):
        tiny_model(torch.tensor([[1, 2]]), other.init_state(1))
    with pytest.raises(ValueError, match="state does not fit"):
        tiny_model(torch.tensor([[1, 2]]), tiny_model.init_state(3))
    with pytest.raises(ValueError, match="multiple of head_size"):
        RWKVConfig(n_embd=100, head_size=64)
