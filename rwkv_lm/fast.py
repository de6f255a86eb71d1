"""Make a model fast for inference on a CPU without changing its parameter names or what it computes.

One-token steps are matrix-vector products, bound by how fast the weights stream from memory, so the
weights' layout and width matter more than the model code:
- fp32: a Linear weight stored column-major ([in, out] in memory, viewed as the usual [out, in]) lets
  BLAS read it in one pass (the official runtime gets the same by transposing at load time);
- bf16 weights (`weights="bf16"`): Linear weights are kept in bf16 (half the bytes), everything else and
  every activation stays fp32. A step multiplies with a small C kernel (`gemv_bf16.c`, avx512_bf16,
  fp32-accurate in the activations); a prompt goes through oneDNN's bf16 matmul.
"""
from __future__ import annotations

import ctypes
import hashlib
import subprocess
import warnings
from functools import cache
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

KERNEL_SOURCE = Path(__file__).with_name("gemv_bf16.c")
MAX_KERNEL_ROWS = 16  # up to this many rows (a decode step of a batch) use the kernel; more: a matmul
MAX_KERNEL_IN = 16384  # the kernel's MAX_IN: wider inputs take the matmul


@cache
def _kernel():
    """The compiled bf16 matrix-vector kernel, or None (with one warning) where it cannot be built."""
    flags = open("/proc/cpuinfo").read() if Path("/proc/cpuinfo").exists() else ""
    if "avx512_bf16" not in flags:
        return None
    source = KERNEL_SOURCE.read_bytes()
    cache_dir = Path.home() / ".cache" / "rwkv_lm"
    lib = cache_dir / f"gemv_bf16-{hashlib.sha256(source).hexdigest()[:12]}.so"
    try:
        if not lib.exists():
            cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = lib.with_suffix(f".{id(source)}.tmp")
            subprocess.run(["cc", "-O3", "-mavx512f", "-mavx512bf16", "-fopenmp", "-shared", "-fPIC", "-o", str(tmp), str(KERNEL_SOURCE)],
                           check=True, capture_output=True, text=True)
            tmp.replace(lib)
        kernel = ctypes.CDLL(str(lib)).gemv_bf16
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or e
        warnings.warn(f"rwkv_lm: the bf16 CPU kernel could not be built ({str(detail).strip()[:200]}); "
                      "bf16 steps fall back to oneDNN (slower, bf16-rounded activations)")
        return None
    kernel.restype = ctypes.c_int
    kernel.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    return kernel


class BF16Linear(nn.Module):
    """A bias-free Linear with a bf16 weight for fp32 activations (inference only; same `weight` name)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # row-major whatever layout the fp32 weight had: the kernel streams rows
        self.weight = nn.Parameter(linear.weight.detach().to(torch.bfloat16).contiguous(), requires_grad=False)

    def forward(self, x):
        rows = x.numel() // self.in_features
        fits = rows <= MAX_KERNEL_ROWS and self.in_features % 64 == 0 and self.in_features <= MAX_KERNEL_IN
        kernel = _kernel() if fits else None
        if kernel is None:
            return F.linear(x.to(torch.bfloat16), self.weight).to(x.dtype)
        x2 = x.reshape(rows, self.in_features).float().contiguous()
        y = torch.empty(rows, self.out_features)
        if kernel(self.weight.data_ptr(), x2.data_ptr(), y.data_ptr(), self.out_features, self.in_features, rows,
                  torch.get_num_threads()):
            raise RuntimeError(f"gemv_bf16 refused a [{rows}, {self.in_features}] input (out of memory?)")
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)


@torch.no_grad()
def optimize(model: nn.Module, weights: str | None = None) -> nn.Module:
    """Prepare a CPU model for fast inference (in place; returns it). weights="bf16" stores Linear weights in bf16."""
    if weights not in (None, "bf16"):
        raise ValueError(f"weights must be None (keep the model's dtype) or 'bf16', got {weights!r}")
    if next(model.parameters()).device.type != "cpu":
        return model
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear) or child.bias is not None:
                continue
            if weights == "bf16":
                setattr(parent, name, BF16Linear(child))
            elif child.weight.dtype == torch.float32:
                child.weight.data = child.weight.data.t().contiguous().t()
    return model.eval()
