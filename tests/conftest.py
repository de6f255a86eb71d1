import pytest
import torch

from rwkv_lm.model import RWKV, RWKVConfig


def assert_close(actual, expected, rtol, name="value"):
    """Relative error against the reference's largest magnitude; the message shows both."""
    err = ((actual.double() - expected.double()).abs().max() / expected.double().abs().max().clamp_min(1e-30)).item()
    assert err < rtol, f"{name}: max|diff| / max|ref| = {err:.3e} >= {rtol:.0e}"
    return err


def random_model(cfg: RWKVConfig, seed=0, dtype=torch.float32):
    """A model whose every weight is random (the official init leaves many at zero, which would hide bugs)."""
    torch.manual_seed(seed)
    model = RWKV(cfg).reset_parameters()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.02 if p.dim() == 2 else 0.2))
    return model.to(dtype).eval()


@pytest.fixture(scope="session")
def world():
    """The RWKV World tokenizer (65530 tokens)."""
    from rwkv_lm.tokenizer import load_tokenizer

    return load_tokenizer("world")


@pytest.fixture
def tiny_config():
    return RWKVConfig(vocab_size=101, n_layer=3, n_embd=64, head_size=16, decay_lora=8, iclr_lora=8, value_lora=4, gate_lora=12)


@pytest.fixture
def tiny_model(tiny_config):
    return random_model(tiny_config)
