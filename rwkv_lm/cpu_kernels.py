"""The C kernels of `cpu_kernels.c`, compiled at first use with the instruction sets this CPU reports.

Used by `rwkv_lm.fast` (matrix-vector products and whole decode steps of a block) and `rwkv_lm.ops.wkv7.cpu`
(the recurrence).
Where the CPU lacks avx512f or the build fails (one warning), `kernels()` is empty and callers use torch.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import warnings
from functools import cache
from pathlib import Path

SOURCE = Path(__file__).with_name("cpu_kernels.c")

_POINTER, _INT64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
SIGNATURES = {
    "gemv_f32": [_POINTER] * 3 + [_INT64] * 3 + [_INT],
    "gemv_bf16": [_POINTER] * 3 + [_INT64] * 3 + [_INT],
    "wkv7_f32": [_POINTER] * 9 + [_INT64] * 4 + [_INT],
    "block_step_f32": [_POINTER] * 10 + [_INT64] * 8 + [ctypes.c_float] * 3 + [_INT] * 2,
}


@cache
def kernels() -> dict:
    """The compiled C kernels by name: those the CPU can run, none (with one warning) where the build fails."""
    cpuinfo = Path("/proc/cpuinfo")
    flags = set(cpuinfo.read_text().split()) if cpuinfo.exists() else set()
    if "avx512f" not in flags:
        return {}
    isa = ["-mavx512f"] + (["-mavx512bf16"] if "avx512_bf16" in flags else [])
    command = ["cc", "-O3", *isa, "-fopenmp", "-shared", "-fPIC"]
    source = SOURCE.read_bytes()
    cache_dir = Path.home() / ".cache" / "rwkv_lm"
    lib = cache_dir / f"cpu_kernels-{hashlib.sha256(source + ' '.join(command).encode()).hexdigest()[:12]}.so"
    try:
        if not lib.exists():
            cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = lib.with_suffix(f".{os.getpid()}.tmp")  # processes sharing the cache never write one file
            subprocess.run(command + ["-o", str(tmp), str(SOURCE), "-lm"], check=True, capture_output=True, text=True)
            tmp.replace(lib)
        library = ctypes.CDLL(str(lib))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or e
        warnings.warn(f"rwkv_lm: the CPU kernels could not be built ({str(detail).strip()[:200]}); "
                      "using torch ops instead (slower; bf16 weights: bf16-rounded activations)")
        return {}
    found = {}
    for name, argtypes in SIGNATURES.items():
        kernel = getattr(library, name, None)  # gemv_bf16 exists only where the CPU has avx512_bf16
        if kernel is not None:
            kernel.restype, kernel.argtypes = ctypes.c_int, argtypes
            found[name] = kernel
    return found
