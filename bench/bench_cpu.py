"""CPU inference speed of rwkv_lm against the official `rwkv` package (0.8.x, RWKV_V7_ON=1, 'cpu fp32'), at
every instruction-set level of our kernels this CPU has, and the quality of bf16, int8 and int4 weights.

Speed: the same random weights of the 0.1B shape (12 layers, width 768, vocab 65536) on both sides; ours saved
with `rwkv_lm.save` and opened with `rwkv_lm.load` as it comes (fp32, the fused C step), the same model with
`optimize(..., weights="bf16" | "int8" | "int4")`, and with `RWKV_LM_CPU_ISA` capping the kernels at each lower level
(what a CPU with only AVX2, say, runs). Each measurement runs every side in turn, several rounds interleaved,
and keeps each side's best round (on a shared machine noise only ever adds time): every ratio compares
numbers of this one run. The streaming-read bandwidth that bounds a decode step is measured in the same run.

Quality: the demo's default RWKV-7 (trained weights; random ones have near-tied logits) on the Shakespeare
validation windows the trainer holds out: bits per byte, and how often the most likely next token agrees
with fp32's, in the parallel (prompt) path over every window and token by token (the decode kernels) on a few.

    python bench/bench_cpu.py                 # print the tables
    python bench/bench_cpu.py --write         # and put them in bench/RESULTS.md (a section per --threads)
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

os.environ["RWKV_V7_ON"] = "1"  # read by the rwkv package when rwkv.model is imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import rwkv_lm  # noqa: E402
from rwkv_lm.model import Block  # noqa: E402
from rwkv_lm.ops.cpu_kernels import BLOCK_STEP_PARAMS, ISA_ENV, LEVELS, cpu_level, kernels  # noqa: E402
from rwkv_lm.runtime.cpu import optimize  # noqa: E402

SECTION = "## CPU runtime: bench_cpu.py with {threads} thread{s}"  # one section per thread count
RESULTS = Path(__file__).with_name("RESULTS.md")
DEMO_MODEL = ROOT / "demo" / "models" / "rwkv7.safetensors"
SHAPES = {"0.1B": dict(vocab_size=65536, n_layer=12, n_embd=768),  # what the tables in RESULTS.md use
          "tiny": dict(vocab_size=1024, n_layer=2, n_embd=128)}  # the test's smoke run


def random_weights(cfg, seed=0):
    """Every weight random (the official init leaves many at zero), as the tests' random_model."""
    torch.manual_seed(seed)
    model = rwkv_lm.RWKV(cfg).reset_parameters()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (0.02 if p.dim() == 2 else 0.2))
    return model.eval()


@contextmanager
def isa(level: str):
    """Our kernels capped at this level while inside (RWKV_LM_CPU_ISA is read at each call)."""
    before = os.environ.get(ISA_ENV)
    os.environ[ISA_ENV] = level
    try:
        yield
    finally:
        if before is None:
            del os.environ[ISA_ENV]
        else:
            os.environ[ISA_ENV] = before


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
    def __init__(self, model, level: str):
        self.model, self.level = model, level

    @torch.no_grad()
    def prefill(self, tokens):
        with isa(self.level):
            return timed(lambda: self.model(torch.tensor([tokens]), last_only=True))

    @torch.no_grad()
    def decode(self, tokens, n, batch=1):
        with isa(self.level):
            _, state = self.model(torch.tensor([tokens[:4]] * batch))
            steps = torch.tensor(tokens[:n]).view(n, 1).expand(n, batch).contiguous()

            def run():
                s = state
                for row in steps:
                    _, s = self.model.step(row, s)

            return timed(run)


@torch.no_grad()
def step_agreement(a, b, windows, level: str) -> float:
    """Share of positions where two models pick the same most likely next token, stepping as decoding does
    (windows: [W, T] token ids, each window from a fresh state)."""
    same = 0
    with isa(level):
        for window in windows:
            state_a = state_b = None
            for t in window.view(-1, 1):
                logits_a, state_a = a.step(t, state_a)
                logits_b, state_b = b.step(t, state_b)
                same += int(logits_a.argmax() == logits_b.argmax())
    return same / windows.numel()


def weight_bytes(model) -> int:
    """What a one-token step reads: every tensor but the embedding (one row of it per token); a bf16, int8 or int4
    model's LoRAs as the copies its C step reads (`StepPlan.lora_copies`), not their fp32 Parameters."""
    read = {name: t.nbytes for name, t in model.state_dict().items() if not name.startswith("emb.")}
    for i, block in enumerate(getattr(model, "blocks", ())):
        plan = getattr(block, "step_plan", None)
        for where, (weight, scale) in zip(plan.rounded_loras, plan.lora_copies or ()) if plan else ():
            read[f"blocks.{i}.{BLOCK_STEP_PARAMS[plan.slots[where]]}"] = weight.nbytes + (0 if scale is None else scale.nbytes)
    return sum(read.values())


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


# GCC's vector types: the widest loads the CPU has (-march=native), any architecture
STREAM_READ_C = r"""
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
typedef float v16 __attribute__((vector_size(64)));
int main(int argc, char **argv) {  /* sum a 1 GiB array; print the best GB/s of 10 passes */
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
            v16 s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
            for (size_t i = lo; i < hi; i += 64) {
                s0 += *(const v16 *)(a + i);
                s1 += *(const v16 *)(a + i + 16);
                s2 += *(const v16 *)(a + i + 32);
                s3 += *(const v16 *)(a + i + 48);
            }
            v16 s = (s0 + s1) + (s2 + s3);
            for (int j = 0; j < 16; j++) total += s[j];
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
    subprocess.run(["cc", "-O3", "-march=native", "-fopenmp", "-o", str(tmp / "stream"), str(tmp / "stream.c")], check=True)
    return float(subprocess.run([str(tmp / "stream"), str(threads)], check=True, capture_output=True, text=True).stdout.split()[0])


def machine() -> str:
    info = {}
    try:
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    flags = (info.get("flags") or info.get("Features", "")).split()
    shown = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "asimd")
    isa_flags = ", ".join(f"{f}: {'yes' if f in flags else 'NO'}" for f in shown)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{info.get('model name', platform.processor())}, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads); "
            f"{isa_flags}; load average {load:.1f} at the start; torch {torch.__version__}")


@torch.no_grad()
def quality(windows_for_steps: int) -> list[str]:
    """The demo's default RWKV-7 in fp32, bf16, int8 and int4 on the held-out Shakespeare windows."""
    from train.data import IGNORE, FixedWindows, TokenData

    data = TokenData(train=["shakespeare"], tokenizer=str(DEMO_MODEL), val_windows=10**6,
                     cache_dir=tempfile.mkdtemp())
    data.setup()
    windows = FixedWindows(data.val_tokens, None, data.ctx_len, 10**6)
    xs = torch.stack([windows[i][0] for i in range(len(windows))])
    ys = torch.stack([windows[i][1] for i in range(len(windows))])
    models = {"fp32": rwkv_lm.load(DEMO_MODEL)}
    for w in ("bf16", "int8", "int4"):
        models[w] = optimize(copy.deepcopy(models["fp32"]), weights=w)
    results, top = {}, {}
    for name, model in models.items():
        losses, tops = [], []
        for i in range(0, len(xs), 16):
            logits = model(xs[i:i + 16])[0].float()
            losses.append(F.cross_entropy(logits.flatten(0, 1), ys[i:i + 16].flatten(), ignore_index=IGNORE, reduction="sum"))
            tops.append(logits.argmax(-1))
        results[name] = float(sum(losses)) / int((ys != IGNORE).sum()) / math.log(2) / data.val_bytes_per_token
        top[name] = torch.cat(tops)
    step_windows = xs[:windows_for_steps]
    lines = [f"| weights | val bits/byte (prompt path) | vs fp32 | top token = fp32's, prompt path ({xs.numel():,} positions) "
             f"| top token = fp32's, decode steps ({step_windows.numel():,} positions) |",
             "|---|---:|---:|---:|---:|"]
    for name in models:
        agree = float((top[name] == top["fp32"]).float().mean())
        steps = step_agreement(models["fp32"], models[name], step_windows, cpu_level()) if name != "fp32" else 1.0
        lines.append(f"| {name} | {results[name]:.4f} | {100 * (results[name] / results['fp32'] - 1):+.2f}% "
                     f"| {100 * agree:.2f}% | {100 * steps:.2f}% |")
    lines += ["", f"({len(xs)} windows of {data.ctx_len} tokens, {data.val_bytes_per_token:.2f} bytes per token; "
              "the prompt path runs the blocks in the C kernels in pieces of 64 rows; the head's "
              "rows of every position in torch's matmul on the dequantized weights (bf16: oneDNN); bf16 products take "
              "their inputs rounded to bf16 everywhere; other activations stay fp32, but for int8 and int4 weights at a level "
              "with integer products (x86 from avx2; " + cpu_level() + f" here: {'yes' if kernels().int8_activations else 'no'}), where every product "
              "with them, the head's matmul included, takes its input rounded to int8 per 64 values.)"]
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--agreement-tokens", type=int, default=1000)
    parser.add_argument("--quality-step-windows", type=int, default=4, help="windows of 256 tokens run token by token")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared 2-core machine OpenMP waits for busy cores)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--shape", choices=SHAPES, default="0.1B", help="the random model's shape")
    parser.add_argument("--write", action="store_true", help="write the tables into bench/RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    host = machine()
    print(host, flush=True)
    levels = LEVELS[:LEVELS.index(cpu_level()) + 1][::-1]  # this CPU's first
    top = levels[0]

    cfg = rwkv_lm.RWKVConfig(**SHAPES[args.shape])
    plain = random_weights(cfg)
    tmp = Path(tempfile.mkdtemp())
    official = Official(rwkv_lm.export_official(plain, tmp / "bench.pth", dtype=torch.float32))
    loaded = rwkv_lm.load(rwkv_lm.save(plain, tmp / "bench.safetensors"))  # as it comes: fp32, fused steps
    quantized = {"fp32": loaded, **{w: optimize(copy.deepcopy(loaded), weights=w) for w in ("bf16", "int8", "int4")}}
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(1, cfg.vocab_size - 6, (max(args.prefill_tokens, args.agreement_tokens),), generator=g).tolist()
    P, D, B = args.prefill_tokens, args.decode_tokens, args.batch

    prefill_sides = {"rwkv pip fp32": lambda: official.prefill(tokens[:P]),
                     "rwkv_lm plain fp32": lambda: Ours(plain, top).prefill(tokens[:P])}
    decode_sides = {"rwkv pip fp32": lambda: official.decode(tokens, D),
                    "rwkv_lm plain fp32": lambda: Ours(plain, top).decode(tokens, D)}
    for w, model in quantized.items():
        prefill_sides[f"rwkv_lm {w}"] = lambda m=model: Ours(m, top).prefill(tokens[:P])
        for level in levels:
            decode_sides[f"{w} {level}"] = lambda m=model, lv=level: Ours(m, lv).decode(tokens, D)
        decode_sides[f"{w} {top} B={B}"] = lambda m=model: Ours(m, top).decode(tokens, D, B) / B
    # what bf16 prompts ran before the kernels took them at every length for batch invariance: model.py's blocks,
    # oneDNN's bf16 matmul past 64 rows
    onednn = copy.deepcopy(quantized["bf16"])
    for block in onednn.blocks:
        block.__class__ = Block
    prefill_sides["rwkv_lm bf16, model.py's blocks (oneDNN)"] = lambda: Ours(onednn, top).prefill(tokens[:P])
    prefill = best_of(args.rounds, prefill_sides)
    print("prefill done", flush=True)
    decode = best_of(args.rounds, decode_sides)
    print("decode done", flush=True)
    agreement_tokens = torch.tensor(tokens[:args.agreement_tokens]).view(1, -1)
    agree = {level: step_agreement(quantized["fp32"], quantized["bf16"], agreement_tokens, level) for level in levels}
    bandwidth = stream_read_gbps(args.threads)
    tok_bytes, tok = tokenizer_speed(args.rounds)
    quality_lines = quality(args.quality_step_windows)

    ref_p, ref_d = prefill["rwkv pip fp32"], decode["rwkv pip fp32"]
    reads = {w: weight_bytes(m) for w, m in quantized.items()}
    lines = ["Prefill (one prompt):", "",
             f"| side | prefill {P} tokens, tok/s | vs rwkv pip |", "|---|---:|---:|"]
    lines += [f"| {name} | {P / t:.1f} | {ref_p / t:.2f}x |" for name, t in prefill.items()]
    lines += ["", f"Decode, one sequence (B=1): rwkv pip fp32 {D / ref_d:.1f} tok/s, rwkv_lm plain fp32 (model.py, "
              f"`fast=False`) {D / decode['rwkv_lm plain fp32']:.1f} tok/s ({ref_d / decode['rwkv_lm plain fp32']:.2f}x). "
              f"rwkv_lm at each level of its kernels (`{ISA_ENV}`; the first row is what `rwkv_lm.load` gives on this CPU); "
              f"% of read: the weight bytes a step reads times tokens/s, against the {bandwidth:.1f} GB/s the streaming "
              f"read loop gives with {args.threads} thread{'s' * (args.threads > 1)}:", "",
              "| level | fp32 tok/s | vs rwkv pip | % of read | bf16 tok/s | vs our fp32 | bf16 top token = fp32's "
              "| int8 tok/s | vs our fp32 | int8 % of read | int4 tok/s | vs our int8 | int4 % of read |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for level in levels:
        f32, b16, i8, i4 = (D / decode[f"{w} {level}"] for w in ("fp32", "bf16", "int8", "int4"))
        lines.append(f"| {level} | {f32:.1f} | {f32 * ref_d / D:.2f}x | {100 * f32 * reads['fp32'] / 1e9 / bandwidth:.0f}% "
                     f"| {b16:.1f} | {b16 / f32:.2f}x | {100 * agree[level]:.1f}% | {i8:.1f} | {i8 / f32:.2f}x "
                     f"| {100 * i8 * reads['int8'] / 1e9 / bandwidth:.0f}% | {i4:.1f} | {i4 / i8:.2f}x "
                     f"| {100 * i4 * reads['int4'] / 1e9 / bandwidth:.0f}% |")
    batched = {w: D / decode[f"{w} {top} B={B}"] for w in quantized}
    lines += ["", f"Decode, a batch of {B} sequences ({top}): "
              + ", ".join(f"{w} {batched[w]:.1f} tok/s ({batched[w] / (D / decode[f'{w} {top}']):.1f}x its B=1)" for w in quantized)
              + f"; rwkv pip has no batched RWKV-7 decode (fp32 B={B} is {batched['fp32'] * ref_d / D:.1f}x its one stream).",
              "", "Bytes a decode step reads (all but the embedding): "
              + ", ".join(f"{w} {b / 2**20:.0f} MiB" for w, b in reads.items())
              + f". bf16 agreement: {args.agreement_tokens} positions of a random sequence, token by token.",
              f"World tokenizer: {tok_bytes / 1e6:.2f} MB of mixed text, rwkv_lm {tok_bytes / tok['ours'] / 1e6:.1f} MB/s, "
              f"rwkv TRIE_TOKENIZER {tok_bytes / tok['trie'] / 1e6:.1f} MB/s ({tok['trie'] / tok['ours']:.0f}x), same ids.",
              "", f"Quality, {DEMO_MODEL.relative_to(ROOT)} on the Shakespeare validation windows:", ""] + quality_lines
    table = "\n".join(lines)
    print(table)
    if args.write:
        command = "python bench/bench_cpu.py " + " ".join(sys.argv[1:])
        section = SECTION.format(threads=args.threads, s="s" * (args.threads > 1))
        body = (f"{section}\n\nMachine: {host}.\nCommand: `{command.strip()}` ({args.rounds} interleaved rounds, best of each; "
                f"random weights of the {args.shape} shape; run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}).\n\n{table}\n")
        write_section(section, body)


def write_section(section: str, body: str):
    """Replace our section of RESULTS.md (or add it before the first section), leaving the others as they are."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(section)}\n.*?(?=^## |\Z)", re.M | re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: body + "\n", text)
    else:
        first = re.search(r"^## ", text, re.M)
        text = text[:first.start()] + body + "\n" + text[first.start():] if first else text.rstrip("\n") + "\n\n" + body
    RESULTS.write_text(text)


if __name__ == "__main__":
    main()
