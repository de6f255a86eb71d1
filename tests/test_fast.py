"""The CPU inference preparation: same parameters and names, same results (fp32), fp32-accurate bf16 steps."""
import copy

import pytest
import torch

import rwkv_lm
from rwkv_lm import RWKVConfig
from rwkv_lm.fast import BF16Linear, _kernel, optimize

from conftest import assert_close, random_model


@pytest.fixture
def model():
    cfg = RWKVConfig(vocab_size=300, n_layer=2, n_embd=64, head_size=32, decay_lora=8, iclr_lora=8, value_lora=4, gate_lora=8)
    return random_model(cfg, seed=2)


def test_fp32_layout_changes_nothing_but_speed(model, tmp_path):
    tokens = torch.randint(0, 300, (2, 19), generator=torch.Generator().manual_seed(0))
    fast = optimize(copy.deepcopy(model))
    assert not fast.head.weight.is_contiguous(), "stored column-major"
    with torch.no_grad():
        assert_close(fast(tokens)[0], model(tokens)[0], 1e-5, "logits")
    assert fast.state_dict().keys() == model.state_dict().keys()
    reloaded = rwkv_lm.load(rwkv_lm.save(fast, tmp_path / "f.safetensors"))
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), model.state_dict().values()))


def _rounded(model):
    """The fp32 model with its Linear weights rounded to bf16: what the bf16 path must compute."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.copy_(m.weight.bfloat16().float())
    return ref


@pytest.mark.parametrize("batch", [1, 3])
def test_bf16_steps_are_fp32_accurate(model, batch):
    fast = optimize(copy.deepcopy(model), weights="bf16")
    assert isinstance(fast.head, BF16Linear) and fast.head.weight.dtype == torch.bfloat16
    assert fast.emb.weight.dtype == torch.float32, "only Linear weights change"
    ref = _rounded(model)
    tokens = torch.randint(0, 300, (batch, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        s_fast = s_ref = None
        for t in tokens.T:
            out_fast, s_fast = fast.step(t, s_fast)
            out_ref, s_ref = ref.step(t, s_ref)
    # the kernel splits activations into two bf16 halves: about 2^-16 relative; oneDNN's bf16 alone: 2^-8
    assert_close(out_fast, out_ref, 2e-4 if _kernel() else 3e-2, "step logits")


def test_bf16_prefill_close(model):
    fast = optimize(copy.deepcopy(model), weights="bf16")
    tokens = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert_close(fast(tokens)[0], _rounded(model)(tokens)[0], 3e-2, "prefill logits (bf16 matmul inputs)")
    assert fast.state_dict().keys() == model.state_dict().keys()


def test_bad_weights_option(model):
    with pytest.raises(ValueError, match="weights must be None .* or 'bf16'"):
        optimize(model, weights="int8")


def test_bf16_after_fp32_layout_and_wide_inputs():
    """A column-major fp32 weight still feeds the row-streaming kernel right; inputs wider than the kernel take the matmul."""
    torch.manual_seed(0)
    for in_features in (128, 16448):
        linear = torch.nn.Linear(in_features, 8, bias=False)
        linear.weight.data = linear.weight.data.t().contiguous().t()  # what optimize() does to fp32 weights
        x = torch.randn(1, in_features)
        expected = x @ linear.weight.detach().bfloat16().float().T
        kernel = _kernel() and in_features <= 16384  # else oneDNN, which rounds x to bf16 too
        assert_close(BF16Linear(linear)(x), expected, 2e-4 if kernel else 3e-2, f"in_features={in_features}")
