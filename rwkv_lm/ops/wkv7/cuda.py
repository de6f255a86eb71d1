"""WKV-7 on the GPU: the kernels of `cuda/wkv7.cu`, compiled with NVRTC through CuPy on first use.

Modules are cached per (device, dtype, head size, row split); kernels run on torch's current stream and take
and return torch tensors. `usable` says whether the kernels serve some inputs (CUDA tensors, a dtype and head
size with a kernel, CuPy present, the module compiled; for one token, no gradient wanted); the dispatcher in
`__init__.py` decides from it, and the functions here run only inputs they serve.
"""
from __future__ import annotations

import math

import torch

from ..cuda_kernels import CupyKernels, available, source, warn_once  # noqa: F401 (available, warn_once: for callers)

SOURCE = source("wkv7.cu")
KERNELS = ("wkv7_forward", "wkv7_backward", "wkv7_decode")
KERNEL_DTYPES = {torch.float32: "float", torch.bfloat16: "bf16_t", torch.float16: "fp16_t"}
# The forward saves the state this often for the backward, which undoes steps from each saved state:
# memory B*H*N*N*4*T/16 bytes, against rounding that grows with the product of 1/decay between saves.
CHECKPOINT_EVERY = 16
ROW_SPLITS = (1, 2, 4, 8, 16)  # lanes that may share one state row (they sit in one warp)
DECODE_THREADS = 128

_modules: dict[tuple, WKVKernels | None] = {}
_compile_errors: dict[tuple, str] = {}


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


class WKVKernels(CupyKernels):
    """The three kernels for one (device, dtype, head size, row split)."""

    def __init__(self, device: int, dtype: torch.dtype, head_size: int, threads_per_row: int):
        super().__init__(SOURCE, [kernel_name(k, dtype, head_size, threads_per_row) for k in KERNELS], device)
        self.threads_per_row = threads_per_row


def _launcher(x: torch.Tensor, threads_per_row: int = 1) -> WKVKernels | None:
    """The compiled kernels for x's device, dtype, head size and row split; None where they did not compile
    (`_compile_errors` says why)."""
    key = (x.device.index, x.dtype, x.shape[-1], threads_per_row)
    if key not in _modules:
        try:
            _modules[key] = WKVKernels(*key)
        except Exception as e:
            _modules[key], _compile_errors[key] = None, f"compiling {SOURCE} failed:\n{e}"
    return _modules[key]


def _needs_grad(*xs) -> bool:
    return torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in xs)


def unusable_reason(r, log_w, k, v, a, b, state, *, one_token: bool = False) -> str | None:
    """Why the kernels cannot serve these inputs (None: they can; this compiles them on first use).
    r ... b: [B, T, H, N], or one token's [B, H, N] with one_token; state [B, H, N, N] or None."""
    xs = (r, log_w, k, v, a, b)
    B, *_, H, N = r.shape
    if r.device.type != "cuda":
        return "the CUDA kernels need CUDA tensors"
    if r.dtype not in KERNEL_DTYPES or N % 32:
        return f"no CUDA kernel for {r.dtype} with head size {N}"
    if B * H == 0:
        return "the inputs are empty"
    if any(x.shape != r.shape for x in xs) or (state is not None and state.shape != (B, H, N, N)):
        return "the inputs' shapes differ"
    needs_grad = _needs_grad(*xs, state)
    if one_token and needs_grad:
        return "the decode kernel has no backward"
    if not available():
        return "CuPy or a CUDA device is unavailable"
    key = (r.device.index, r.dtype, N, 1 if one_token else row_split(r, needs_grad))
    if _launcher(r, key[-1]) is None:
        return _compile_errors[key]
    return None


def usable(r, log_w, k, v, a, b, state, *, one_token: bool = False) -> bool:
    """Whether the kernels serve these inputs (see `unusable_reason`)."""
    return unusable_reason(r, log_w, k, v, a, b, state, one_token=one_token) is None


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


def _compiled(r, threads_per_row: int) -> WKVKernels:
    """The kernels for r (a CUDA tensor), or a clear error; the dispatcher asks `usable` first."""
    if r.device.type != "cuda":
        raise ValueError(f"wkv7 cuda: the kernels need CUDA tensors, got {r.device} (use rwkv_lm.ops.wkv7.wkv7)")
    launch = _launcher(r, threads_per_row)
    if launch is None:
        raise RuntimeError(_compile_errors[(r.device.index, r.dtype, r.shape[-1], threads_per_row)])
    return launch


def wkv7_cuda(r, log_w, k, v, a, b, initial_state=None, threads_per_row: int | None = None):
    """`wkv7` on the GPU for inputs it serves (`usable`): inputs [B, T, H, N], initial_state [B, H, N, N] or
    None -> (o, final state fp32). threads_per_row: lanes per state row (None: `row_split`'s choice)."""
    if threads_per_row is None:
        threads_per_row = row_split(r, _needs_grad(r, log_w, k, v, a, b, initial_state)) if r.is_cuda else 1
    elif threads_per_row not in ROW_SPLITS or r.shape[-1] * threads_per_row > 1024:
        raise ValueError(f"wkv7_cuda: threads_per_row must be one of {ROW_SPLITS} with head size x threads_per_row "
                         f"<= 1024 (a block's threads), got {threads_per_row} for head size {r.shape[-1]}")
    return _run(_compiled(r, threads_per_row), CHECKPOINT_EVERY, r, log_w, k, v, a, b, initial_state)


def wkv7_one_cuda(state, r, log_w, k, v, a, b):
    """`wkv7_one` on the GPU for inputs it serves (`usable(..., one_token=True)`): state [B, H, N, N] fp32, the
    rest [B, H, N] -> (o [B, H, N], new state)."""
    return _decode(_compiled(r, 1), state, r, log_w, k, v, a, b)
