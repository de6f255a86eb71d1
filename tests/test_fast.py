"""The CPU inference preparation: same parameters and names, same results (fp32), fp32-accurate bf16 steps.

Every test runs at each level of the CPU kernels this machine has (RWKV_LM_CPU_ISA, if set, caps them) and
states which kernels it expects at that level; the tolerance follows the path that level runs."""
import copy
import os

import pytest
import torch

import rwkv_lm
from rwkv_lm import RWKVConfig
from rwkv_lm.cpu_kernels import ISA_ENV, LEVELS, cpu_level, isa_level, kernels
from rwkv_lm.fast import KernelLinear, StepBlock, StepChannelMix, StepTimeMix, _gemv_kernel, optimize
from rwkv_lm.testing import random_model

from conftest import assert_close

# what each level builds (none below avx512: torch runs those)
FP32_KERNELS = {"gemv_f32", "wkv7_f32", "block_step_f32"}
LEVEL_KERNELS = {"generic": set(), "avx2": set(), "avx512": FP32_KERNELS, "avx512_bf16": FP32_KERNELS | {"gemv_bf16"}}
BF16_KERNEL_RTOL = 2e-4  # the bf16 kernel splits activations into two bf16 halves: about 2^-16 relative
BF16_MATMUL_RTOL = 3e-2  # oneDNN's bf16 matmul rounds the activations to bf16 too: 2^-8


@pytest.fixture(autouse=True, params=LEVELS)
def isa(request, monkeypatch):
    """Run the test with the kernels built for this level; skip the levels this CPU (or the cap) lacks."""
    level, top = request.param, isa_level()
    if LEVELS.index(level) > LEVELS.index(top):
        why = f"{ISA_ENV}={os.environ[ISA_ENV]}" if os.environ.get(ISA_ENV) else "this CPU's flags"
        pytest.skip(f"the kernels run up to {top} here ({why}), not {level}")
    monkeypatch.setenv(ISA_ENV, level)
    if LEVEL_KERNELS[level] and not kernels():
        pytest.skip(f"the {level} kernels could not be built here (see the warning: is a C compiler installed?)")
    assert set(kernels()) == LEVEL_KERNELS[level]
    return level


def fp32_kernels() -> bool:
    return "gemv_f32" in LEVEL_KERNELS[isa_level()]


def bf16_kernel() -> bool:
    return "gemv_bf16" in LEVEL_KERNELS[isa_level()]


@pytest.fixture
def model():
    cfg = RWKVConfig(vocab_size=300, n_layer=2, n_embd=64, head_size=32, decay_lora=8, iclr_lora=8, value_lora=4, gate_lora=8)
    return random_model(cfg, seed=2)


def test_fp32_layout_changes_nothing_but_speed(model, tmp_path):
    tokens = torch.randint(0, 300, (2, 19), generator=torch.Generator().manual_seed(0))
    fast = optimize(copy.deepcopy(model))
    if fp32_kernels():
        assert isinstance(fast.head, KernelLinear) and fast.head.weight.dtype == torch.float32
    else:
        assert not fast.head.weight.is_contiguous(), "stored column-major for BLAS"
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


def _steps(model, tokens):
    """Step a model through tokens [B, T] from a random state: (logits of the last step, final state).
    Every step must leave the state it was given as it was (callers keep and fork states)."""
    g = torch.Generator().manual_seed(tokens.shape[0])
    state, given = model.init_state(tokens.shape[0]).map(lambda t: torch.randn(t.shape, generator=g).to(t.dtype)), []
    with torch.no_grad():
        for t in tokens.T:
            given.append((state, state.clone()))
            logits, state = model.step(t, state)
    for kept, snapshot in given:
        assert all(torch.equal(a, b) for a, b in zip(kept.tensors().values(), snapshot.tensors().values())), \
            "a step wrote into the state it was given"
    return logits, state


@pytest.mark.parametrize("lora", [8, 16], ids=["lora-matmul", "lora-kernel"])
@pytest.mark.parametrize("batch", [1, 2, 5, 16, 17])
def test_fp32_steps_match_the_plain_model(batch, lora):
    """Decode steps through the fp32 kernels and the fused time mix, batch sizes over every tile of the kernel;
    LoRA ranks that the kernel takes (multiples of 16) and that it leaves to torch."""
    cfg = RWKVConfig(vocab_size=300, n_layer=2, n_embd=64, head_size=32, decay_lora=lora, iclr_lora=lora,
                     value_lora=lora, gate_lora=2 * lora)
    model = random_model(cfg, seed=lora)
    fast = optimize(copy.deepcopy(model))
    if fp32_kernels():
        assert isinstance(fast.blocks[1].att, StepTimeMix) and _gemv_kernel(fast.head.weight) == "gemv_f32"
        assert fast.blocks[1].att.lora_kernel == ("gemv_f32" if lora % 16 == 0 else None)
        assert isinstance(fast.blocks[1], StepBlock) == (lora % 16 == 0), "whole-block steps need the LoRAs in the kernel"
    assert isinstance(fast.blocks[1].ffn, StepChannelMix)
    tokens = torch.randint(0, 300, (batch, 6), generator=torch.Generator().manual_seed(batch))
    out_fast, s_fast = _steps(fast, tokens)
    out_ref, s_ref = _steps(model, tokens)
    assert_close(out_fast, out_ref, 1e-5, "step logits")
    for name, a in s_fast.tensors().items():
        assert_close(a, s_ref.tensors()[name], 1e-5, name)


@pytest.mark.parametrize("weights", [None, "bf16"])
@pytest.mark.parametrize("batch", [1, 2, 5, 16, 17])
def test_block_steps_match_the_plain_model(batch, weights):
    """Whole-block decode steps in one C call (StepBlock) against model.py, logits and every state tensor: three
    layers (ln0 and v_first made by the first, mixed in by the others), LoRA ranks that differ, fp32 and bf16
    Linear weights (the reference then has the same weights rounded to bf16)."""
    cfg = RWKVConfig(vocab_size=300, n_layer=3, n_embd=128, head_size=32, decay_lora=16, iclr_lora=32, value_lora=16,
                     gate_lora=48)
    model = random_model(cfg, seed=batch)
    fast = optimize(copy.deepcopy(model), weights=weights)
    fused = fp32_kernels() and (weights is None or bf16_kernel())
    assert all((type(block) is StepBlock) == fused for block in fast.blocks)
    tokens = torch.randint(0, 300, (batch, 5), generator=torch.Generator().manual_seed(batch))
    ref = model if weights is None else _rounded(model)
    out_fast, s_fast = _steps(fast, tokens)
    out_ref, s_ref = _steps(ref, tokens)
    # bf16 above 16 rows, or without the bf16 kernel: oneDNN's bf16 matmul
    rtol = 1e-5 if weights is None else BF16_KERNEL_RTOL if batch <= 16 and fused else BF16_MATMUL_RTOL
    assert_close(out_fast, out_ref, rtol, "step logits")
    with torch.no_grad():  # from the zero state the recurrence's outputs are small, and ln_x's eps shows
        assert_close(fast.step(tokens[:, 0])[0], ref.step(tokens[:, 0])[0], rtol, "first step logits")
    for name, a in s_fast.tensors().items():
        assert_close(a, s_ref.tensors()[name], rtol, name)


def test_block_steps_with_a_nearly_vanishing_removal_key():
    """kk = normalize(k * k_k) stays a unit vector however small k * k_k is (down to F.normalize's eps 1e-12):
    one head's k_k scaled to 1e-8 must give the plain model's result in the fused step too."""
    cfg = RWKVConfig(vocab_size=300, n_layer=2, n_embd=64, head_size=32, decay_lora=16, iclr_lora=16, value_lora=16,
                     gate_lora=16)
    model = random_model(cfg, seed=9)
    with torch.no_grad():
        model.blocks[1].att.k_k[..., :32] *= 1e-8
    fast = optimize(copy.deepcopy(model))
    tokens = torch.randint(0, 300, (2, 4), generator=torch.Generator().manual_seed(9))
    assert_close(_steps(fast, tokens)[0], _steps(model, tokens)[0], 1e-5, "step logits")


@pytest.mark.parametrize("lora", [8, 16], ids=["time-mix-steps", "block-steps"])
@pytest.mark.parametrize("assign", [False, True], ids=["copied-in", "assigned"])
def test_optimized_model_loads_new_weights(model, lora, assign):
    """Weights loaded after optimize() are the ones its steps use (no copy made at optimize time goes stale)."""
    if lora != 8:
        model = random_model(RWKVConfig(vocab_size=300, n_layer=2, n_embd=64, head_size=32, decay_lora=lora,
                                        iclr_lora=lora, value_lora=lora, gate_lora=lora))
    other = random_model(model.config, seed=5)
    fast = optimize(copy.deepcopy(model))
    fast.load_state_dict(other.state_dict(), assign=assign)  # assign: new Parameters, in nn.Linear's layouts
    tokens = torch.randint(0, 300, (2, 4), generator=torch.Generator().manual_seed(5))
    assert_close(_steps(fast, tokens)[0], _steps(other, tokens)[0], 1e-5, "step logits")


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_optimized_model_moved_to_another_dtype(model, dtype):
    """After .to(dtype) the kernels no longer fit: the optimized model must fall back to torch, not misread memory."""
    fast = optimize(copy.deepcopy(model)).to(dtype)
    tokens = torch.randint(0, 300, (3, 4), generator=torch.Generator().manual_seed(4))
    out_fast, _ = _steps(fast, tokens)
    out_ref, _ = _steps(model.to(dtype), tokens)
    assert_close(out_fast, out_ref, 1e-6 if dtype == torch.float64 else 3e-2, "step logits")


@pytest.mark.parametrize("in_features, out_features", [(48, 12), (768, 100), (64, 6)])
def test_fp32_linear_kernel(in_features, out_features):
    """Every batch size up to MAX_KERNEL_ROWS (and one above: the matmul), inputs not a multiple of 32 wide,
    outputs not a multiple of 4 (the batched kernel refuses them: the matmul)."""
    torch.manual_seed(in_features)
    linear = torch.nn.Linear(in_features, out_features, bias=False)
    fast = KernelLinear(linear, torch.float32)
    assert _gemv_kernel(fast.weight) == ("gemv_f32" if out_features % 4 == 0 else None)  # where the level has it
    for rows in range(1, 18):
        x = torch.randn(rows, in_features)
        assert_close(fast(x), linear(x).detach(), 1e-6, f"{rows} rows")


@pytest.mark.parametrize("batch", [1, 3, 16])
def test_bf16_steps_are_fp32_accurate(model, batch):
    fast = optimize(copy.deepcopy(model), weights="bf16")
    assert isinstance(fast.head, KernelLinear) and fast.head.weight.dtype == torch.bfloat16
    assert fast.emb.weight.dtype == torch.float32, "only Linear weights change"
    ref = _rounded(model)
    tokens = torch.randint(0, 300, (batch, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        s_fast = s_ref = None
        for t in tokens.T:
            out_fast, s_fast = fast.step(t, s_fast)
            out_ref, s_ref = ref.step(t, s_ref)
    assert_close(out_fast, out_ref, BF16_KERNEL_RTOL if bf16_kernel() else BF16_MATMUL_RTOL, "step logits")


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
        kernel = bf16_kernel() and in_features <= 16384  # else oneDNN, which rounds x to bf16 too
        rtol = BF16_KERNEL_RTOL if kernel else BF16_MATMUL_RTOL
        assert_close(KernelLinear(linear, torch.bfloat16)(x), expected, rtol, f"in_features={in_features}")


def test_optimized_model_under_autograd_keeps_the_gradient(model):
    """The kernels have no backward: with autograd on, the optimized model runs the torch ops and gradients flow."""
    fast = optimize(copy.deepcopy(model))
    logits, _ = fast(torch.randint(0, 300, (2, 1), generator=torch.Generator().manual_seed(3)))
    assert logits.requires_grad
    logits.sum().backward()
    assert fast.emb.weight.grad is not None


def test_isa_cap(monkeypatch):
    """RWKV_LM_CPU_ISA caps the level (never raises it above the CPU's); a wrong name says what fits."""
    monkeypatch.setenv(ISA_ENV, "AVX512_BF16")
    assert isa_level() == cpu_level(), "a cap at the top level (any case) leaves the CPU's own"
    monkeypatch.setenv(ISA_ENV, "generic")
    assert isa_level() == "generic" and kernels() == {}
    monkeypatch.setenv(ISA_ENV, "sse9")
    with pytest.raises(ValueError, match="RWKV_LM_CPU_ISA='sse9' is not a level.*generic, avx2, avx512, avx512_bf16"):
        kernels()
