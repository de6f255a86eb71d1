"""Two levels of the CPU kernels in one process, interleaved: B=1 decode and a 128-token prompt of the same
0.1B-shaped random model, optimized twice (`optimize(..., weights=W, isa=level)`), 16 steps and one prompt per
side per round, the order swapped every round; prints each side's median and the median of the per-round ratios.
One process keeps both sides on the same memory, the same load and the same moment, which fresh processes
(compare_commits.py) do not on a crowded machine.

    python bench/compare_levels.py --weights int4 --threads 1 --rounds 9 --old avx512 --new avx512_bf16
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import rwkv_lm
from rwkv_lm.runtime.cpu import optimize
from rwkv_lm.testing import random_model


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default="int4", choices=["fp32", "bf16", "int8", "int4"])
    parser.add_argument("--old", default="avx512")
    parser.add_argument("--new", default="avx512_bf16")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = random_model(rwkv_lm.RWKVConfig(vocab_size=65536, n_layer=12, n_embd=768, head_size=64), seed=1)
    weights = None if args.weights == "fp32" else args.weights
    models = {side: optimize(copy.deepcopy(base), weights=weights, isa=level)
              for side, level in (("old", args.old), ("new", args.new))}
    token, prompt = torch.tensor([5]), torch.randint(1, 65536, (1, 128), generator=torch.Generator().manual_seed(0))
    times = {(side, what): [] for side in models for what in ("decode B=1", "prefill 128 tokens")}
    with torch.no_grad():
        states = {side: m.step(token)[1] for side, m in models.items()}
        for r in range(args.rounds):
            for side in (("old", "new") if r % 2 == 0 else ("new", "old")):
                state, start = states[side], time.perf_counter()
                for _ in range(16):
                    _, state = models[side].step(token, state)
                times[side, "decode B=1"].append(16 / (time.perf_counter() - start))
                start = time.perf_counter()
                models[side](prompt, last_only=True)
                times[side, "prefill 128 tokens"].append(128 / (time.perf_counter() - start))
    print(f"| {args.weights}, {args.threads} thread(s), {args.rounds} rounds, tok/s | {args.old} median | {args.new} median "
          "| new / old per round: median (range) |\n|---|---:|---:|---:|")
    for what in ("decode B=1", "prefill 128 tokens"):
        old, new = times["old", what], times["new", what]
        ratios = [n / o for o, n in zip(old, new)]
        print(f"| {what} | {statistics.median(old):.1f} | {statistics.median(new):.1f} | "
              f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}) |")


if __name__ == "__main__":
    main()
