"""The C kernels of `cpu_kernels.c`, compiled at first use for the instruction sets this CPU reports.

Used by `rwkv_lm.fast` (matrix-vector products and whole decode steps of a block) and `rwkv_lm.ops.wkv7.cpu`
(the recurrence). The level they are built for is the best this CPU has (`cpu_level`), capped by the
environment variable RWKV_LM_CPU_ISA (one of LEVELS), read at each call, so one machine can run and test
every level below its own. Where a level has no kernels or the build fails (one warning), `kernels()` is
empty and callers use torch.
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
LEVELS = ("generic", "avx2", "avx512", "avx512_bf16")  # each level has what the ones before it have
ISA_ENV = "RWKV_LM_CPU_ISA"
# the /proc/cpuinfo flags a level needs, and the compiler flags it is built with (None: no kernels at that level)
LEVEL_FLAGS = {"avx2": {"avx2", "fma"}, "avx512": {"avx512f"}, "avx512_bf16": {"avx512_bf16"}}
COMPILE_FLAGS = {"generic": None, "avx2": None, "avx512": ["-mavx512f"], "avx512_bf16": ["-mavx512f", "-mavx512bf16"]}

_POINTER, _INT64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
SIGNATURES = {
    "gemv_f32": [_POINTER] * 3 + [_INT64] * 3 + [_INT],
    "gemv_bf16": [_POINTER] * 3 + [_INT64] * 3 + [_INT],
    "wkv7_f32": [_POINTER] * 9 + [_INT64] * 4 + [_INT],
    "block_step_f32": [_POINTER] * 10 + [_INT64] * 8 + [ctypes.c_float] * 3 + [_INT] * 2,
}


@cache
def cpu_level() -> str:
    """The best level of LEVELS this CPU runs (its /proc/cpuinfo flags; generic where they cannot be read)."""
    cpuinfo = Path("/proc/cpuinfo")
    flags = set(cpuinfo.read_text().split()) if cpuinfo.exists() else set()
    level = "generic"
    for candidate in LEVELS[1:]:
        if not LEVEL_FLAGS[candidate] <= flags:
            break
        level = candidate
    return level


def isa_level() -> str:
    """The level the kernels are built for now: this CPU's, or the cap RWKV_LM_CPU_ISA sets if it is lower."""
    cap = os.environ.get(ISA_ENV, "").strip().lower()
    if not cap:
        return cpu_level()
    if cap not in LEVELS:
        raise ValueError(f"{ISA_ENV}={cap!r} is not a level of the CPU kernels: use one of {', '.join(LEVELS)} "
                         "(or leave it unset for the best this CPU has)")
    return min(cap, cpu_level(), key=LEVELS.index)


def kernels() -> dict:
    """The compiled C kernels by name at the current `isa_level()`: none at a level without kernels or where
    the build fails (with one warning)."""
    return _build(isa_level())


@cache
def _build(level: str) -> dict:
    if COMPILE_FLAGS[level] is None:
        return {}
    command = ["cc", "-O3", *COMPILE_FLAGS[level], "-fopenmp", "-shared", "-fPIC"]
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
        warnings.warn(f"rwkv_lm: the CPU kernels ({level}) could not be built ({str(detail).strip()[:200]}); "
                      "using torch ops instead (slower; bf16 weights: bf16-rounded activations)")
        return {}
    found = {}
    for name, argtypes in SIGNATURES.items():
        kernel = getattr(library, name, None)  # gemv_bf16 exists only where the level has avx512_bf16
        if kernel is not None:
            kernel.restype, kernel.argtypes = ctypes.c_int, argtypes
            found[name] = kernel
    return found
