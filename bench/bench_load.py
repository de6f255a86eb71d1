"""Loading a model file: seconds, resident memory after, and the process's peak, each load in a fresh process.
Given two checkouts, both run in turn (rounds alternate which goes first) and the table gives medians.

    python bench/bench_load.py MODEL                       # this checkout, fp32
    python bench/bench_load.py MODEL --weights fp32 int8 --old /tmp/old --rounds 3

MODEL: any file `rwkv_lm.load` takes (bench/bench_cpu.py's --save writes a 0.1B-shaped random one). Memory is
/proc's (Linux): VmRSS after the load, of it the RssAnon the load added (the process's own, not mapped files), and
VmHWM, the peak.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

LOAD = r"""
import json, sys, time
import rwkv_lm
def status():
    s = open("/proc/self/status").read()
    return {k: int(s.split(k + ":")[1].split()[0]) / 1024 for k in ("VmRSS", "RssAnon", "VmHWM")}
before = status()
start = time.perf_counter()
model = rwkv_lm.load(sys.argv[1], weights=None if sys.argv[2] == "fp32" else sys.argv[2])
seconds = time.perf_counter() - start
after = status()
print(json.dumps({"s": seconds, "rss": after["VmRSS"], "anon": after["RssAnon"] - before["RssAnon"],
                  "peak": after["VmHWM"]}))
"""


def load_once(checkout: Path, model: Path, weights: str) -> dict:
    out = subprocess.run([sys.executable, "-c", LOAD, str(model), weights], cwd=checkout, capture_output=True,
                         text=True, check=True, env={**os.environ, "PYTHONPATH": str(checkout)})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path)
    p.add_argument("--weights", nargs="+", default=["fp32"], choices=["fp32", "bf16", "int8", "int4"])
    p.add_argument("--old", type=Path, help="a second checkout to run beside this one")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    here = Path(__file__).resolve().parent.parent
    sides = {"this": here} if args.old is None else {"old": args.old.resolve(), "new": here}
    runs = {(side, w): [] for side in sides for w in args.weights}
    for r in range(args.rounds):
        for w in args.weights:
            for side in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
                runs[side, w].append(load_once(sides[side], args.model.resolve(), w))
    print(f"| weights | checkout | load s | RSS after, MB | of it the load's own (anon), MB | peak RSS, MB |")
    print("|---|---|---:|---:|---:|---:|")
    for (side, w), got in runs.items():
        med = {k: statistics.median(g[k] for g in got) for k in got[0]}
        print(f"| {w} | {side} | {med['s']:.2f} | {med['rss']:.0f} | {med['anon']:.0f} | {med['peak']:.0f} |")
    print(f"\n{args.rounds} rounds, medians; `python bench/bench_load.py {args.model.name} --weights {' '.join(args.weights)}"
          + (f" --old {args.old}" if args.old else "") + f" --rounds {args.rounds}`")


if __name__ == "__main__":
    main()
