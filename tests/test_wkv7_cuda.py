"""The CUDA WKV-7 kernels without a GPU: NVRTC compiles them for sm_80 and sm_90 with the options CuPy
uses at run time, and g++ runs the same source on the CPU (tests/cuda_emu) through the op's own
autograd glue, against the fp64 reference. GPU cases at the end skip without a GPU."""
import sys
import warnings
from pathlib import Path

import pytest
import torch

from cuda_emu.emu import EmuKernels, build
from rwkv_lm.ops import cuda_kernels
from rwkv_lm.ops.wkv7 import cuda, wkv7, wkv7_naive, wkv7_one, wkv7_step
from rwkv_lm.testing import random_inputs

from conftest import assert_close

NAMES = "r log_w k v a b initial_state".split()
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# max|diff| / max|ref| against fp64 on the same rounded inputs. fp32 gradients lose up to the product of
# 1/decay over a checkpoint interval where the backward undoes steps (about 1e-5 in the model's decay range).
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 2e-3}


@pytest.fixture(scope="session")
def emu_lib(tmp_path_factory):
    return build("wkv7_emu", tmp_path_factory.getbasetemp() / "cuda_emu")


@pytest.fixture
def emu(emu_lib):
    return EmuKernels(emu_lib)


def reference(xs, s0):
    """Outputs and all seven gradients in fp64 for fixed random cotangents."""
    xs = [x.double().requires_grad_() for x in xs + [s0]]
    o, s = wkv7_naive(*xs)
    g = torch.Generator().manual_seed(99)
    do, ds = torch.randn(o.shape, generator=g, dtype=torch.float64), torch.randn(s.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((o * do).sum() + (s * ds).sum(), xs)
    return o.detach(), s.detach(), do, ds, grads


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_nvrtc_compiles_every_kernel(arch):
    """Every dtype at N = 64 with the row splits the op chooses; on sm_90 (H100, H200) also the others
    bench/gpu_check.py checks and times."""
    compiler = pytest.importorskip("cupy.cuda.compiler")
    try:
        compiler._get_nvrtc_version()
    except Exception as e:
        pytest.skip(f"NVRTC is not installed (pip install 'rwkv-lm[cuda]'): {e}")
    splits = (1, 2, 4, 8) if arch == "sm_90" else (1, 2)
    names = sorted({cuda.kernel_name(k, dt, 64, p) for k in cuda.KERNELS for dt in cuda.KERNEL_DTYPES for p in splits})
    program = compiler._NVRTCProgram(cuda_kernels.read_source(cuda.SOURCE), "wkv7.cu", name_expressions=names,
                                     method="cubin")
    cubin, mapping = program.compile(cuda_kernels.NVRTC_OPTIONS + cuda_kernels.CUPY_NVRTC_OPTIONS + (f"-arch={arch}",))
    assert len(cubin) > 0 and set(mapping) == set(names)


@pytest.mark.parametrize("ck_every", [4, 16])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_emulated_forward_and_gradients(emu, dtype, ck_every):
    B, T, H, N = 2, 19, 2, 64  # T is not a multiple of either checkpoint interval
    xs, s0 = random_inputs(B, T, H, N, dtype=dtype, seed=ck_every)
    o_ref, s_ref, do, ds, grads_ref = reference(xs, s0)
    xs = [x.requires_grad_() for x in xs + [s0]]
    o, s = cuda._run(emu, ck_every, *xs)
    assert o.dtype == dtype and s.dtype == torch.float32
    assert_close(o, o_ref, TOLERANCE[dtype], "output")
    assert_close(s, s_ref, 2e-5, "final state")
    grads = torch.autograd.grad((o.double() * do).sum() + (s.double() * ds).sum(), xs)
    for name, g, g_ref in zip(NAMES, grads, grads_ref):
        assert g.dtype == (torch.float32 if name == "initial_state" else dtype)
        assert_close(g, g_ref, TOLERANCE[dtype], f"grad {name}")


@pytest.mark.parametrize("split", [1, 2, 4])
def test_emulated_row_splits(emu_lib, split):
    """The row split is a template argument: any number of lanes per row computes the same recurrence,
    over several checkpoint intervals and a partial one."""
    xs, s0 = random_inputs(1, 50, 2, 64, seed=3)
    o_ref, s_ref, do, ds, grads_ref = reference(xs, s0)
    xs = [x.requires_grad_() for x in xs + [s0]]
    o, s = cuda._run(EmuKernels(emu_lib, threads_per_row=split), 16, *xs)
    assert_close(o, o_ref, 2e-5, "output")
    grads = torch.autograd.grad((o.double() * do).sum() + (s.double() * ds).sum(), xs)
    for name, g, g_ref in zip(NAMES, grads, grads_ref):
        assert_close(g, g_ref, TOLERANCE[torch.float32], f"grad {name}")


def test_emulated_bf16_inputs_with_fp32_decays(emu):
    """What the model feeds: bf16 r, k, v, a, b and an fp32 log_w, which the kernels must not round."""
    xs, s0 = random_inputs(2, 40, 2, 64, seed=11)
    xs = [x if name == "log_w" else x.to(torch.bfloat16) for name, x in zip(NAMES, xs)]
    o_ref, s_ref, do, ds, grads_ref = reference(xs, s0)
    xs = [x.requires_grad_() for x in xs + [s0]]
    o, s = cuda._run(emu, 16, *xs)
    assert_close(s, s_ref, 2e-5, "final state")  # decays rounded to bf16 would be ~1e-3 off
    grads = torch.autograd.grad((o.double() * do).sum() + (s.double() * ds).sum(), xs)
    assert grads[1].dtype == torch.float32  # (its accuracy is the bf16 cotangent's, as for the others)
    for name, g, g_ref in zip(NAMES, grads, grads_ref):
        assert_close(g, g_ref, TOLERANCE[torch.bfloat16], f"grad {name}")


def test_bad_row_split_is_a_clear_error():
    xs, s0 = random_inputs(1, 3, 1, 64, seed=12)
    for bad in (0, 3, 32):
        with pytest.raises(ValueError, match="threads_per_row must be one of"):
            cuda.wkv7_cuda(*xs, initial_state=s0, threads_per_row=bad)


def test_row_split_follows_the_measured_rule(monkeypatch):
    """One lane per row, except for training with fewer (batch, head) blocks than multiprocessors."""
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: type("P", (), {"multi_processor_count": 132}))
    shape = lambda B, H: torch.empty(B, 4, H, 64, device="meta")
    assert cuda.row_split(shape(8, 64), needs_grad=True) == 1
    assert cuda.row_split(shape(8, 12), needs_grad=True) == 2
    assert cuda.row_split(shape(8, 12), needs_grad=False) == 1


def test_emulated_inference_without_state_or_saving(emu):
    """No initial state, nothing requiring grad: the forward saves nothing, T longer than a checkpoint."""
    xs, _ = random_inputs(1, 37, 3, 32, seed=5)
    o_ref, s_ref = wkv7_naive(*(x.double() for x in xs))
    o, s = cuda._run(emu, cuda.CHECKPOINT_EVERY, *xs, None)
    assert_close(o, o_ref, 2e-5, "output")
    assert_close(s, s_ref, 2e-5, "final state")


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_emulated_decode(emu, dtype):
    xs, s0 = random_inputs(3, 1, 2, 64, dtype=dtype, seed=6)
    xs = [x[:, 0] for x in xs]
    o_ref, s_ref = wkv7_step(s0.double(), *(x.double() for x in xs))
    o, s = cuda._decode(emu, s0, *xs)
    assert o.dtype == dtype
    assert_close(o, o_ref, TOLERANCE[dtype], "output")
    assert_close(s, s_ref, 1e-6, "state")


def test_falls_back_with_one_warning_on_cpu_tensors():
    xs, s0 = random_inputs(1, 5, 1, 32, seed=7)
    cuda_kernels._warned.clear()
    with pytest.warns(RuntimeWarning, match="need CUDA tensors"):
        o, s = wkv7(*xs, initial_state=s0, backend="cuda")
    o_ref, s_ref = wkv7_naive(*xs, s0)
    assert_close(o, o_ref, 1e-5, "output")
    with warnings.catch_warnings(record=True) as record:  # said once only
        warnings.simplefilter("always")
        wkv7_one(s0, *(x[:, 0] for x in xs), backend="cuda")
    assert not record


def test_rejects_inputs_on_two_devices(emu):
    xs, s0 = random_inputs(1, 3, 1, 32, seed=8)
    with pytest.raises(ValueError, match="one device"):
        cuda._run(emu, 16, *xs, s0.to("meta"))


gpu = pytest.mark.skipif(not (torch.cuda.is_available() and cuda.available()), reason="needs a CUDA GPU and CuPy")


@gpu
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_gpu_matches_reference(dtype):
    xs, s0 = random_inputs(2, 37, 3, 64, dtype=dtype, seed=8)
    o_ref, s_ref, do, ds, grads_ref = reference(xs, s0)
    xs = [x.cuda().requires_grad_() for x in xs + [s0]]
    o, s = wkv7(*xs[:6], initial_state=xs[6], backend="cuda")
    assert_close(o.cpu(), o_ref, TOLERANCE[dtype], "output")
    assert_close(s.cpu(), s_ref, 2e-5, "final state")
    grads = torch.autograd.grad((o.double() * do.cuda()).sum() + (s.double() * ds.cuda()).sum(), xs)
    for name, g, g_ref in zip(NAMES, grads, grads_ref):
        assert_close(g.cpu(), g_ref, TOLERANCE[dtype], f"grad {name}")
    state = s0.cuda()
    for t in range(xs[0].shape[1]):
        _, state = wkv7_one(state, *(x[:, t].detach() for x in xs[:6]), backend="cuda")
    assert_close(state.cpu(), s_ref, 1e-4, "stepped state")


def test_a_wheel_installs_the_kernel_sources_where_the_loader_looks():
    """Outside a checkout the loader reads <prefix>/share/rwkv_lm/cuda/*.cu; pyproject must put every one there."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    data_files = project["tool"]["setuptools"]["data-files"]
    installed = {f"{folder}/{Path(f).name}" for folder, files in data_files.items() for f in files}
    wheel_dir = cuda_kernels._CUDA_DIRS[1].relative_to(sys.prefix).as_posix()
    sources = sorted(p.name for p in cuda.SOURCE.parent.glob("*.cu"))
    assert "rwkv7_step.cu" in sources and {f"{wheel_dir}/{name}" for name in sources} <= installed


def test_the_dispatcher_decides_every_fallback(monkeypatch):
    """cuda.usable says whether the kernels serve the inputs; the kernels' own functions never fall back (they
    refuse what they cannot run), and the dispatcher picks the torch ops with the reason as a warning."""
    xs, s0 = random_inputs(1, 3, 1, 32, seed=13)
    assert not cuda.usable(*xs, s0) and "need CUDA tensors" in cuda.unusable_reason(*xs, s0)
    with pytest.raises(ValueError, match="need CUDA tensors"):
        cuda.wkv7_cuda(*xs, initial_state=s0)
    with pytest.raises(ValueError, match="need CUDA tensors"):
        cuda.wkv7_one_cuda(s0, *(x[:, 0] for x in xs))
    from rwkv_lm.ops import wkv7 as op

    assert op._choose("cuda", (*xs, s0)) == "chunked"
    monkeypatch.setattr(cuda, "unusable_reason", lambda *inputs, one_token=False: None)
    assert op._choose("cuda", (*xs, s0)) == "cuda"
    assert op._choose(None, (*xs, s0)) != "cuda"  # CPU tensors: never the GPU kernels
