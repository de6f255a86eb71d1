"""WKV-7 on the GPU: the kernels of `cuda/wkv7.cu`, compiled with NVRTC through CuPy on first use.

Modules are cached per (device, dtype, head size, row split); kernels run on torch's current stream and take and
return torch tensors. Anything the kernels cannot serve (no CuPy, a failed compile, CPU tensors, a
dtype or head size without a kernel) falls back to the torch ops, with one warning per reason.
"""
from __future__ import annotations

import functools
import math
import site
import sys
import warnings
from pathlib import Path

import torch

from .chunk import wkv7_chunked
from .naive import wkv7_step

# cuda/wkv7.cu of a checkout (or an editable install), else the copy a wheel installs as a data file under
# the environment's prefix, or under the user base for `pip install --user`
_SOURCES = [Path(__file__).resolve().parents[3] / "cuda" / "wkv7.cu",
            *(Path(base) / "share" / "rwkv_lm" / "cuda" / "wkv7.cu" for base in (sys.prefix, site.USER_BASE) if base)]
SOURCE = next((p for p in _SOURCES if p.exists()), _SOURCES[0])
KERNELS = ("wkv7_forward", "wkv7_backward", "wkv7_decode")
KERNEL_DTYPES = {torch.float32: "float", torch.bfloat16: "bf16_t", torch.float16: "fp16_t"}
# Passed to cupy.RawModule; CuPy adds CUPY_NVRTC_OPTIONS and -arch=sm_XX for the device (the CPU test
# compiles with all of them, so it builds what runs).
NVRTC_OPTIONS = ("-std=c++17",)
CUPY_NVRTC_OPTIONS = ("-ftz=true", "--device-as-default-execution-space")
# The forward saves the state this often for the backward, which undoes steps from each saved state:
# memory B*H*N*N*4*T/16 bytes, against rounding that grows with the product of 1/decay between saves.
CHECKPOINT_EVERY = 16
ROW_SPLITS = (1, 2, 4, 8, 16)  # lanes that may share one state row (they sit in one warp)
DECODE_THREADS = 128

_warned: set[str] = set()
_modules: dict[tuple, _CupyLauncher | None] = {}


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def row_split(r: torch.Tensor, needs_grad: bool) -> int:
    """Lanes per state row in the forward and backward kernels, for a [B, T, H, N] CUDA input.

    Measured on an H200 (bench/RESULTS.md): one lane per row was fastest, or within 3% of it, for every
    forward, and for training once the (batch, head) blocks outnumber the multiprocessors (1.45x faster
    than 4 lanes at B=8, H=64); with fewer blocks, two lanes per row shortened the backward by 13%.
    """
    B, _, H, _ = r.shape
    if needs_grad and B * H < torch.cuda.get_device_properties(r.device).multi_processor_count:
        return 2
    return 1


def kernel_name(kernel: str, dtype: torch.dtype, head_size: int, threads_per_row: int = 1) -> str:
    """The C++ name of one instantiation, e.g. `wkv7_forward<bf16_t, 64, 4>` or `wkv7_decode<float, 64>`."""
    split = "" if kernel == "wkv7_decode" else f", {threads_per_row}"
    return f"{kernel}<{KERNEL_DTYPES[dtype]}, {head_size}{split}>"


@functools.cache
def _cupy():
    try:
        import cupy
    except Exception as e:  # not installed, or its CUDA libraries failed to load
        _warn_once(f"wkv7: CuPy is unavailable ({e}); using the chunked torch op (pip install 'rwkv-lm[cuda]')")
        return None
    return cupy


def available() -> bool:
    """True when a CUDA device and CuPy are present; the kernels themselves compile on first use."""
    return torch.cuda.is_available() and _cupy() is not None


class _CupyLauncher:
    """The three kernels for one (device, dtype, head size, row split), compiled by NVRTC and launched on
    torch's stream."""

    def __init__(self, device: int, dtype: torch.dtype, head_size: int, threads_per_row: int):
        cupy = _cupy()
        names = [kernel_name(k, dtype, head_size, threads_per_row) for k in KERNELS]
        self.device, self.threads_per_row = device, threads_per_row
        with cupy.cuda.Device(device):
            module = cupy.RawModule(code=SOURCE.read_text(), options=NVRTC_OPTIONS, name_expressions=names)
            self.functions = {name: module.get_function(name) for name in names}  # compiles here

    def __call__(self, name, grid, block, *args):
        """args: ints (passed as int32) and tensors or None (passed as pointers)."""
        import numpy as np

        cupy = _cupy()
        packed = tuple(np.int32(x) if isinstance(x, int) else np.uint64(0 if x is None else x.data_ptr()) for x in args)
        stream = torch.cuda.current_stream(self.device).cuda_stream
        with cupy.cuda.Device(self.device), cupy.cuda.ExternalStream(stream, self.device):
            self.functions[name](grid, (block,), packed)


def _launcher(x: torch.Tensor, threads_per_row: int = 1):
    """The compiled kernels for x's device, dtype, head size and row split, or None (with a warning) where
    there are none."""
    N = x.shape[-1]
    if x.device.type != "cuda":
        _warn_once("wkv7: the CUDA kernels need CUDA tensors; using the torch ops")
        return None
    if x.dtype not in KERNEL_DTYPES or N % 32:
        _warn_once(f"wkv7: no CUDA kernel for {x.dtype} with head size {N}; using the torch ops")
        return None
    if _cupy() is None:
        return None
    key = (x.device.index, x.dtype, N, threads_per_row)
    if key not in _modules:
        try:
            _modules[key] = _CupyLauncher(*key)
        except Exception as e:
            _warn_once(f"wkv7: compiling {SOURCE} failed, using the torch ops instead:\n{e}")
            _modules[key] = None
    return _modules[key]


def _forward(launch, ck_every, r, log_w, k, v, a, b, h0, save):
    B, T, H, N = r.shape
    P = launch.threads_per_row
    o = torch.empty_like(r)
    hT = r.new_empty(B, H, N, N, dtype=torch.float32)
    ck = sa = None
    if save:
        ck = r.new_empty(B, H, math.ceil(T / ck_every), N, N, dtype=torch.float32)
        sa = r.new_empty(B, T, H, N, dtype=torch.float32)
    launch(kernel_name("wkv7_forward", r.dtype, N, P), (H, B), N * P, T, ck_every,
           r, log_w, k, v, a, b, h0, o, hT, ck, sa)
    return o, hT, ck, sa


class _WKV7(torch.autograd.Function):
    @staticmethod
    def forward(ctx, launch, ck_every, r, log_w, k, v, a, b, h0):
        o, hT, ck, sa = _forward(launch, ck_every, r, log_w, k, v, a, b, h0, save=True)
        ctx.launch, ctx.ck_every, ctx.has_h0 = launch, ck_every, h0 is not None
        ctx.save_for_backward(r, log_w, k, v, a, b, ck, sa)
        return o, hT

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, dhT):
        r, log_w, k, v, a, b, ck, sa = ctx.saved_tensors
        B, T, H, N = r.shape
        P = ctx.launch.threads_per_row
        grads = [torch.empty_like(x) for x in (r, log_w, k, v, a, b)]
        dh0 = r.new_empty(B, H, N, N, dtype=torch.float32)
        do = do.to(r.dtype).contiguous()
        dhT = dhT.float().contiguous()
        ctx.launch(kernel_name("wkv7_backward", r.dtype, N, P), (H, B), N * P, T, ctx.ck_every,
                   r, log_w, k, v, a, b, do, dhT, ck, sa, *grads, dh0)
        return None, None, *grads, dh0 if ctx.has_h0 else None


def _same_device(*xs):
    """A kernel given a pointer to another device's memory would fault; torch ops raise, so do we."""
    devices = {x.device for x in xs if x is not None}
    if len(devices) > 1:
        raise ValueError(f"wkv7: all inputs must be on one device, got {sorted(map(str, devices))}")


def _kernel_inputs(r, log_w, k, v, a, b):
    """What the kernels read: log_w in fp32 whatever the model's dtype, the rest in r's dtype."""
    xs = [x.to(r.dtype).contiguous() for x in (r, k, v, a, b)]
    xs.insert(1, log_w.float().contiguous())
    return xs


def _needs_grad(*xs) -> bool:
    return torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in xs)


def _run(launch, ck_every, r, log_w, k, v, a, b, initial_state):
    """Make the inputs what the kernels read (r's dtype, fp32 decays and state, contiguous); record autograd
    only if needed."""
    _same_device(r, log_w, k, v, a, b, initial_state)
    xs = _kernel_inputs(r, log_w, k, v, a, b)
    h0 = None if initial_state is None else initial_state.float().contiguous()
    if _needs_grad(*xs, h0):
        return _WKV7.apply(launch, ck_every, *xs, h0)
    o, hT, _, _ = _forward(launch, ck_every, *xs, h0, save=False)
    return o, hT


def _decode(launch, state, r, log_w, k, v, a, b):
    B, H, N = r.shape
    _same_device(state, r, log_w, k, v, a, b)
    xs = _kernel_inputs(r, log_w, k, v, a, b)
    state = state.float().contiguous()
    o, new_state = torch.empty_like(xs[0]), torch.empty_like(state)
    launch(kernel_name("wkv7_decode", r.dtype, N), (B * H, 1), DECODE_THREADS, state, *xs, o, new_state)
    return o, new_state


def wkv7_cuda(r, log_w, k, v, a, b, initial_state=None, threads_per_row: int | None = None):
    """`wkv7` on the GPU: inputs [B, T, H, N], initial_state [B, H, N, N] or None -> (o, final state fp32).
    threads_per_row: lanes per state row (None: `row_split`'s choice)."""
    B, _, H, _ = r.shape
    if threads_per_row is None:
        threads_per_row = row_split(r, _needs_grad(r, log_w, k, v, a, b, initial_state)) if r.is_cuda else 1
    elif threads_per_row not in ROW_SPLITS or r.shape[-1] * threads_per_row > 1024:
        raise ValueError(f"wkv7_cuda: threads_per_row must be one of {ROW_SPLITS} with head size x threads_per_row "
                         f"<= 1024 (a block's threads), got {threads_per_row} for head size {r.shape[-1]}")
    launch = _launcher(r, threads_per_row) if B * H else None
    if launch is None:
        return wkv7_chunked(r, log_w, k, v, a, b, initial_state)
    return _run(launch, CHECKPOINT_EVERY, r, log_w, k, v, a, b, initial_state)


def wkv7_one_cuda(state, r, log_w, k, v, a, b):
    """`wkv7_one` on the GPU: state [B, H, N, N] fp32, the rest [B, H, N] -> (o [B, H, N], new state).

    The decode kernel is for inference; when a gradient is wanted the differentiable torch step runs.
    """
    launch = None if _needs_grad(state, r, log_w, k, v, a, b) or r.numel() == 0 else _launcher(r)
    if launch is None:
        return wkv7_step(state, r, log_w, k, v, a, b)
    return _decode(launch, state, r, log_w, k, v, a, b)
