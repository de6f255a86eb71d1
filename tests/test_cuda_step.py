"""The fused GPU decode step (rwkv_lm/runtime/cuda_step.py, cuda/rwkv7_step.cu) and its CUDA graphs
(rwkv_lm/runtime/cuda_graphs.py) without a GPU: NVRTC compiles the kernels for sm_80 and sm_90, and g++ runs the same
source on the CPU (tests/cuda_emu) through the step's own glue and argument packing, against model.py's step
on fresh random weights and states; the graph runner's buckets, static buffers, padding rows and fallbacks
run with a capture that replays eagerly."""
import copy
import warnings

import pytest
import torch

from cuda_emu.emu import EmuKernels, build, eager_capture
from rwkv_lm.runtime import cuda_graphs, cuda_step
from rwkv_lm.model import RWKVConfig
from rwkv_lm.ops import cuda_kernels
from rwkv_lm.testing import random_model, rel_err

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def config(n_head, head_size, n_layer=2):
    """A small model with odd LoRA ranks and an FFN width that is no multiple of the block sizes."""
    return RWKVConfig(vocab_size=97, n_layer=n_layer, n_embd=n_head * head_size, head_size=head_size,
                      decay_lora=5, iclr_lora=7, value_lora=3, gate_lora=9, dim_ffn=3 * n_head * head_size + 8)


@pytest.fixture(scope="module")
def emu_lib(tmp_path_factory):
    return build("rwkv7_step_emu", tmp_path_factory.getbasetemp() / "cuda_emu")


@pytest.fixture
def emu(emu_lib):
    return EmuKernels(emu_lib)


def random_state(model, batch_size, seed):
    """A state of random values (zeros would hide a state read from the wrong place)."""
    g = torch.Generator().manual_seed(seed)
    return model.init_state(batch_size).map(lambda t: torch.randn(t.shape, generator=g).to(t.dtype))


def errors(logits, state, ref_logits, ref_state):
    """name -> rel_err for the logits and every state tensor."""
    ref = ref_state.tensors()
    return {"logits": rel_err(logits, ref_logits), **{n: rel_err(t, ref[n]) for n, t in state.tensors().items()}}


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_nvrtc_compiles_the_step_kernels(arch):
    """Every dtype at head size 64, and on sm_90 (H100, H200) also 32 and 128, with CuPy's run-time options."""
    compiler = pytest.importorskip("cupy.cuda.compiler")
    try:
        compiler._get_nvrtc_version()
    except Exception as e:
        pytest.skip(f"NVRTC is not installed (pip install 'rwkv-lm[cuda]'): {e}")
    sizes = (32, 64, 128) if arch == "sm_90" else (64,)
    names = sorted({n for dt in cuda_step.KERNEL_DTYPES for N in sizes for n in cuda_step.kernel_names(dt, N)})
    options = cuda_kernels.NVRTC_OPTIONS + cuda_kernels.CUPY_NVRTC_OPTIONS + (f"-arch={arch}",)
    program = compiler._NVRTCProgram(cuda_kernels.read_source(cuda_step.SOURCE), "rwkv7_step.cu",
                                     name_expressions=names, method="cubin")
    cubin, mapping = program.compile(options)
    assert len(cubin) > 0 and set(mapping) == set(names)


@pytest.mark.parametrize("B, n_head, head_size", [(1, 1, 32), (3, 3, 32), (16, 2, 32), (3, 2, 64)])
def test_emulated_fp32_step_equals_model_step(emu, B, n_head, head_size):
    """Two chained steps from a random state (the first layer's ln0 and v_first included): logits and every
    state tensor within 1e-5 of model.py's, and the given states left as they were."""
    model = random_model(config(n_head, head_size), seed=B + n_head)
    state = random_state(model, B, seed=head_size)
    kept = state.clone()
    tokens = torch.randint(model.config.vocab_size, (2, B), generator=torch.Generator().manual_seed(B))
    ref_state, ours = state, state
    for t in tokens:
        with torch.no_grad():
            ref_logits, ref_state = model.step(t, ref_state)
        logits, ours = cuda_step.fused_step(model, t, ours, kernels=emu)
        assert logits.shape == ref_logits.shape and logits.dtype == torch.float32
        for name, err in errors(logits, ours, ref_logits, ref_state).items():
            assert err < 1e-5, f"{name}: {err:.2e}"
    assert all(torch.equal(a, b) for a, b in zip(state.tensors().values(), kept.tensors().values()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_emulated_16bit_step_is_as_close_as_model_step(emu, dtype):
    """With 16-bit weights the fused step rounds less often than model.py (once per kernel output instead of
    once per op): against the fp32 model it is at least as close as model.py in the same dtype (within 1.5x,
    for the noise of a few roundings), and within the dtype's tolerance of it."""
    model = random_model(config(2, 64), seed=5)
    state = random_state(model, 3, seed=6)
    tokens = torch.randint(model.config.vocab_size, (3,), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        exact = model.step(tokens, state)
        half = model.to(dtype)
        half_state = state.map(lambda t: t if t.dtype == torch.float32 and t.dim() == 4 else t.to(dtype))
        theirs = half.step(tokens, half_state)
    ours = cuda_step.fused_step(half, tokens, half_state, kernels=emu)
    assert ours[0].dtype == dtype and ours[1].layers[1].wkv.dtype == torch.float32
    tolerance = {torch.bfloat16: 2e-2, torch.float16: 3e-3}[dtype]
    our_err, their_err = errors(*ours, *exact), errors(*theirs, *exact)
    for name, err in our_err.items():
        assert err < max(1.5 * their_err[name], tolerance / 4), f"{name}: {err:.2e} vs model.py's {their_err[name]:.2e}"
    for name, err in errors(*ours, *theirs).items():
        assert err < tolerance, f"{name} against model.py in {dtype}: {err:.2e}"


def test_argument_blocks_are_packed_once_per_shape(emu):
    """A second step at the same batch size launches through the same argument blocks (only refilled), a new
    batch size gets its own."""
    model = random_model(config(1, 32), seed=8)
    tokens = torch.tensor([3, 5])
    _, state = cuda_step.fused_step(model, tokens, kernels=emu)
    launches = dict(emu._launches)
    logits, _ = cuda_step.fused_step(model, tokens, state, kernels=emu)
    assert emu._launches == launches  # the same Launch objects
    with torch.no_grad():
        assert rel_err(logits, model.step(tokens, state)[0]) < 1e-5
    cuda_step.fused_step(model, tokens[:1], kernels=emu)
    assert len(emu._launches) > len(launches)


def test_falls_back_to_model_step_with_one_warning():
    """What the kernels cannot serve runs model.step: a CPU model (no kernels given), a head size that is no
    multiple of 32, a swapped module."""
    model = random_model(RWKVConfig(vocab_size=50, n_layer=1, n_embd=32, head_size=16, decay_lora=4, iclr_lora=4,
                                    value_lora=4, gate_lora=4), seed=9)
    assert "CUDA GPU" in cuda_step.unusable_reason(random_model(config(1, 32, n_layer=1)))
    assert "multiple of 32" in cuda_step.unusable_reason(model)
    swapped = random_model(config(1, 32, n_layer=1))
    swapped.blocks[0].ffn = torch.nn.Identity()
    assert "as it is" in cuda_step.unusable_reason(swapped, kernels=object())
    cuda_kernels._warned.clear()
    tokens = torch.tensor([1, 2])
    with pytest.warns(RuntimeWarning, match="multiple of 32"):
        logits, state = cuda_step.fused_step(model, tokens)
    with torch.no_grad():
        assert torch.equal(logits, model.step(tokens)[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once only
        cuda_step.fused_step(model, tokens, state)


def test_bad_tokens_are_a_clear_error(emu):
    model = random_model(config(1, 32, n_layer=1))
    with pytest.raises(ValueError, match="outside this model's vocabulary"):
        cuda_step.fused_step(model, torch.tensor([0, 97]), kernels=emu)


# ---- CUDA-graph decode: everything but the graph itself


def test_bucket_sizes():
    assert [cuda_graphs.bucket_size(b) for b in (1, 2, 3, 4, 5, 100, 128, 129, 256)] == [1, 2, 4, 4, 8, 128, 128, 256, 256]
    assert cuda_graphs.bucket_size(257) is None and cuda_graphs.bucket_size(17, max_batch=16) is None
    with pytest.raises(ValueError, match="at least 1"):
        cuda_graphs.bucket_size(0)
    with pytest.raises(ValueError, match="power of two"):
        cuda_graphs.CUDAGraphStep(random_model(config(1, 32, n_layer=1)), max_batch=12)


def test_graph_steps_equal_model_step(emu):
    """Batch sizes 3, 3, 4 (one bucket of 4: captured once, padded), 1, then 9 (above max_batch: eager); every
    result equals model.step's from the same state, padding rows that hold NaN change nothing, and neither the
    given states nor the returned ones change afterwards."""
    model = random_model(config(2, 32), seed=11)
    captured = []
    step = cuda_graphs.CUDAGraphStep(model, max_batch=8, kernels=emu, capture=eager_capture(captured))
    g = torch.Generator().manual_seed(12)
    results = []
    for B in (3, 3, 4, 1, 9):
        state = random_state(model, B, seed=B + len(results))
        kept = state.clone()
        tokens = torch.randint(model.config.vocab_size, (B,), generator=g)
        if len(results) == 1:  # the bucket's padding row: NaN from here on
            for x in step._graphs[4].inputs:
                x[:, 3:] = float("nan")
        logits, new_state = step(tokens, state)
        with torch.no_grad():
            ref = model.step(tokens, state)
        for name, err in errors(logits, new_state, *ref).items():
            assert err < 1e-5, f"B={B} {name}: {err:.2e}"
        assert all(torch.equal(a, b) for a, b in zip(state.tensors().values(), kept.tensors().values()))
        results.append((logits, new_state, logits.clone(), new_state.clone()))
    assert captured == [4, 1]
    for logits, new_state, logits_then, state_then in results:  # fresh copies, not views of the static buffers
        assert torch.equal(logits, logits_then)
        assert all(torch.equal(a, b) for a, b in zip(new_state.tensors().values(), state_then.tensors().values()))


def test_graphs_are_made_again_after_the_parameters_move(emu):
    model = random_model(config(1, 32, n_layer=1), seed=13)
    captured = []
    step = cuda_graphs.CUDAGraphStep(model, kernels=emu, capture=eager_capture(captured))
    tokens = torch.tensor([4, 7])
    step(tokens)
    step(tokens)
    model.blocks[0].att.key.weight.data = model.blocks[0].att.key.weight.data * 2  # as .to() does
    logits, _ = step(tokens)
    with torch.no_grad():
        assert rel_err(logits, model.step(tokens)[0]) < 1e-5
    assert captured == [2, 2]


def test_eager_steps_where_capture_fails_or_the_fused_step_cannot_serve(emu):
    model = random_model(config(1, 32, n_layer=1), seed=14)

    def failing(fn, pool):
        raise RuntimeError("operation not permitted when stream is capturing")

    cuda_kernels._warned.clear()
    tokens = torch.tensor([1, 2, 3])
    with pytest.warns(RuntimeWarning, match="capturing a step of 4 rows failed"):
        logits, _ = cuda_graphs.CUDAGraphStep(model, kernels=emu, capture=failing)(tokens)
    with torch.no_grad():
        assert rel_err(logits, model.step(tokens)[0]) < 1e-5
    with pytest.warns(RuntimeWarning, match="needs a model on a CUDA GPU"):  # no kernels given, a CPU model
        logits, _ = cuda_graphs.CUDAGraphStep(model, capture=failing)(tokens)
    with torch.no_grad():
        assert torch.equal(logits, model.step(tokens)[0])


def test_decode_step_uses_graphs_only_when_asked_and_on_a_gpu(monkeypatch):
    model = random_model(config(1, 32, n_layer=1), seed=15)
    monkeypatch.delenv(cuda_graphs.ENV, raising=False)
    assert not cuda_graphs.graphs_enabled() and cuda_graphs.graphs_enabled(True)
    monkeypatch.setenv(cuda_graphs.ENV, "1")
    assert cuda_graphs.graphs_enabled() and not cuda_graphs.graphs_enabled(False)
    step = cuda_graphs.decode_step(model)  # enabled, but a CPU model: model.step without gradients
    assert not isinstance(step, cuda_graphs.CUDAGraphStep)
    tokens = torch.tensor([5])
    logits, _ = step(tokens)
    assert not logits.requires_grad
    with torch.no_grad():
        assert torch.equal(logits, model.step(tokens)[0])


gpu = pytest.mark.skipif(not cuda_kernels.available(), reason="needs a CUDA GPU and CuPy")


@gpu
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_gpu_fused_and_graph_steps_equal_model_step(dtype):
    """On a GPU: the compiled kernels and real CUDA graphs, batch sizes 1, 3, 16 and 3 again (a replay),
    against the fp32 model, at least as close as model.py in the same dtype."""
    torch.backends.cuda.matmul.allow_tf32 = False
    model = random_model(config(2, 64), seed=16).cuda()
    half = copy.deepcopy(model).to(dtype)
    graphs = cuda_graphs.CUDAGraphStep(half)
    tolerance = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 3e-3}[dtype]
    for B in (1, 3, 16, 3):
        state = random_state(model, B, seed=B).to("cuda")
        half_state = state.map(lambda t: t if t.dim() == 4 else t.to(dtype))
        tokens = torch.randint(model.config.vocab_size, (B,), device="cuda")
        with torch.no_grad():
            exact, theirs = model.step(tokens, state), half.step(tokens, half_state)
        their_err = errors(*theirs, *exact)
        for ours in (cuda_step.fused_step(half, tokens, half_state), graphs(tokens, half_state)):
            for name, err in errors(*ours, *exact).items():
                assert err < max(1.5 * their_err[name], tolerance), f"B={B} {name}: {err:.2e} (model.py {their_err[name]:.2e})"
    assert sorted(graphs._graphs) == [1, 4, 16] and all(graphs._graphs.values())
