"""The LoRAs' products of a 0.1B model two ways, in one process: the [out, in] row-major tiles every Linear takes
(`gemv_f32`, `gemv_i8` at the avx512 level, where int8 weights meet fp32 inputs as the LoRAs' copies did in
block_step before it had `gemv_cols`) against `gemv_cols` on the [in, out] matrices as the model holds them. The
first matrices (C -> rank) and the second (rank -> C), fp32 and int8, 33 rows of x (a follow-up turn's prompt) and
one (a decode step); calls interleaved, weights hot in cache, medians.

    python bench/lora_products.py --threads 2
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from rwkv_lm.ops.cpu_kernels import LEVELS, WEIGHT_TYPES, cpu_level, kernels  # noqa: E402
from rwkv_lm.runtime.cpu import quantize_int8  # noqa: E402

C, RANKS = 768, {"w": 64, "a": 64, "v": 32, "g": 128}  # the 0.1B shape's width and LoRA ranks


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args()
    if "avx512" not in LEVELS or LEVELS.index(cpu_level()) < LEVELS.index("avx512"):
        raise SystemExit(f"this compares the avx512 level's row-major tiles: this CPU runs up to {cpu_level()}")
    rows_kernels, cols = kernels("avx512"), kernels()["gemv_cols"]
    torch.manual_seed(0)
    print("| matrix | in x out | rows of x | fp32 [out, in] us | fp32 [in, out] us | int8 [out, in] us | int8 [in, out] us |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, rank in RANKS.items():
        for which, (n_in, n_out) in (("1", (C, rank)), ("2", (rank, C))):
            weight = torch.randn(n_in, n_out)  # [in, out], as the model holds it
            q, scale = quantize_int8(weight.t())
            by_rows = {"fp32": weight.t().contiguous(), "int8": q}
            by_cols = {"fp32": weight, "int8": q.t().contiguous()}
            for rows in (33, 1):
                x, y = torch.randn(rows, n_in), torch.empty(rows, n_out)
                calls = {
                    "fp32 rows": lambda: rows_kernels["gemv_f32"](by_rows["fp32"].data_ptr(), x.data_ptr(), y.data_ptr(),
                                                                  n_out, n_in, rows, args.threads),
                    "fp32 cols": lambda: cols(by_cols["fp32"].data_ptr(), None, WEIGHT_TYPES["float32"], x.data_ptr(),
                                              y.data_ptr(), n_out, n_in, rows, args.threads),
                    "int8 rows": lambda: rows_kernels["gemv_i8"](by_rows["int8"].data_ptr(), scale.data_ptr(), x.data_ptr(),
                                                                 y.data_ptr(), n_out, n_in, rows, args.threads),
                    "int8 cols": lambda: cols(by_cols["int8"].data_ptr(), scale.data_ptr(), WEIGHT_TYPES["int8"],
                                              x.data_ptr(), y.data_ptr(), n_out, n_in, rows, args.threads),
                }
                times = {k: [] for k in calls}
                for _ in range(args.calls):
                    for k, call in calls.items():
                        start = time.perf_counter_ns()
                        call()
                        times[k].append(time.perf_counter_ns() - start)
                us = {k: statistics.median(v) / 1000 for k, v in times.items()}
                print(f"| {name}{which} | {n_in} x {n_out} | {rows} | {us['fp32 rows']:.1f} | {us['fp32 cols']:.1f} | "
                      f"{us['int8 rows']:.1f} | {us['int8 cols']:.1f} |")


if __name__ == "__main__":
    main()
