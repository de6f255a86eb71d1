"""The matrix-vector products (fp32, bf16, int8, int4) of two checkouts' cpu_kernels.c in one process: each source built
with the avx512_bf16 level's flags (or --level), B=1 and one thread (or --batch, --threads), the decode step's shapes; the weights rotate
through --memory MB (more than the L3 holds, so each call reads from memory as in a step); 40 interleaved rounds,
medians and the median of the per-round ratios (old / new time). Each weight goes to each side's own kernel for it:
fp32 to gemv_f32_panels on weights in panels where the source has it (else gemv_f32, row-major), bf16 to
gemv_bf16_panels where the source stores bf16 in panels at the level (`bf16_panels`), int8 and int4 to gemv_i8_quads and
gemv_i4_quads on weights in quads where the source has them at the level (else row-major).

    git worktree add --detach /tmp/old main
    python bench/compare_gemv.py /tmp/old . --memory 600   # (an L3 of 480 MB: the Xeon of bench/RESULTS.md)
"""
from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rwkv_lm.ops.cpu_kernels import COMPILE_FLAGS  # noqa: E402
from rwkv_lm.runtime.cpu import quantize_int4, quantize_int8, to_int4_quads, to_panels, to_quads  # noqa: E402

KINDS = {"fp32": lambda w: (w, None), "bf16": lambda w: (w.bfloat16(), None), "int8": quantize_int8, "int4": quantize_int4}
FUNCTIONS = {"fp32": "gemv_f32", "bf16": "gemv_bf16", "int8": "gemv_i8", "int4": "gemv_i4"}
# each kind's other layout, where a source's kernels have it: (its kernel, the (weight, scale) in that layout)
LAID = {"fp32": ("gemv_f32_panels", lambda w, s: (to_panels(w), s)), "bf16": ("gemv_bf16_panels", lambda w, s: (to_panels(w), s)),
        "int8": ("gemv_i8_quads", lambda w, s: (to_quads(w), s)), "int4": ("gemv_i4_quads", to_int4_quads)}
SHAPES = [(65536, 768), (3072, 768), (768, 3072), (768, 768)]  # the head, the channel mix's two, the time mix's


def _lays_out(lib: ctypes.CDLL, kind: str) -> bool:
    """Whether this build stores `kind` in LAID's layout: its kernel is there (bf16: and the level chooses panels)."""
    if not hasattr(lib, LAID[kind][0]):
        return False
    return kind != "bf16" or bool(ctypes.c_int.in_dll(lib, "bf16_panels").value)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--level", default="avx512_bf16", help="whose compile flags (both sides get the same)")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--kinds", default="fp32,bf16,int8,int4", help="weight types, comma-separated")
    parser.add_argument("--batch", type=int, default=1, help="rows of x")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--memory", type=float, default=64, help="MB of weights to rotate through (above the L3)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    libs = {}
    for side in ("old", "new"):
        lib = tmp / f"{side}.so"
        subprocess.run(["cc", "-O3", *COMPILE_FLAGS[args.level], "-fopenmp", "-pthread", "-shared", "-fPIC", "-o", str(lib),
                        str(getattr(args, side) / "rwkv_lm" / "ops" / "cpu_kernels.c"), "-lm"], check=True)
        libs[side] = ctypes.CDLL(str(lib))
    P, I = ctypes.c_void_p, ctypes.c_int64
    torch.manual_seed(0)
    print(f"| {args.level} flags, B={args.batch}, {args.threads} thread(s), {args.rounds} rounds | old median, ms | new median, ms | old / new per round |")
    print("|---|---:|---:|---:|")
    for kind, quantize in KINDS.items():
        if kind not in args.kinds.split(","):
            continue
        for out, inp in SHAPES:
            weights = [quantize(torch.randn(out, inp))]
            while sum(w[0].nbytes for w in weights) < args.memory * 1e6 or len(weights) < 3:
                weights.append(quantize(torch.randn(out, inp)))
            x, y = torch.randn(args.batch, inp), torch.empty(args.batch, out)
            times = {side: [] for side in libs}
            name = {side: LAID[kind][0] if kind in LAID and _lays_out(lib, kind) else FUNCTIONS[kind] for side, lib in libs.items()}
            laid = {side: [LAID[kind][1](w, s) for w, s in weights] if name[side] != FUNCTIONS[kind] else weights
                    for side in libs}
            for r in range(args.rounds):
                for j, side in enumerate(("old", "new") if r % 2 == 0 else ("new", "old")):
                    w, s = laid[side][(2 * r + j) % len(weights)]
                    fn = getattr(libs[side], name[side])
                    scale = () if s is None else (P(s.data_ptr()),)
                    start = time.perf_counter()
                    fn(P(w.data_ptr()), *scale, P(x.data_ptr()), P(y.data_ptr()), I(out), I(inp), I(args.batch), args.threads)
                    times[side].append(time.perf_counter() - start)
            ratios = [o / n for o, n in zip(times["old"], times["new"])]
            print(f"| {kind} {out} x {inp} | {statistics.median(times['old']) * 1e3:.3f} | "
                  f"{statistics.median(times['new']) * 1e3:.3f} | {statistics.median(ratios):.2f} "
                  f"({min(ratios):.2f}-{max(ratios):.2f}) |")


if __name__ == "__main__":
    main()
