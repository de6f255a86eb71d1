"""Two checkouts of rwkv_lm side by side on the CPU: prefill and decode of the same 0.1B-shaped random model,
each round in fresh processes, the order swapped every round; prints each number's median and the median of
the per-round ratios (new / old), which is what survives a noisy machine. With --weights, each round runs every
precision (`optimize(model, weights=...)` after the load) and --threads every thread count, all interleaved.

    git worktree add /tmp/old <commit>
    python bench/compare_commits.py /tmp/old . --rounds 5
    python bench/compare_commits.py /tmp/old . --rounds 9 --weights fp32 bf16 int8 int4 --threads 1 2 --decode 64 --batches 1
    python bench/compare_commits.py /tmp/old . --rounds 12 --weights int8 --prompt 33 --prompt-seconds 5 --batches

--prompt-seconds S reads the prompt again and again for S seconds in a thread of its own, as the serving engine
reads a follow-up turn (its loops on the kernels' own workers, not OpenMP's): a mean over hundreds of reads, where
the best of 3 reads swings with the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

# run inside each checkout: load the model (the fast path both versions give by default) and time it
TIMING = r"""
import json, sys, threading, time, torch, rwkv_lm
torch.set_num_threads(int(sys.argv[2]))
m = rwkv_lm.load(sys.argv[1])
if sys.argv[3] != "fp32":
    from rwkv_lm.runtime.cpu import optimize
    optimize(m, weights=sys.argv[3])
steps = int(sys.argv[4])
g = torch.Generator().manual_seed(0)
out = {}
with torch.no_grad():
    prompt, seconds = int(sys.argv[6]), float(sys.argv[7])
    toks = torch.randint(1, m.config.vocab_size, (1, prompt), generator=g)
    _, state = m(toks[:, :8], last_only=True)
    # a follow-up turn's shape: the prompt read after a state
    if seconds:  # reads for `seconds` in a thread of its own, as the serving engine's
        def reads():
            with torch.no_grad():
                n, start = 0, time.perf_counter()
                while time.perf_counter() < start + seconds:
                    m(toks, state, last_only=True)
                    n += 1
                out[f"prefill {prompt} tokens, {seconds:g} s in a thread, tok/s"] = n * prompt / (time.perf_counter() - start)
        reader = threading.Thread(target=reads)
        reader.start()
        reader.join()
    else:  # the best of 3 reads: one alone is too short to time
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter(); m(toks, state, last_only=True); best = min(best, time.perf_counter() - t)
        out[f"prefill {prompt} tokens, tok/s"] = prompt / best
    for B in json.loads(sys.argv[5]):
        tok = torch.randint(1, m.config.vocab_size, (B,), generator=g)
        _, state = m.step(tok, None)
        t = time.perf_counter()
        for _ in range(steps):
            _, state = m.step(tok, state)
        out[f"decode B={B}, tok/s"] = steps * B / (time.perf_counter() - t)
out["module"] = rwkv_lm.__file__
print(json.dumps(out))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, nargs="+", default=[2])
    parser.add_argument("--weights", nargs="+", default=["fp32"], choices=["fp32", "bf16", "int8", "int4"])
    parser.add_argument("--decode", type=int, default=16, help="decode steps timed per batch size")
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 16], help="decode batch sizes (none: no decode)")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens read after a state (best of 3 reads)")
    parser.add_argument("--prompt-seconds", type=float, default=0,
                        help="read the prompt for this long in a second thread instead (the mean of the reads)")
    args = parser.parse_args()
    sys.path.insert(0, str(args.new.resolve()))
    import rwkv_lm
    from rwkv_lm.testing import random_model

    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "m.safetensors"
        rwkv_lm.save(random_model(rwkv_lm.RWKVConfig(vocab_size=65536, n_layer=12, n_embd=768, head_size=64), seed=1), model)
        sides = {"old": args.old.resolve(), "new": args.new.resolve()}
        cases = [(w, n) for n in args.threads for w in args.weights]
        results = {(side, case): [] for side in sides for case in cases}
        for r in range(args.rounds):
            for case in cases:
                for side in (list(sides) if r % 2 == 0 else list(reversed(sides))):
                    # (run from the checkout: `python -c` puts the working directory before PYTHONPATH)
                    env = dict(os.environ, PYTHONPATH=str(sides[side]))
                    done = subprocess.run([sys.executable, "-c", TIMING, str(model), str(case[1]), case[0], str(args.decode),
                                           json.dumps(args.batches), str(args.prompt), str(args.prompt_seconds)],
                                          env=env, cwd=sides[side], capture_output=True, text=True, check=True)
                    timings = json.loads(done.stdout.strip().splitlines()[-1])
                    if not Path(timings.pop("module")).is_relative_to(sides[side]):
                        raise SystemExit(f"the {side} side imported rwkv_lm from outside {sides[side]}")
                    results[side, case].append(timings)
    print(f"| {args.rounds} rounds: weights, threads, measure | old median | new median | new / old per round: median (range) |")
    print("|---|---:|---:|---:|")
    for case in cases:
        old, new = results["old", case], results["new", case]
        for key in old[0]:
            ratios = [n[key] / o[key] for o, n in zip(old, new)]
            print(f"| {case[0]}, {case[1]} thread{'s' if case[1] > 1 else ''}, {key} | "
                  f"{statistics.median(x[key] for x in old):.3g} | {statistics.median(x[key] for x in new):.3g} | "
                  f"{statistics.median(ratios):.3f} ({min(ratios):.2f}-{max(ratios):.2f}) |")

if __name__ == "__main__":
    main()
