"""The WKV-7 time-mixing recurrence as one op with one signature, whatever runs it.

Backends: "naive" (per-step reference, `naive.py`), "chunked" (pure torch, `chunk.py`) and "cuda"
(CuPy/NVRTC kernels, `cuda.py`). `backend=None` picks "cuda" for CUDA tensors when the kernels
work and "chunked" otherwise; the environment variable RWKV_LM_WKV_BACKEND, read at call time,
overrides that default.
"""
from __future__ import annotations

import os

import torch

from .chunk import wkv7_chunked
from .naive import wkv7_naive, wkv7_step

BACKENDS = ("naive", "chunked", "cuda")


def _check(r, others, initial_state):
    if r.dim() != 4:
        raise ValueError(f"wkv7 expects [B, T, H, N] inputs, got r of shape {tuple(r.shape)}")
    for name, x in others.items():
        if x.shape != r.shape:
            raise ValueError(f"wkv7: {name} has shape {tuple(x.shape)}, r has {tuple(r.shape)}; all six must match")
    B, _, H, N = r.shape
    if initial_state is not None and initial_state.shape != (B, H, N, N):
        raise ValueError(f"wkv7: initial_state has shape {tuple(initial_state.shape)}, expected {(B, H, N, N)}")


def _choose(backend, device):
    backend = backend or os.environ.get("RWKV_LM_WKV_BACKEND") or "auto"
    if backend not in BACKENDS + ("auto",):
        raise ValueError(f"unknown wkv7 backend {backend!r}; choose one of {BACKENDS} or 'auto'")
    if backend == "auto":
        if device.type == "cuda":
            from . import cuda

            return "cuda" if cuda.available() else "chunked"
        return "chunked"
    return backend


def wkv7(r, log_w, k, v, a, b, *, initial_state=None, backend=None):
    """Run the recurrence over a sequence (training and prompt prefill).

    r, log_w, k, v, a, b: [B, T, H, N], any float dtype; log_w is the log of the decay (<= 0).
    initial_state: [B, H, N, N] (value x key) or None for zeros.
    Returns (o [B, T, H, N] in the input dtype, final state [B, H, N, N] in fp32).
    """
    _check(r, dict(log_w=log_w, k=k, v=v, a=a, b=b), initial_state)
    choice = _choose(backend, r.device)
    if choice == "cuda":
        from . import cuda

        return cuda.wkv7_cuda(r, log_w, k, v, a, b, initial_state=initial_state)
    run = wkv7_naive if choice == "naive" else wkv7_chunked
    return run(r, log_w, k, v, a, b, initial_state)


def wkv7_one(state, r, log_w, k, v, a, b, *, backend=None):
    """One token for a batch (RNN mode): state [B, H, N, N] fp32; the rest [B, H, N] -> (o [B, H, N], new state)."""
    if _choose(backend, r.device) == "cuda":
        from . import cuda

        return cuda.wkv7_one_cuda(state, r, log_w, k, v, a, b)
    return wkv7_step(state, r, log_w, k, v, a, b)


__all__ = ["wkv7", "wkv7_one", "wkv7_naive", "wkv7_chunked", "wkv7_step", "BACKENDS"]
