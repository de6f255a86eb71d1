"""The WKV-7 time-mixing recurrence as one op with one signature, whatever runs it.

Backends: "naive" (per-step reference, `naive.py`), "chunked" (pure torch, `chunk.py`), "cpu" (a C
kernel for inference, `cpu.py`) and "cuda" (CuPy/NVRTC kernels, `cuda.py`). `backend=None` picks "cuda"
for CUDA tensors when the kernels work; on a CPU, "cpu" where it serves the inputs (no gradient wanted)
and "chunked" otherwise (one-token steps: the torch step). The environment variable
RWKV_LM_WKV_BACKEND, read at call time, overrides that default. Every fallback is decided here (`_choose`),
from each kernel backend's `usable`: "cuda" asked for (or chosen for CUDA tensors) but unable to serve the
inputs runs the torch ops with one warning per reason; "cpu" unable to serve them runs them silently.
"""
from __future__ import annotations

import os

import torch

from . import cpu
from .chunk import wkv7_chunked
from .naive import wkv7_naive, wkv7_step

BACKENDS = ("naive", "chunked", "cpu", "cuda")


def _check(r, others, initial_state):
    if r.dim() != 4:
        raise ValueError(f"wkv7 expects [B, T, H, N] inputs, got r of shape {tuple(r.shape)}")
    for name, x in others.items():
        if x.shape != r.shape:
            raise ValueError(f"wkv7: {name} has shape {tuple(x.shape)}, r has {tuple(r.shape)}; all six must match")
    B, _, H, N = r.shape
    if initial_state is not None and initial_state.shape != (B, H, N, N):
        raise ValueError(f"wkv7: initial_state has shape {tuple(initial_state.shape)}, expected {(B, H, N, N)}")


def _choose(backend, inputs, one_token=False):
    """The backend to run: the one asked for, or the best that serves these inputs; "chunked" (the torch ops)
    where the one asked for cannot serve them."""
    backend = backend or os.environ.get("RWKV_LM_WKV_BACKEND") or "auto"
    if backend not in BACKENDS + ("auto",):
        raise ValueError(f"unknown wkv7 backend {backend!r}; choose one of {BACKENDS} or 'auto'")
    if backend == "cuda" or (backend == "auto" and inputs[0].device.type == "cuda"):
        from . import cuda

        reason = cuda.unusable_reason(*inputs, one_token=one_token)
        if reason and inputs[0].numel():  # (nothing to compute: nothing to say)
            cuda.warn_once(f"wkv7: {reason}; using the torch ops")
        return "chunked" if reason else "cuda"
    if backend in ("cpu", "auto"):
        return "cpu" if cpu.usable(*inputs) else "chunked"  # no gradient, or not built here: torch computes the same
    return backend


def wkv7(r, log_w, k, v, a, b, *, initial_state=None, backend=None):
    """Run the recurrence over a sequence (training and prompt prefill).

    r, log_w, k, v, a, b: [B, T, H, N], any float dtype; log_w is the log of the decay (<= 0).
    initial_state: [B, H, N, N] (value x key) or None for zeros.
    Returns (o [B, T, H, N] in the input dtype, final state [B, H, N, N] in fp32).
    """
    _check(r, dict(log_w=log_w, k=k, v=v, a=a, b=b), initial_state)
    choice = _choose(backend, (r, log_w, k, v, a, b, initial_state))
    if choice == "cuda":
        from . import cuda

        return cuda.wkv7_cuda(r, log_w, k, v, a, b, initial_state=initial_state)
    run = {"naive": wkv7_naive, "chunked": wkv7_chunked, "cpu": cpu.wkv7_cpu}[choice]
    return run(r, log_w, k, v, a, b, initial_state)


def wkv7_one(state, r, log_w, k, v, a, b, *, backend=None):
    """One token for a batch (RNN mode): state [B, H, N, N] fp32; the rest [B, H, N] -> (o [B, H, N], new state)."""
    choice = _choose(backend, (r, log_w, k, v, a, b, state), one_token=True)
    if choice == "cuda":
        from . import cuda

        return cuda.wkv7_one_cuda(state, r, log_w, k, v, a, b)
    if choice == "cpu":
        return cpu.wkv7_one_cpu(state, r, log_w, k, v, a, b)
    return wkv7_step(state, r, log_w, k, v, a, b)


__all__ = ["wkv7", "wkv7_one", "wkv7_naive", "wkv7_chunked", "wkv7_step", "BACKENDS"]
