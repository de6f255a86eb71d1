"""WKV-7 on the CPU for inference: the recurrence token by token in one C pass per head (`wkv7_f32` in
rwkv_lm/ops/cpu_kernels.c), each head's state staying in cache.

It computes what `naive.py` computes, in fp32, about 7x faster than the chunked torch op on a 512-token
prompt (12 heads of 64, 2 threads, AVX-512), and a decode step is the same kernel with one token. It has no
backward: where a gradient is wanted, or the kernels could not be built, the dispatcher uses the torch ops.
"""
from __future__ import annotations

import torch

from ..cpu_kernels import kernels

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # computed in fp32; fp64 stays with torch


def usable(r: torch.Tensor, log_w, k, v, a, b, state) -> bool:
    """Whether the kernel serves these inputs: on the CPU, a 16-bit or fp32 dtype, the shapes the kernel reads
    (anything else goes to torch, which broadcasts or raises), head size a multiple of 16, no gradient wanted,
    and the kernel built. r ... b: [B, T, H, N] or one token's [B, H, N]; state [B, H, N, N] or None."""
    xs = (r, log_w, k, v, a, b)
    needs_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (*xs, state))
    B, *_, H, N = r.shape
    return (r.device.type == "cpu" and r.dtype in KERNEL_DTYPES and N % 16 == 0 and not needs_grad
            and all(x.shape == r.shape for x in xs) and (state is None or state.shape == (B, H, N, N))
            and "wkv7_f32" in kernels())


def wkv7_cpu(r, log_w, k, v, a, b, initial_state=None):
    """`wkv7` through the kernel: inputs [B, T, H, N] -> (o [B, T, H, N] in r's dtype, final state [B, H, N, N] fp32)."""
    B, T, H, N = r.shape
    xs = [x.float().contiguous() for x in (r, log_w.float().exp(), k, v, a, b)]  # decays from an unrounded log
    state = torch.zeros(B, H, N, N) if initial_state is None else initial_state.float().contiguous()
    new_state, o = torch.empty(B, H, N, N), torch.empty(B, T, H, N)
    if T == 0:
        return o.to(r.dtype), state.clone()
    if kernels()["wkv7_f32"](state.data_ptr(), new_state.data_ptr(), *(x.data_ptr() for x in xs), o.data_ptr(),
                             B, T, H, N, torch.get_num_threads()):
        raise RuntimeError(f"wkv7_f32 refused head size {N} (a multiple of 16 fits)")
    return o.to(r.dtype), new_state


def wkv7_one_cpu(state, r, log_w, k, v, a, b):
    """`wkv7_one` through the kernel: state [B, H, N, N] (left as it is), the rest [B, H, N] -> (o, new state)."""
    o, new_state = wkv7_cpu(*(x.unsqueeze(1) for x in (r, log_w, k, v, a, b)), state)
    return o[:, 0], new_state
