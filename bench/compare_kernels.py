"""Two versions of cpu_kernels.c under one process and this checkout's Python: decode steps of the same 0.1B-shaped
random model, the kernels swapped between rounds, the order alternating; prints each side's median time a step
and the median (range) of the per-round ratios old / new (> 1: new is faster). One model in one memory for both
sides, many short rounds: steadier on a noisy machine than compare_commits.py's fresh processes, but only for
changes to the C (both sides run this checkout's Python). --thread steps the model in a thread of its own, as the
serving engine does, with the model loaded in the main thread.

    git worktree add --detach /tmp/old main
    python bench/compare_kernels.py /tmp/old/rwkv_lm/ops/cpu_kernels.c rwkv_lm/ops/cpu_kernels.c --weights fp32 int4
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import rwkv_lm  # noqa: E402
from rwkv_lm.ops import cpu_kernels  # noqa: E402
from rwkv_lm.runtime.cpu import optimize  # noqa: E402
from rwkv_lm.testing import random_model  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path, help="a cpu_kernels.c")
    parser.add_argument("new", type=Path, help="another")
    parser.add_argument("--weights", nargs="+", default=["fp32"], choices=["fp32", "bf16", "int8", "int4"])
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--batches", type=int, nargs="+", default=[1], help="decode batch sizes")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--steps", type=int, default=16, help="decode steps a round")
    parser.add_argument("--thread", action="store_true", help="step in another thread than the main one")
    parser.add_argument("--prefill", type=int, default=0, metavar="N",
                        help="time prompts of N tokens a row (model(tokens, last_only=True)) instead of decode steps")
    args = parser.parse_args()
    level = cpu_kernels.isa_level()
    builds = {}
    for side in ("old", "new"):  # each source built as the package builds its own (cached by its hash)
        cpu_kernels.SOURCE = getattr(args, side).resolve()
        builds[side] = cpu_kernels._build.__wrapped__(level)
        if not builds[side]:
            raise SystemExit(f"the {side} kernels ({cpu_kernels.SOURCE}) did not build")

    def use(side):  # every caller looks its kernels up through _build at each call
        cpu_kernels._build = lambda _level: builds[side]

    use("new")
    base = random_model(rwkv_lm.RWKVConfig(vocab_size=65536, n_layer=12, n_embd=768, head_size=64), seed=1).eval()
    where = "another thread" if args.thread else "the main thread"
    what = f"prompts of {args.prefill} tokens" if args.prefill else "steps"
    print(f"| {level} level, {where}, {args.rounds} rounds of {args.steps} {what} | old, ms each | new, ms each | "
          "old / new per round |")
    print("|---|---:|---:|---:|")
    for weights in args.weights:
        model = optimize(copy.deepcopy(base), weights=None if weights == "fp32" else weights)
        for threads in args.threads:
            torch.set_num_threads(threads)
            for batch in args.batches:
                shape = (batch, args.prefill) if args.prefill else (batch,)
                tokens = torch.randint(1, base.config.vocab_size, shape, generator=torch.Generator().manual_seed(0))
                times = {"old": [], "new": []}

                def measure():
                    torch.set_num_threads(threads)  # (torch's setting is the calling thread's)
                    with torch.no_grad():
                        state = None if args.prefill else model.step(tokens, None)[1]
                        for r in range(args.rounds + 1):
                            for side in ("old", "new") if r % 2 == 0 else ("new", "old"):
                                use(side)
                                start = time.perf_counter()
                                for _ in range(args.steps):
                                    if args.prefill:
                                        model(tokens, last_only=True)
                                    else:
                                        _, state = model.step(tokens, state)
                                if r:  # (round 0 warms both up)
                                    times[side].append((time.perf_counter() - start) / args.steps)

                if args.thread:
                    stepper = threading.Thread(target=measure)
                    stepper.start(), stepper.join()
                else:
                    measure()
                ratios = [o / n for o, n in zip(times["old"], times["new"])]
                print(f"| {weights}, {threads} thread{'s' if threads > 1 else ''}, B={batch} | "
                      f"{statistics.median(times['old']) * 1e3:.2f} | {statistics.median(times['new']) * 1e3:.2f} | "
                      f"{statistics.median(ratios):.3f} ({min(ratios):.2f}-{max(ratios):.2f}) |", flush=True)


if __name__ == "__main__":
    main()
