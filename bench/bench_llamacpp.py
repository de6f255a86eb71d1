"""llama.cpp beside rwkv_lm on the CPU (issue 20): the same weights, exported with `rwkv_lm.export_gguf`.

First the greedy agreement check: the first 16 greedy tokens of llama.cpp (rwkv-greedy, bench/llamacpp_greedy.cpp)
against ours, on the default model (trained weights) and on the random model timed below: f32, f16 and q8_0 against
our fp32 (f32 must agree; the others say how close they come), q4_0 against our fp32 and our int4 (both 4-bit,
different groups and rounding: reported, not required equal). Then speed: random weights of the 0.1B shape (12 layers, width 768, vocab
65536), a prompt of P tokens (prefill, ours `model(tokens, last_only=True)`) and D decode steps (ours `model.step`
after a 4-token prompt, llama-bench's tg from an empty context), each of our weight types (`rwkv_lm.load` as it
comes: fp32; `optimize(..., weights="bf16" | "int8" | "int4")`) against llama-bench at the nearest GGUF type
(F16 and BF16 both against our bf16, Q4_0 against our int4), at 1 and 2 threads.

Rounds: every side runs once per round, the order reversed every other round (what runs first or after a
neighbour's heat swaps sides); each round gives one ratio per cell, and the table shows the median of those
ratios and their range. Ratio = llama.cpp tokens/s / ours at the same precision (> 1: llama.cpp is faster), as
issue 20's table. Bytes per decoded token: the weights a step reads (ours: every tensor but the embedding, of
which a step reads one row; llama.cpp: the GGUF's tensors but token_embd), times tokens/s, against the
streaming-read bandwidth measured in the same run (bench_cpu.py's loop): the physical limit of a decode step.

    python bench/bench_llamacpp.py            # print the tables (9 rounds: about half an hour on two idle cores)
    python bench/bench_llamacpp.py --write    # and put them in bench/RESULTS.md
    python bench/bench_llamacpp.py --quick    # a smoke run: tiny model, 1 round, 1 thread
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cpu import (DEMO_MODEL, RESULTS, SHAPES, Ours, machine, random_weights, stream_read_gbps,  # noqa: E402
                       weight_bytes)
import llamacpp  # noqa: E402
import rwkv_lm  # noqa: E402
from rwkv_lm.ops.cpu_kernels import cpu_level  # noqa: E402
from rwkv_lm.runtime.cpu import optimize  # noqa: E402
from rwkv_lm.tokenizer import load_tokenizer  # noqa: E402

SECTION = "## llama.cpp beside rwkv_lm: bench_llamacpp.py"
# (our weights, the GGUF type llama.cpp runs beside them), the rows of issue 20's table
PAIRS = (("fp32", "f32"), ("bf16", "bf16"), ("bf16", "f16"), ("int8", "q8_0"), ("int4", "q4_0"))
AGREE = (("fp32", "f32"), ("fp32", "f16"), ("fp32", "q8_0"), ("fp32", "q4_0"), ("int4", "q4_0"))  # greedy agreement
N_AGREE = 16


def our_weights(model, weights: str):
    return model if weights == "fp32" else optimize(copy.deepcopy(model), weights=weights)


def agreement(model, prompt, tmp: Path, name: str) -> list[str]:
    """One table row per AGREE pair: how many of llama.cpp's first 16 greedy tokens equal ours."""
    rows, ours = [], {}
    for weights, gguf_type in AGREE:
        if weights not in ours:
            ours[weights] = llamacpp.ours_greedy(our_weights(model, weights), prompt, N_AGREE)
        path = rwkv_lm.export_gguf(model, tmp / f"{name}-{gguf_type}.gguf", type=gguf_type)
        theirs = llamacpp.greedy(path, prompt, N_AGREE)
        same = next((i for i, (a, b) in enumerate(zip(ours[weights], theirs)) if a != b), N_AGREE)
        rows.append(f"| {name} | {gguf_type} | {weights} | {same}/{N_AGREE} | "
                    f"{'same' if theirs == ours[weights] else 'differs'} |")
    return rows


def gguf_step_bytes(path: Path) -> int:
    """What llama.cpp reads per decoded token: every tensor of the GGUF but the embedding (one row of it)."""
    import gguf

    return sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors if t.name != "token_embd.weight")


def llama_bench(path: Path, threads: int, prompt: int, decode: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds) of one llama-bench repetition."""
    done = subprocess.run([str(llamacpp.build(llamacpp.BENCH) / "llama-bench"), "-m", str(path), "-p", str(prompt),
                           "-n", str(decode), "-t", str(threads), "-r", "1", "-o", "json",
                           *(["--repack", "0"] if llamacpp.AMX_CRASH else [])],
                          capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"llama-bench failed on {path}: {done.stderr[-3000:]}")
    tests = json.loads(done.stdout)
    pp = next(t for t in tests if t["n_prompt"] > 0 and t["n_gen"] == 0)
    tg = next(t for t in tests if t["n_gen"] > 0 and t["n_prompt"] == 0)
    return pp["avg_ns"] / 1e9, tg["avg_ns"] / 1e9


def interleaved(rounds: int, sides: dict) -> dict[object, list]:
    """sides: key -> fn() returning (prefill s, decode s). Every side once per round, the order reversed every
    other round; key -> its result of each round."""
    results = {key: [] for key in sides}
    order = list(sides)
    for r in range(rounds):
        for key in (order if r % 2 == 0 else order[::-1]):
            results[key].append(sides[key]())
        print(f"round {r + 1}/{rounds} done, load average {os.getloadavg()[0]:.1f}", flush=True)
    return results


def ratio_cell(ratios: list[float]) -> str:
    """The median ratio and the range of the rounds' ratios."""
    cell = f"{statistics.median(ratios):.2f}"
    return cell if len(ratios) == 1 else f"{cell} ({min(ratios):.2f}-{max(ratios):.2f})"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--threads", default="2,1", help="comma-separated thread counts")
    parser.add_argument("--shape", choices=SHAPES, default="0.1B")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny shape, 1 round, 1 thread, few tokens")
    parser.add_argument("--write", action="store_true", help="write the tables at the end of bench/RESULTS.md")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.prefill_tokens, args.decode_tokens, args.threads, args.shape = 1, 16, 4, "1", "tiny"
    threads = [int(t) for t in args.threads.split(",")]
    llamacpp.build(llamacpp.BENCH)
    host = machine()
    load_start = os.getloadavg()
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

    ours = {w: our_weights(loaded, w) for w in dict.fromkeys(w for w, _ in PAIRS)}
    ggufs = {t: rwkv_lm.export_gguf(plain, tmp / f"bench-{t}.gguf", type=t) for _, t in PAIRS}
    # (by side: our "bf16" and llama.cpp's "bf16" GGUF are different files)
    step_bytes = {**{("ours", w): weight_bytes(m) for w, m in ours.items()},
                  **{("llama", t): gguf_step_bytes(p) for t, p in ggufs.items()}}
    bandwidth = {t: stream_read_gbps(t) for t in threads}

    def ours_side(model, t):
        def run():
            torch.set_num_threads(t)
            side = Ours(model, cpu_level())
            return side.prefill(tokens[:P]), side.decode(tokens, D)
        return run

    sides = {}
    for t in threads:
        for w in ours:
            sides[("ours", w, t)] = ours_side(ours[w], t)
        for _, gguf_type in PAIRS:
            sides[("llama", gguf_type, t)] = lambda path=ggufs[gguf_type], t=t: llama_bench(path, t, P, D)
    seconds = interleaved(args.rounds, sides)
    load_end = os.getloadavg()

    def ratios(w, gguf_type, t, phase):  # llama.cpp tok/s over ours, one per round
        return [o[phase] / l[phase] for o, l in zip(seconds[("ours", w, t)], seconds[("llama", gguf_type, t)])]

    def tok_s(key, phase, n):
        return n / statistics.median(s[phase] for s in seconds[key])

    header = " | ".join(f"{t} thread{'s' * (t > 1)}: {phase}" for t in threads for phase in (f"prefill {P}", "decode"))
    lines = [f"Greedy agreement ({N_AGREE} tokens after the prompt; llama.cpp's rwkv-greedy on our GGUF against "
             "rwkv_lm):", "",
             "| model | GGUF type | ours | tokens equal before the first difference | all 16 |",
             "|---|---|---|---:|---|", *agree, "",
             f"Speed, random weights of the {args.shape} shape, prefill {P} tokens and decode {D}. Each cell: "
             f"**llama.cpp tokens/s / ours** (> 1: llama.cpp is faster; the goal is <= 0.9), the median of "
             f"{args.rounds} interleaved rounds' ratios (the range of the rounds in brackets):", "",
             f"| precision | {header} |", "|---|" + "---:|" * (2 * len(threads)),
             *(f"| {gguf_type.upper()} vs our {w} | "
               + " | ".join(ratio_cell(ratios(w, gguf_type, t, phase)) for t in threads for phase in (0, 1)) + " |"
               for w, gguf_type in PAIRS),
             "", "Tokens/s (medians over the rounds) and bytes per decoded token; % of read = decode tokens/s x bytes "
             "per token against the streaming-read bandwidth at that thread count ("
             + ", ".join(f"{bandwidth[t]:.1f} GB/s at {t} thread{'s' * (t > 1)}" for t in threads) + "):", "",
             "| threads | ours | llama.cpp | prefill ours | prefill llama.cpp | decode ours | decode llama.cpp "
             "| MB/token ours | MB/token llama.cpp | % of read ours | % of read llama.cpp |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for t in threads:
        for w, gguf_type in PAIRS:
            od, ld = tok_s(("ours", w, t), 1, D), tok_s(("llama", gguf_type, t), 1, D)
            read = lambda rate, key: f"{100 * rate * step_bytes[key] / 1e9 / bandwidth[t]:.0f}%"  # noqa: E731
            lines.append(f"| {t} | {w} | {gguf_type} | {tok_s(('ours', w, t), 0, P):.1f} "
                         f"| {tok_s(('llama', gguf_type, t), 0, P):.1f} | {od:.1f} | {ld:.1f} "
                         f"| {step_bytes['ours', w] / 1e6:.1f} | {step_bytes['llama', gguf_type] / 1e6:.1f} "
                         f"| {read(od, ('ours', w))} | {read(ld, ('llama', gguf_type))} |")
    lines += ["", f"Load average (1 / 5 / 15 min): {' / '.join(f'{x:.1f}' for x in load_start)} at the start, "
              f"{' / '.join(f'{x:.1f}' for x in load_end)} at the end."]
    table = "\n".join(lines)
    print(table)
    if args.write:
        command = "python bench/bench_llamacpp.py " + " ".join(sys.argv[1:])
        body = (f"{SECTION}\n\nMachine: {host}. llama.cpp: the llama-cpp-python {llamacpp.LLAMA_CPP_PYTHON} sdist's "
                f"vendor/llama.cpp, built by bench/llamacpp.py (native flags, CPU)"
                f"{'; weight repacking off (its AMX matmul crashes on these GGUFs, see llamacpp.AMX_CRASH)' * llamacpp.AMX_CRASH}.\nCommand: `{command.strip()}` "
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
