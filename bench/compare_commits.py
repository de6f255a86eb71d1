"""Two checkouts of rwkv_lm side by side on the CPU: prefill and decode of the same 0.1B-shaped random model,
each round in fresh processes, the order swapped every round; prints each number's median and the median of
the per-round ratios (new / old), which is what survives a noisy machine.

    git worktree add /tmp/old <commit>
    python bench/compare_commits.py /tmp/old . --rounds 5
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
import json, sys, time, torch, rwkv_lm
torch.set_num_threads(int(sys.argv[2]))
m = rwkv_lm.load(sys.argv[1])
g = torch.Generator().manual_seed(0)
out = {}
with torch.no_grad():
    toks = torch.randint(1, m.config.vocab_size, (1, 128), generator=g)
    m(toks[:, :8], last_only=True)
    t = time.perf_counter(); m(toks, last_only=True); out["prefill 128 tokens, s"] = time.perf_counter() - t
    for B in (1, 16):
        tok = torch.randint(1, m.config.vocab_size, (B,), generator=g)
        _, state = m.step(tok, None)
        t = time.perf_counter()
        for _ in range(16):
            _, state = m.step(tok, state)
        out[f"decode B={B}, tok/s"] = 16 * B / (time.perf_counter() - t)
print(json.dumps(out))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    sys.path.insert(0, str(args.new.resolve()))
    import rwkv_lm
    from rwkv_lm.testing import random_model

    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "m.safetensors"
        rwkv_lm.save(random_model(rwkv_lm.RWKVConfig(vocab_size=65536, n_layer=12, n_embd=768, head_size=64), seed=1), model)
        sides = {"old": args.old.resolve(), "new": args.new.resolve()}
        results = {side: [] for side in sides}
        for r in range(args.rounds):
            for side in (list(sides) if r % 2 == 0 else list(reversed(sides))):
                env = dict(os.environ, PYTHONPATH=str(sides[side]))
                done = subprocess.run([sys.executable, "-c", TIMING, str(model), str(args.threads)], env=env,
                                      capture_output=True, text=True, check=True)
                results[side].append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"| {args.rounds} rounds, {args.threads} threads | old median | new median | new / old per round: median (range) |")
    print("|---|---:|---:|---:|")
    for key in results["old"][0]:
        ratios = [n[key] / o[key] for o, n in zip(results["old"], results["new"])]
        print(f"| {key} | {statistics.median(x[key] for x in results['old']):.3g} | "
              f"{statistics.median(x[key] for x in results['new']):.3g} | {statistics.median(ratios):.3f} "
              f"({min(ratios):.2f}-{max(ratios):.2f}) |")


if __name__ == "__main__":
    main()
