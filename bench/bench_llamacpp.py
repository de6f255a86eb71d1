"""llama.cpp beside rwkv_lm on the CPU (issue 20): the same weights, exported with `rwkv_lm.export_gguf`.

First the greedy agreement check: the first 16 greedy tokens of llama.cpp (rwkv-greedy, bench/llamacpp_greedy.cpp)
against ours, on the default model (trained weights) and on the random model timed below, for f32, f16 and q8_0
(f32 must agree; the others say how close they come). Then speed: random weights of the 0.1B shape (12 layers,
width 768, vocab 65536), a prompt of P tokens (prefill) and D decode steps, ours (`rwkv_lm.load` as it comes: fp32;
`optimize(..., weights="bf16" | "int8")`) against llama.cpp's llama-bench at the nearest precision (f32, bf16,
q8_0), at 1 and 2 threads. Every side runs once per round, rounds interleaved, and each keeps its best round
(noise on a shared machine only adds time); the ratios compare numbers of this one run.

    python bench/bench_llamacpp.py            # print the tables
    python bench/bench_llamacpp.py --write    # and put them at the end of bench/RESULTS.md
"""
from __future__ import annotations

import argparse
import copy
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cpu import DEMO_MODEL, RESULTS, SHAPES, Ours, best_of, machine, random_weights  # noqa: E402
import llamacpp  # noqa: E402
import rwkv_lm  # noqa: E402
from rwkv_lm.ops.cpu_kernels import cpu_level  # noqa: E402
from rwkv_lm.runtime.cpu import optimize  # noqa: E402
from rwkv_lm.tokenizer import load_tokenizer  # noqa: E402

SECTION = "## llama.cpp beside rwkv_lm: bench_llamacpp.py"
PAIRS = {"fp32": "f32", "bf16": "bf16", "int8": "q8_0"}  # our weights -> the GGUF type llama.cpp runs beside them
N_AGREE = 16


def agreement(model, prompt, tmp: Path, name: str) -> list[str]:
    """One table row per GGUF type: how many of llama.cpp's first 16 greedy tokens equal ours."""
    ours = llamacpp.ours_greedy(model, prompt, N_AGREE)
    rows = []
    for gguf_type in ("f32", "f16", "q8_0"):
        path = rwkv_lm.export_gguf(model, tmp / f"{name}-{gguf_type}.gguf", type=gguf_type)
        theirs = llamacpp.greedy(path, prompt, N_AGREE)
        same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), N_AGREE)
        rows.append(f"| {name} | {gguf_type} | {same}/{N_AGREE} | {'same' if theirs == ours else 'differs'} |")
    return rows


def llama_bench(path: Path, threads: int, prompt: int, decode: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds) of one llama-bench repetition."""
    done = subprocess.run([str(llamacpp.build(llamacpp.BENCH) / "llama-bench"), "-m", str(path), "-p", str(prompt),
                           "-n", str(decode), "-t", str(threads), "-r", "1", "-o", "json"],
                          capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"llama-bench failed on {path}: {done.stderr[-3000:]}")
    tests = json.loads(done.stdout)
    pp = next(t for t in tests if t["n_prompt"] > 0 and t["n_gen"] == 0)
    tg = next(t for t in tests if t["n_gen"] > 0 and t["n_prompt"] == 0)
    return pp["avg_ns"] / 1e9, tg["avg_ns"] / 1e9


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prefill-tokens", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--shape", choices=SHAPES, default="0.1B")
    parser.add_argument("--write", action="store_true", help="write the tables at the end of bench/RESULTS.md")
    args = parser.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    llamacpp.build(llamacpp.BENCH)
    host = machine()
    print(host, flush=True)
    tmp = Path(tempfile.mkdtemp())
    P, D = args.prefill_tokens, args.decode_tokens

    cfg = rwkv_lm.RWKVConfig(**SHAPES[args.shape])
    plain = random_weights(cfg)
    if cfg.vocab_size == 65536:
        plain.tokenizer = load_tokenizer("world")  # what a World model's GGUF carries (ids are what is compared)
    default = rwkv_lm.load(DEMO_MODEL)
    agree = agreement(default, default.tokenizer.encode("Once upon a time, in a small village,"), tmp, "default model")
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(1, cfg.vocab_size - 6, (max(P, 16),), generator=g).tolist()
    loaded = rwkv_lm.load(rwkv_lm.save(plain, tmp / "bench.safetensors"))
    agree += agreement(loaded, tokens[:16], tmp, f"random {args.shape}")
    print("\n".join(agree), flush=True)

    ours = {"fp32": loaded, "bf16": optimize(copy.deepcopy(loaded), weights="bf16"),
            "int8": optimize(copy.deepcopy(loaded), weights="int8")}
    ggufs = {w: rwkv_lm.export_gguf(plain, tmp / f"bench-{t}.gguf", type=t) for w, t in PAIRS.items()}

    def ours_side(model, t, kind):
        def run():
            torch.set_num_threads(t)
            side = Ours(model, cpu_level())
            return side.prefill(tokens[:P]) if kind == "prefill" else side.decode(tokens, D)
        return run

    llama_seconds: dict[tuple, list] = {}

    def llama_side(w, t):
        def run():
            pp, tg = llama_bench(ggufs[w], t, P, D)
            llama_seconds.setdefault((w, t), []).append((pp, tg))
            return pp + tg
        return run

    sides = {}
    for t in threads:
        for w in PAIRS:
            sides[("ours", w, t, "prefill")] = ours_side(ours[w], t, "prefill")
            sides[("ours", w, t, "decode")] = ours_side(ours[w], t, "decode")
            sides[("llama", w, t)] = llama_side(w, t)
    best = best_of(args.rounds, sides)
    llama = {key: (min(pp for pp, _ in runs), min(tg for _, tg in runs)) for key, runs in llama_seconds.items()}

    lines = ["Greedy agreement (16 tokens after the prompt; llama.cpp's rwkv-greedy on our GGUF against rwkv_lm):", "",
             "| model | GGUF type | tokens equal before the first difference | all 16 |", "|---|---|---:|---|", *agree,
             "", f"Speed, random weights of the {args.shape} shape: prefill {P} tokens, decode {D} tokens "
             f"(ours after a 4-token prompt, llama-bench's tg from an empty context); tokens/s, best of {args.rounds} "
             "interleaved rounds:", "",
             "| threads | ours | llama.cpp | prefill ours | prefill llama.cpp | ours / llama.cpp | decode ours "
             "| decode llama.cpp | ours / llama.cpp |", "|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for t in threads:
        for w, gguf_type in PAIRS.items():
            op, od = P / best[("ours", w, t, "prefill")], D / best[("ours", w, t, "decode")]
            lp, ld = P / llama[(w, t)][0], D / llama[(w, t)][1]
            lines.append(f"| {t} | {w} | {gguf_type} | {op:.1f} | {lp:.1f} | {op / lp:.2f}x | {od:.1f} | {ld:.1f} "
                         f"| {od / ld:.2f}x |")
    table = "\n".join(lines)
    print(table)
    if args.write:
        command = "python bench/bench_llamacpp.py " + " ".join(sys.argv[1:])
        body = (f"{SECTION}\n\nMachine: {host}. llama.cpp: the llama-cpp-python {llamacpp.LLAMA_CPP_PYTHON} sdist's "
                f"vendor/llama.cpp, built by bench/llamacpp.py (native flags, CPU).\nCommand: `{command.strip()}` "
                f"(run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}).\n\n{table}\n")
        write_at_end(SECTION, body)


def write_at_end(section: str, body: str):
    """Replace our section of RESULTS.md, or add it at the end."""
    text = RESULTS.read_text()
    pattern = re.compile(rf"^{re.escape(section)}\n.*?(?=^## |\Z)", re.M | re.S)
    text = pattern.sub(lambda _: body + "\n", text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + body
    RESULTS.write_text(text)


if __name__ == "__main__":
    main()
