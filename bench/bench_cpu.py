"""CPU inference speed of rwkv_lm against the official `rwkv` package (0.8.x, RWKV_V7_ON=1, 'cpu fp32').

Same random weights of the 0.1B shape (12 layers, width 768, vocab 65536) on both sides. Each measurement
runs every side in turn, several rounds interleaved; the best round of each side is kept (on a shared
machine, noise only ever adds time), and every ratio compares numbers from this one run.

    python bench/bench_cpu.py                 # print the table
    python bench/bench_cpu.py --write         # and put it in bench/RESULTS.md under "## CPU runtime (issue 4)"

Rows "rwkv_lm plain" run model.py exactly as the trainer uses it (the core reference path); rows
"rwkv_lm fast" run the same model after `rwkv_lm.fast.optimize` (what the CLI uses): fp32, or
bf16 weights with fp32 activations (`weights="bf16"`).
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ["RWKV_V7_ON"] = "1"  # read by the rwkv package when rwkv.model is imported

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import rwkv_lm  # noqa: E402
from rwkv_lm.fast import optimize  # noqa: E402

SECTION = "## CPU runtime (issue 4)"
RESULTS = Path(__file__).with_name("RESULTS.md")


def random_weights(cfg, seed=0):
    """Every weight random (the official init leaves many at zero), as the tests' random_model."""
    torch.manual_seed(seed)
    model = rwkv_lm.RWKV(cfg).reset_parameters()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (0.02 if p.dim() == 2 else 0.2))
    return model.eval()


def best_of(rounds, sides: dict) -> dict:
    """sides: name -> fn() returning seconds; interleaved rounds; the least time of each side."""
    best = {name: float("inf") for name in sides}
    for _ in range(rounds):
        for name, fn in sides.items():
            best[name] = min(best[name], fn())
    return best


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class Official:
    def __init__(self, pth: Path):
        from rwkv.model import RWKV

        self.model = RWKV(model=str(pth)[: -len(".pth")], strategy="cpu fp32")

    def prefill(self, tokens):
        return timed(lambda: self.model.forward(tokens, None))

    def decode(self, tokens, n):
        _, state = self.model.forward(tokens[:4], None)

        def run():
            s = state
            for t in tokens[:n]:
                _, s = self.model.forward([t], s)

        return timed(run)


class Ours:
    def __init__(self, model):
        self.model = model

    @torch.no_grad()
    def prefill(self, tokens):
        return timed(lambda: self.model(torch.tensor([tokens]), last_only=True))

    @torch.no_grad()
    def decode(self, tokens, n, batch=1):
        _, state = self.model(torch.tensor([tokens[:4]] * batch))
        steps = torch.tensor(tokens[:n]).view(n, 1).expand(n, batch).contiguous()

        def run():
            s = state
            for row in steps:
                _, s = self.model.step(row, s)

        return timed(run)


@torch.no_grad()
def top_token_agreement(a, b, tokens) -> float:
    """Share of positions where two models pick the same most likely next token, stepping as decoding does."""
    same, state_a, state_b = 0, None, None
    for t in torch.tensor(tokens).view(-1, 1):
        logits_a, state_a = a.step(t, state_a)
        logits_b, state_b = b.step(t, state_b)
        same += int(logits_a.argmax() == logits_b.argmax())
    return same / len(tokens)


def tokenizer_speed(rounds):
    import rwkv
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    from rwkv_lm.tokenizer import load_tokenizer

    corpus = Path(rwkv.__file__).parent
    text = "".join(p.read_text(encoding="utf-8") for p in sorted(corpus.glob("*.py"))) * 3
    text += "今天是美好的一天。日本語のテキスト、한국어 텍스트 🎉 " * 2000
    trie = TRIE_TOKENIZER(str(corpus / "rwkv_vocab_v20230424.txt"))
    world = load_tokenizer("world")
    assert trie.encode(text) == world.encode(text)
    best = best_of(rounds, {"trie": lambda: timed(lambda: trie.encode(text)), "ours": lambda: timed(lambda: world.encode(text))})
    return len(text.encode("utf-8")), best


STREAM_READ_C = r"""
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
int main(int argc, char **argv) {  /* sum a 1 GiB array with AVX-512 loads; print the best GB/s of 10 passes */
    size_t n = (1ull << 30) / sizeof(float);
    int threads = atoi(argv[1]);
    float *a = aligned_alloc(64, n * sizeof(float)), total = 0;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (size_t i = 0; i < n; i++) a[i] = (float)(i & 7);
    double best = 1e9;
    for (int pass = 0; pass < 10; pass++) {
        double start = omp_get_wtime();
        #pragma omp parallel num_threads(threads) reduction(+ : total)
        {
            size_t lo = n / omp_get_num_threads() * omp_get_thread_num(), hi = lo + n / omp_get_num_threads();
            __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
            for (size_t i = lo; i < hi; i += 64) {
                s0 = _mm512_add_ps(s0, _mm512_load_ps(a + i));
                s1 = _mm512_add_ps(s1, _mm512_load_ps(a + i + 16));
                s2 = _mm512_add_ps(s2, _mm512_load_ps(a + i + 32));
                s3 = _mm512_add_ps(s3, _mm512_load_ps(a + i + 48));
            }
            total += _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
        }
        double t = omp_get_wtime() - start;
        best = t < best ? t : best;
    }
    printf("%.2f %g\n", n * sizeof(float) / best / 1e9, total);
}
"""


def stream_read_gbps(threads: int) -> float:
    """The machine's streaming-read bandwidth (GB/s): the ceiling of a decode step that reads every weight once."""
    tmp = Path(tempfile.mkdtemp())
    (tmp / "stream.c").write_text(STREAM_READ_C)
    subprocess.run(["cc", "-O3", "-mavx512f", "-fopenmp", "-o", str(tmp / "stream"), str(tmp / "stream.c")], check=True)
    return float(subprocess.run([str(tmp / "stream"), str(threads)], check=True, capture_output=True, text=True).stdout.split()[0])


def machine() -> str:
    info = {}
    try:
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    flags = info.get("flags", "").split()
    isa = ", ".join(f"{f}: {'yes' if f in flags else 'NO'}" for f in ("avx512f", "avx512_bf16", "amx_bf16"))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{info.get('model name', platform.processor())}, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads); "
            f"{isa}; load average {load:.1f} at the start; torch {torch.__version__}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--agreement-tokens", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared 2-core machine OpenMP waits for busy cores)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--write", action="store_true", help="write the table into bench/RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    host = machine()
    print(host)

    cfg = rwkv_lm.RWKVConfig(vocab_size=65536, n_layer=12, n_embd=768)
    plain = random_weights(cfg)
    tmp = Path(tempfile.mkdtemp())
    pth = rwkv_lm.export_official(plain, tmp / "bench-0.1B.pth", dtype=torch.float32)
    official = Official(pth)
    fast32 = Ours(optimize(copy.deepcopy(plain)))
    fast16 = Ours(optimize(copy.deepcopy(plain), weights="bf16"))
    ours = Ours(plain)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(1, 65530, (max(args.prefill_tokens, args.agreement_tokens),), generator=g).tolist()
    P, D, B = args.prefill_tokens, args.decode_tokens, args.batch

    prefill = best_of(args.rounds, {
        "rwkv pip fp32": lambda: official.prefill(tokens[:P]),
        "rwkv_lm plain fp32": lambda: ours.prefill(tokens[:P]),
        "rwkv_lm fast fp32": lambda: fast32.prefill(tokens[:P]),
        "rwkv_lm fast bf16": lambda: fast16.prefill(tokens[:P]),
    })
    decode = best_of(args.rounds, {
        "rwkv pip fp32": lambda: official.decode(tokens, D),
        "rwkv_lm plain fp32": lambda: ours.decode(tokens, D),
        "rwkv_lm fast fp32": lambda: fast32.decode(tokens, D),
        "rwkv_lm fast bf16": lambda: fast16.decode(tokens, D),
        f"rwkv_lm fast fp32 B={B}": lambda: fast32.decode(tokens, D, B) / B,
        f"rwkv_lm fast bf16 B={B}": lambda: fast16.decode(tokens, D, B) / B,
    })
    agree = top_token_agreement(fast32.model, fast16.model, tokens[:args.agreement_tokens])
    bandwidth = {n: stream_read_gbps(n) for n in sorted({1, args.threads})} if "avx512f: yes" in host else {}
    tok_bytes, tok = tokenizer_speed(args.rounds)

    weight_bytes = sum(p.numel() * 4 for n, p in plain.named_parameters() if n != "emb.weight")
    ref_p, ref_d = prefill["rwkv pip fp32"], decode["rwkv pip fp32"]
    b1 = decode["rwkv_lm fast fp32"]
    rows = [f"| {'side':<26} | {'prefill tok/s':>13} | {'vs rwkv pip':>11} | {'decode tok/s':>12} | {'vs rwkv pip':>11} |",
            f"|{'-' * 28}|{'-' * 15}:|{'-' * 12}:|{'-' * 14}:|{'-' * 12}:|"]
    for name in decode:
        p = f"{P / prefill[name]:13.1f} | {ref_p / prefill[name]:10.2f}x" if name in prefill else f"{'':>13} | {'':>11}"
        rows.append(f"| {name:<26} | {p} | {D / decode[name]:12.1f} | {ref_d / decode[name]:10.2f}x |")
    lines = rows + [
        "",
        f"- batched decode: B={B} gives {b1 / decode[f'rwkv_lm fast fp32 B={B}']:.1f}x the tokens/s of B=1 with fp32 weights, "
        f"{decode['rwkv_lm fast bf16'] / decode[f'rwkv_lm fast bf16 B={B}']:.1f}x with bf16 weights",
        f"- fp32 decode at B=1 reads {weight_bytes / 2**20:.0f} MiB of weights per token: "
        f"rwkv pip {weight_bytes * D / ref_d / 1e9:.1f} GB/s, rwkv_lm fast {weight_bytes * D / b1 / 1e9:.1f} GB/s effective; "
        "the machine's streaming read (1 GiB, AVX-512 loads): "
        + ", ".join(f"{gbps:.1f} GB/s with {n} thread{'s' * (n > 1)}" for n, gbps in bandwidth.items())
        + (f" (rwkv_lm fast fp32 decode at {100 * weight_bytes * D / b1 / 1e9 / bandwidth[args.threads]:.0f}% of it)" if bandwidth else ""),
        f"- bf16 weights vs fp32 (fast paths, token by token): same top token at {100 * agree:.1f}% of "
        f"{args.agreement_tokens} positions of a random sequence",
        f"- World tokenizer: {tok_bytes / 1e6:.2f} MB of mixed text, rwkv_lm {tok_bytes / tok['ours'] / 1e6:.1f} MB/s, "
        f"rwkv TRIE_TOKENIZER {tok_bytes / tok['trie'] / 1e6:.1f} MB/s ({tok['trie'] / tok['ours']:.0f}x), same ids",
    ]
    table = "\n".join(lines)
    print(table)
    if args.write:
        command = "python bench/bench_cpu.py " + " ".join(sys.argv[1:])
        body = (f"{SECTION}\n\nMachine: {host}.\nCommand: `{command.strip()}` ({args.rounds} interleaved rounds, best of each; "
                f"prefill {P} tokens, decode {D} tokens; random weights of the 0.1B shape).\n\n{table}\n")
        write_section(body)


def write_section(body: str):
    """Replace our section of RESULTS.md (or append it), leaving the others as they are."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.M | re.S)
    text = pattern.sub(lambda _: body + "\n", text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + body
    RESULTS.write_text(text)


if __name__ == "__main__":
    main()
