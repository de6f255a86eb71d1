"""The C kernels of `cpu_kernels.c`, compiled at first use for the instruction sets this CPU reports.

Used by `rwkv_lm.runtime.cpu` (matrix-vector products and whole steps of a block, at the level chosen when a
model is prepared) and `rwkv_lm.ops.wkv7.cpu` (the recurrence). The level is the best this CPU has
(`cpu_level`), capped by an argument or, where none is given, by the environment variable RWKV_LM_CPU_ISA
(one of LEVELS), so one machine can run and test every level below its own. Where the build fails (no C compiler: one warning), `kernels()` is empty and
callers use torch.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import warnings
from functools import cache
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_kernels.c")
ISA_ENV = "RWKV_LM_CPU_ISA"
# each level has what the ones before it have; generic is the source as plain C for the architecture's baseline
# (SSE2 on x86-64), the others add the /proc/cpuinfo flags they need and the compiler flags they are built with
if platform.machine() in ("aarch64", "arm64"):
    LEVELS = ("generic", "neon")
    LEVEL_FLAGS = {"neon": {"asimd"}}
    COMPILE_FLAGS = {"generic": ["-march=armv8-a+nosimd"], "neon": []}
else:
    # (every CPU with avx512_bf16 has VNNI too: Cooper Lake, Sapphire Rapids, Zen 4; every one with AMX has both)
    LEVELS = ("generic", "avx2", "avx512", "avx512_vnni", "avx512_bf16", "amx")
    LEVEL_FLAGS = {"avx2": {"avx2", "fma"}, "avx512": {"avx512f"}, "avx512_vnni": {"avx512_vnni"},
                   "avx512_bf16": {"avx512_bf16"}, "amx": {"amx_tile", "amx_bf16", "amx_int8"}}
    COMPILE_FLAGS = {"generic": [], "avx2": ["-mavx2", "-mfma"], "avx512": ["-mavx512f", "-mfma"],
                     "avx512_vnni": ["-mavx512f", "-mfma", "-mavx512vnni"],
                     "avx512_bf16": ["-mavx512f", "-mfma", "-mavx512vnni", "-mavx512bf16"],
                     "amx": ["-mavx512f", "-mfma", "-mavx512vnni", "-mavx512bf16", "-mamx-tile", "-mamx-bf16",
                             "-mamx-int8"]}

# the C side's interface: what it exports, its argument types, and the limits and parameter order it is
# checked against when it loads (cpu_kernels.c's rows_per_pass, int4_group, panel_width and block_step_params)
ROWS_PER_PASS = 64  # rows of x per pass over the weights; more run in several passes
INT4_GROUP = 64  # inputs of a row that share one scale in int4 weights
PANEL = 64  # outputs a panel of fp32 or bf16 weights holds: [out, in] stored as [ceil(out / PANEL), in, PANEL]
# inputs of a row of activations that share one int8 scale where the int4 and int8 products quantize them (levels
# from avx2: `Kernels.int8_activations`); the int4 kernel reads one weight group per activation group
ACT_GROUP = INT4_GROUP
INT4_BLOCK = 32  # inputs packed into 16 bytes: byte j holds input j (low nibble) and input j + 16 (high nibble)
QUAD_ROWS = 16  # rows of int8 and int4 weights a block of quads holds (runtime.cpu.to_quads, to_int4_quads)
# the C enum of weight types, by torch dtype name: int4 weights are stored packed, two to a uint8; fp32 and bf16
# weights in panels (runtime.cpu.to_panels) are "float32_panels" and "bfloat16_panels", int8 and int4 ones in quads
# "int8_quads" and "int4_quads"
WEIGHT_TYPES = {"float32": 0, "bfloat16": 1, "int8": 2, "uint8": 3, "float32_panels": 4, "int8_quads": 5, "int4_quads": 6,
                "bfloat16_panels": 7}
# the pointers block_step takes, in this order; a name the block lacks (ln0, v0 ... after the first, the int8
# scales of other types) is passed as NULL
BLOCK_STEP_PARAMS = (
    "ln0.weight", "ln0.bias", "ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias",
    *(f"att.{name}" for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "w1", "w2", "a0", "a1", "a2",
                                 "v0", "v1", "v2", "g1", "g2", "k_k", "k_a", "r_k")),
    "att.receptance.weight", "att.key.weight", "att.value.weight", "att.output.weight", "att.ln_x.weight", "att.ln_x.bias",
    "ffn.x_k", "ffn.key.weight", "ffn.value.weight",
    *(f"{name}.scale" for name in ("att.receptance", "att.key", "att.value", "att.output", "ffn.key", "ffn.value")),
    # a quantized model's LoRAs go in as int8 copies (in the slots of att.w1 ...) with one scale per output here;
    # the copies are the StepPlan's, not the module's
    *(f"att.{name}_scale" for name in ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2")),
)
LEVEL_KERNELS = {"gemv_i8_quads", "gemv_i4_quads"}  # kernels only some levels build (weights in quads: x86 from avx2)
_POINTER, _INT64, _INT, _FLOAT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
SIGNATURES = {
    "gemv_f32": [_POINTER] * 3 + [_INT64] * 3 + [_INT],
    "gemv_f32_panels": [_POINTER] * 3 + [_INT64] * 3 + [_INT],
    "gemv_bf16": [_POINTER] * 3 + [_INT64] * 3 + [_INT],
    "gemv_bf16_panels": [_POINTER] * 3 + [_INT64] * 3 + [_INT],
    "gemv_i8": [_POINTER] * 4 + [_INT64] * 3 + [_INT],
    "gemv_i4": [_POINTER] * 4 + [_INT64] * 3 + [_INT],
    "gemv_i8_quads": [_POINTER] * 4 + [_INT64] * 3 + [_INT],
    "gemv_i4_quads": [_POINTER] * 4 + [_INT64] * 3 + [_INT],
    "gemv_cols": [_POINTER] * 2 + [_INT] + [_POINTER] * 2 + [_INT64] * 3 + [_INT],
    "wkv7_f32": [_POINTER] * 9 + [_INT64] * 4 + [_INT],
    "block_step": [_POINTER] * 10 + [_INT64] * 9 + [_FLOAT] * 3 + [_INT] * 2,
    "model_step": ([_INT64] + [_POINTER] * 4 + [_INT64] + [_FLOAT] * 3 + [_POINTER, _INT64, _INT64] + [_POINTER] * 8 + [_FLOAT]
                   + [_POINTER] * 2 + [_INT, _INT64, _POINTER, _INT]),
    "layer_norm": [_POINTER] * 4 + [_INT64] * 2 + [_FLOAT, _INT],
    "mask_logits": [_POINTER] * 2 + [_INT64] * 3,
}


@cache
def cpu_flags() -> frozenset[str]:
    """This CPU's /proc/cpuinfo flags (none where it cannot be read)."""
    cpuinfo = Path("/proc/cpuinfo")
    return frozenset(cpuinfo.read_text().split()) if cpuinfo.exists() else frozenset()


@cache
def cpu_level() -> str:
    """The best level of LEVELS this CPU runs (its /proc/cpuinfo flags; generic where they cannot be read)."""
    flags = cpu_flags()
    level = "generic"
    for candidate in LEVELS[1:]:
        if not LEVEL_FLAGS[candidate] <= flags:
            break
        level = candidate
    return level


def isa_level(cap: str | None = None) -> str:
    """The level to build the kernels for: this CPU's, or `cap` if it is lower; without a cap, the one the
    environment variable RWKV_LM_CPU_ISA sets (the only place it is read)."""
    given = cap is not None
    cap = (cap if given else os.environ.get(ISA_ENV, "")).strip().lower()
    if not cap:
        return cpu_level()
    if cap not in LEVELS:
        source = f"isa={cap!r}" if given else f"{ISA_ENV}={cap!r}"
        raise ValueError(f"{source} is not a level of the CPU kernels: use one of {', '.join(LEVELS)} "
                         "(or leave it unset for the best this CPU has)")
    return min(cap, cpu_level(), key=LEVELS.index)


class Kernels(dict):
    """The C functions by name, and the build they come from: its level, vector width (floats per register),
    whether its int4 and int8 products quantize the activations to int8 (`round_activations`) to multiply in
    integers (the x86 levels from avx2), whether its bf16 and int8 products run on AMX's tiles (the amx level, where
    Linux lends them), and whether bf16 weights are stored in panels (the levels without a bf16 dot product)."""

    def __init__(self, functions: dict, level: str, vector_width: int, int8_activations: bool, amx_tiles: bool,
                 bf16_panels: bool):
        super().__init__(functions)
        self.level, self.vector_width, self.int8_activations = level, vector_width, int8_activations
        self.amx_tiles, self.bf16_panels = amx_tiles, bf16_panels

    @property
    def int8_quads(self) -> bool:
        """Whether int8 weights are stored in quads here (`gemv_i8_quads`): where integer products take them, not AMX."""
        return self.int8_activations and not self.amx_tiles

    @property
    def int4_quads(self) -> bool:
        """Whether int4 weights are stored in quads here (`gemv_i4_quads`): where integer products take them."""
        return self.int8_activations


def kernels(level: str | None = None) -> dict:
    """The compiled C kernels by name at `level` (default: `isa_level()`), as a `Kernels`: none where the build
    fails (with one warning)."""
    return _build(level or isa_level())


@cache
def _build(level: str) -> dict:
    # a compiler older than the CPU (AMX needs GCC 11 or clang 12) builds the level below instead, with a warning
    why = {}
    for built in reversed(LEVELS[:LEVELS.index(level) + 1]):
        library, why[built] = _compile(built)
        if library is not None:
            break
    else:
        warnings.warn(f"rwkv_lm: the CPU kernels ({level}) could not be built ({why[level].strip()[:200]}); "
                      "using torch ops instead (slower; bf16 weights: bf16-rounded activations)")
        return {}
    if built != level:
        warnings.warn(f"rwkv_lm: the CPU kernels could not be built for {level} ({why[level].strip()[:200]}); "
                      f"built for {built} instead")
    _check_interface(library)
    found = {}
    for name, argtypes in SIGNATURES.items():
        if name in LEVEL_KERNELS and not hasattr(library, name):
            continue
        kernel = found[name] = getattr(library, name)
        kernel.restype, kernel.argtypes = ctypes.c_int, argtypes
    int8_activations, bf16_panels = (bool(ctypes.c_int.in_dll(library, flag).value)
                                     for flag in ("int8_activations", "bf16_panels"))
    return Kernels(found, built, ctypes.c_int.in_dll(library, "vector_width").value, int8_activations,
                   bool(library.amx_tiles()), bf16_panels)


def _compile(level: str) -> tuple[ctypes.CDLL | None, str]:
    """The kernels built for `level` and loaded (cached by source and command), or None and why not."""
    source = SOURCE.read_bytes()
    cache_dir = Path.home() / ".cache" / "rwkv_lm"
    base = ["cc", "-O3", *COMPILE_FLAGS[level], "-pthread", "-shared", "-fPIC"]
    # OpenMP where the compiler has it (the main thread's loops share torch's threads); without it (Apple's clang)
    # the kernels' own threads run every loop
    for command in (base + ["-fopenmp"], base):
        lib = cache_dir / f"cpu_kernels-{hashlib.sha256(source + ' '.join(command).encode()).hexdigest()[:12]}.so"
        try:
            if not lib.exists():
                cache_dir.mkdir(parents=True, exist_ok=True)
                tmp = lib.with_suffix(f".{os.getpid()}.tmp")  # processes sharing the cache never write one file
                subprocess.run(command + ["-o", str(tmp), str(SOURCE), "-lm"], check=True, capture_output=True, text=True)
                tmp.replace(lib)
            return ctypes.CDLL(str(lib)), ""
        except (OSError, subprocess.CalledProcessError) as e:
            detail = getattr(e, "stderr", "") or str(e)
    return None, detail


def _check_interface(library):
    """The C and this module must agree on the limits and the parameter order (a mismatch would misread memory)."""
    names = ctypes.cast(ctypes.addressof(ctypes.c_char.in_dll(library, "block_step_params")), ctypes.c_char_p).value
    rows_per_pass = ctypes.c_int.in_dll(library, "rows_per_pass").value
    int4_group = ctypes.c_int.in_dll(library, "int4_group").value
    panel_width = ctypes.c_int.in_dll(library, "panel_width").value
    quad_rows = ctypes.c_int.in_dll(library, "quad_rows").value
    layouts = ("f32_panels", "i8_quads", "i4_quads", "bf16_panels")
    types = tuple(ctypes.c_int.in_dll(library, f"{name}_type").value for name in layouts)
    if (tuple(names.decode().split()) != BLOCK_STEP_PARAMS
            or types != tuple(WEIGHT_TYPES[name] for name in ("float32_panels", "int8_quads", "int4_quads",
                                                                "bfloat16_panels"))
            or (rows_per_pass, int4_group, panel_width, quad_rows) != (ROWS_PER_PASS, INT4_GROUP, PANEL, QUAD_ROWS)):
        raise RuntimeError(f"{SOURCE.name} and {Path(__file__).name} disagree on the block step's parameters, "
                           f"ROWS_PER_PASS ({rows_per_pass} in C, {ROWS_PER_PASS} here), INT4_GROUP ({int4_group} in C, "
                           f"{INT4_GROUP} here), PANEL ({panel_width} in C, {PANEL} here), QUAD_ROWS ({quad_rows} "
                           f"in C, {QUAD_ROWS} here) or the weight types' numbers (F32_PANELS, I8_QUADS, I4_QUADS and BF16_PANELS {types} in C): "
                           "change both together")


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """quantize_int4's (packed [out, in / 2], scale [out, in / INT4_GROUP]) -> the fp32 weight [out, in] they stand for."""
    out = packed.shape[0]
    blocks = packed.reshape(out, -1, 1, INT4_BLOCK // 2)
    nibbles = torch.cat([blocks & 15, blocks >> 4], 2).reshape(out, -1, INT4_GROUP).float() - 8
    return (nibbles * scale.float()[..., None]).reshape(out, -1)


def round_activations(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x [..., in] (in a multiple of ACT_GROUP) as the int4 and int8 products see it where they quantize activations:
    each group of ACT_GROUP inputs in int8 steps of its largest magnitude / 127, rounded to nearest even, as the C
    computes it (fp32 division and product); returned in `dtype` (float64: exactly the values the kernels multiply)."""
    groups = x.float().reshape(*x.shape[:-1], -1, ACT_GROUP)
    amax = groups.abs().amax(-1, keepdim=True)
    steps = amax.new_tensor(127.0)  # (a tensor: torch takes a Python number over a tensor as its reciprocal times it)
    q = torch.round(groups * torch.where(amax > 0, steps / amax, 0))
    return (q.to(dtype) * (amax / steps).to(dtype)).reshape(x.shape)
