"""The chunked op and the dispatcher against the per-step reference, outputs, final state and gradients."""
import pytest
import torch

from rwkv_lm.ops.cpu_kernels import ISA_ENV, LEVELS, isa_level, kernels
from rwkv_lm.ops.wkv7 import cpu, wkv7, wkv7_chunked, wkv7_naive, wkv7_one, wkv7_step
from rwkv_lm.testing import random_inputs

from conftest import assert_close


def inputs(B, T, H, N, dtype, seed):
    """The op's six inputs and an initial state, as one list."""
    xs, s0 = random_inputs(B, T, H, N, dtype=dtype, seed=seed)
    return xs + [s0.to(dtype)]


@pytest.mark.parametrize("chunk", [1, 4, 16])
@pytest.mark.parametrize("T", [1, 15, 37])
def test_chunked_matches_naive_fp64(T, chunk):
    *xs, s0 = inputs(3, T, 2, 8, torch.float64, seed=T * 10 + chunk)
    o_ref, s_ref = wkv7_naive(*xs, s0)
    o, s = wkv7_chunked(*xs, s0, chunk_size=chunk)
    assert_close(o, o_ref, 1e-12, "output")
    assert_close(s, s_ref, 1e-12, "final state")


def test_chunked_fp32_and_strong_decay():
    *xs, s0 = inputs(2, 50, 2, 16, torch.float32, seed=1)
    xs[1] = xs[1] * 8  # decays far below the model's range: nothing may overflow
    o_ref, s_ref = wkv7_naive(*xs, s0)
    o, s = wkv7_chunked(*xs, s0)
    assert torch.isfinite(o).all()
    assert_close(o, o_ref, 1e-5, "output")
    assert_close(s, s_ref, 1e-5, "final state")


@pytest.mark.parametrize("decay_scale", [1.0, 30.0], ids=["model-decay", "strong-decay"])
def test_chunked_gradients_match_naive(decay_scale):
    xs = inputs(2, 21, 2, 8, torch.float64, seed=2)
    xs[1] = xs[1] * decay_scale  # strong decays take the exact (unfactored) pair products
    xs = [x.requires_grad_() for x in xs]
    g_out = torch.randn(2, 21, 2, 8, dtype=torch.float64)
    g_state = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    grads = []
    for fn in (wkv7_naive, wkv7_chunked):
        o, s = fn(*xs[:6], xs[6])
        grads.append(torch.autograd.grad((o * g_out).sum() + (s * g_state).sum(), xs))
    for name, g_ref, g in zip("r log_w k v a b initial_state".split(), *grads):
        assert_close(g, g_ref, 1e-10, f"grad {name}")


def test_chunked_gradcheck():
    xs = [x.requires_grad_() for x in inputs(1, 5, 1, 3, torch.float64, seed=3)]
    assert torch.autograd.gradcheck(lambda *a: wkv7_chunked(*a[:6], a[6], chunk_size=2), xs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dispatcher_backends_agree(dtype, monkeypatch):
    monkeypatch.delenv("RWKV_LM_WKV_BACKEND", raising=False)  # the default backend, whatever the environment says
    *xs, s0 = inputs(2, 19, 2, 8, dtype, seed=4)
    o_ref, s_ref = wkv7(*xs, initial_state=s0, backend="naive")
    o, s = wkv7(*xs, initial_state=s0)
    assert o.dtype == dtype and s.dtype == torch.float32
    assert_close(o, o_ref, 1e-5 if dtype == torch.float32 else 2e-2, "output")
    # one token at a time through the RNN-mode op reaches the same state
    state = s0.float()
    for t in range(19):
        _, state = wkv7_one(state, *(x[:, t] for x in xs))
    assert_close(state, s_ref, 1e-5, "stepped state")


def test_bad_shapes_and_backend():
    *xs, s0 = inputs(2, 4, 2, 8, torch.float32, seed=5)
    with pytest.raises(ValueError, match="k has shape"):
        wkv7(xs[0], xs[1], xs[2][:, :3], *xs[3:])
    with pytest.raises(ValueError, match="initial_state"):
        wkv7(*xs, initial_state=s0[:, :1])
    with pytest.raises(ValueError, match="unknown wkv7 backend"):
        wkv7(*xs, backend="fast")


needs_cpu_kernel = pytest.mark.skipif("wkv7_f32" not in kernels(), reason="the CPU kernels could not be built (no C compiler?)")


@needs_cpu_kernel
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("B, T, H, N, with_state", [(1, 1, 1, 16, True), (2, 37, 3, 64, True), (3, 20, 2, 32, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_kernel_matches_naive(B, T, H, N, with_state, dtype, level, monkeypatch):
    """At every level this CPU has: heads of 64 (RWKV-7's, the kernel's size known when compiled) and of other sizes."""
    if LEVELS.index(level) > LEVELS.index(isa_level()):
        pytest.skip(f"the kernels run up to {isa_level()} here, not {level}")
    monkeypatch.setenv(ISA_ENV, level)
    assert kernels().level == level
    xs, s0 = random_inputs(B, T, H, N, dtype=dtype)  # a fresh seed every run
    s0 = s0 if with_state else None
    before = None if s0 is None else s0.clone()
    o_ref, s_ref = wkv7_naive(*(x.double() for x in xs), None if s0 is None else s0.double())
    o, s = cpu.wkv7_cpu(*xs, s0)
    assert o.dtype == dtype and s.dtype == torch.float32
    assert_close(o, o_ref, 1e-5 if dtype == torch.float32 else 1e-2, "output")
    assert_close(s, s_ref, 1e-5, "final state")
    assert s0 is None or torch.equal(s0, before)  # the caller's state is left as it is


@needs_cpu_kernel
def test_cpu_kernel_one_step_matches_the_torch_step():
    xs, s0 = random_inputs(4, 1, 12, 64)
    xs = [x[:, 0] for x in xs]
    o_ref, s_ref = wkv7_step(s0.double(), *(x.double() for x in xs))
    o, s = cpu.wkv7_one_cpu(s0, *xs)
    assert_close(o, o_ref, 1e-5, "output")
    assert_close(s, s_ref, 1e-5, "state")


@needs_cpu_kernel
def test_dispatcher_uses_the_cpu_kernel_for_inference_only(monkeypatch):
    monkeypatch.delenv("RWKV_LM_WKV_BACKEND", raising=False)
    calls = []
    monkeypatch.setattr(cpu, "wkv7_cpu", lambda *a: calls.append("seq") or wkv7_chunked(*a))
    monkeypatch.setattr(cpu, "wkv7_one_cpu", lambda *a: calls.append("one") or wkv7_step(*a))
    xs, s0 = random_inputs(1, 5, 2, 16, seed=6)
    with torch.no_grad():
        wkv7(*xs, initial_state=s0)
        wkv7_one(s0, *(x[:, 0] for x in xs))
        wkv7(*(x.double() for x in xs), initial_state=s0.double())  # fp64 stays with torch
    assert calls == ["seq", "one"]
    grad_xs = [x.requires_grad_() for x in xs]
    o, s = wkv7(*grad_xs, initial_state=s0)  # a gradient is wanted: the chunked op
    o.sum().backward()
    assert calls == ["seq", "one"] and grad_xs[0].grad is not None
    with torch.no_grad():
        wkv7(*xs, initial_state=s0, backend="cpu")
    assert calls == ["seq", "one", "seq"]


def test_dispatcher_without_the_cpu_kernel(monkeypatch):
    """Where the kernel cannot be built, inference takes the torch ops, asked for or not."""
    monkeypatch.delenv("RWKV_LM_WKV_BACKEND", raising=False)
    monkeypatch.setattr(cpu, "kernels", lambda: {})
    xs, s0 = random_inputs(2, 9, 2, 16, seed=7)
    o_ref, s_ref = wkv7_naive(*xs, s0)
    with torch.no_grad():
        for backend in (None, "cpu"):
            o, s = wkv7(*xs, initial_state=s0, backend=backend)
            assert_close(o, o_ref, 1e-5, "output")


def test_cpu_backend_leaves_odd_shapes_to_torch():
    """A state of another batch size broadcasts in the torch step (the kernel would read past it); an empty
    sequence returns the initial state."""
    g = torch.Generator().manual_seed(13)
    state, xs = torch.randn(1, 2, 16, 16, generator=g), [torch.randn(4, 2, 16, generator=g) for _ in range(6)]
    with torch.no_grad():
        o, s = wkv7_one(state, *xs)
        o_ref, s_ref = wkv7_step(state, *xs)
        assert_close(o, o_ref, 1e-6, "output")
        empty = [torch.randn(2, 0, 2, 16, generator=g) for _ in range(6)]
        s0 = torch.randn(2, 2, 16, 16, generator=g)
        for backend in ("cpu", "chunked"):
            assert torch.equal(wkv7(*empty, initial_state=s0, backend=backend)[1], s0)
