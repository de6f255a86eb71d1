"""Training throughput of the 0.1B shape through `python -m train fit` (bf16-mixed on a GPU): tokens/s and
model FLOPs utilization at ctx 512 and 4096.

    PYTHONPATH=. python3 bench/gpu_train_speed.py              # a CUDA GPU; the world tokenizer, Shakespeare
    PYTHONPATH=. python3 bench/gpu_train_speed.py --dry-run    # a tiny model for a few steps on the CPU

Each run trains for --steps steps on the embedded Shakespeare (world tokenizer, vocab 65536) with the
trainer's own logging; tokens/s is the median of the per-step `tok/s` the trainer logs, after the first
--warmup steps (compilation, cuDNN/cuBLAS tuning, allocator growth). Model FLOPs per token: 6 x the
parameters outside the embedding (head included), plus the WKV-7 recurrence, ~30 N C per layer (forward
~10 N^2 per head, backward twice that). MFU: that rate over the card's dense bf16 peak (--peak-tflops, or
from the card's name for H100/H200/A100).
"""
from __future__ import annotations

import argparse
import csv
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from rwkv_lm import RWKVConfig  # noqa: E402
from rwkv_lm.model import RWKV  # noqa: E402

SHAPE_0_1B = dict(n_layer=12, n_embd=768, head_size=64)
TINY = dict(n_layer=2, n_embd=64, head_size=32)
DENSE_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}  # SXM datasheets, without sparsity
# ctx -> windows per step (about 32k tokens a step at either length)
RUNS = {512: 64, 4096: 8}


def flops_per_token(cfg: RWKVConfig) -> float:
    with torch.device("meta"):
        n = RWKV(cfg).num_params(include_embedding=False)
    return 6 * n + 30 * cfg.head_size * cfg.n_embd * cfg.n_layer


def peak_tflops(given: float | None) -> float | None:
    if given:
        return given
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in DENSE_BF16_TFLOPS.items() if k in name), None)


def write_config(path: Path, shape: dict, ctx: int, batch: int, steps: int, root: Path, tokenizer: str):
    path.write_text(f"""trainer:
  max_steps: {steps}
  limit_val_batches: 0
  num_sanity_val_steps: 0
  log_every_n_steps: 1
  enable_progress_bar: false
  default_root_dir: {root}
model:
  arch: rwkv7
  config: {{n_layer: {shape['n_layer']}, n_embd: {shape['n_embd']}, head_size: {shape['head_size']}}}
  lr: 6.0e-4
  lr_final: 6.0e-5
  warmup_steps: 5
data:
  train: [shakespeare]
  tokenizer: {tokenizer}
  vocab_size: 512
  ctx_len: {ctx}
  batch_size: {batch}
""")


def step_rates(root: Path) -> list[float]:
    """The per-step tok/s values the trainer logged (CSV logger), in order."""
    rows = []
    for metrics in sorted(root.glob("**/metrics.csv")):
        with metrics.open() as f:
            rows += [float(r["tok/s"]) for r in csv.DictReader(f) if r.get("tok/s")]
    return rows


def run(shape, ctx, batch, steps, warmup, tokenizer, timeout):
    """One training run: (median tokens/s after warmup or None, wall seconds, exit status, log tail)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = root / "speed.yaml"
        write_config(config, shape, ctx, batch, steps, root / "run", tokenizer)
        start = time.time()
        try:
            proc = subprocess.run([sys.executable, "-m", "train", "fit", "--config", str(config)], cwd=ROOT,
                                  capture_output=True, text=True, timeout=timeout)
            status, log = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as e:
            status, log = "timeout", f"{e.stdout or ''}{e.stderr or ''}"
        rates = step_rates(root / "run")[warmup:]
        return (statistics.median(rates) if rates else None), time.time() - start, status, log[-1500:]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="a tiny model, ctx 64, a few steps (CPU)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--ctx", type=int, nargs="*", default=list(RUNS))
    parser.add_argument("--peak-tflops", type=float, help="the card's dense bf16 peak (default: from its name)")
    parser.add_argument("--timeout", type=int, default=240, help="seconds per run")
    args = parser.parse_args()
    if args.dry_run:
        shape, runs, steps, warmup, tokenizer = TINY, {64: 4}, 6, 2, "embedded"
    else:
        if not torch.cuda.is_available():
            sys.exit("gpu_train_speed: needs a CUDA GPU (or --dry-run)")
        shape, runs, steps, warmup, tokenizer = SHAPE_0_1B, {c: RUNS.get(c, 8) for c in args.ctx}, args.steps, args.warmup, "world"
    vocab = 512 if tokenizer == "embedded" else 65536
    per_token = flops_per_token(RWKVConfig(vocab_size=vocab, **shape))
    peak = peak_tflops(args.peak_tflops)
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    rows, ok = [], True
    for ctx, batch in runs.items():
        rate, wall, status, log = run(shape, ctx, batch, steps, warmup, tokenizer, args.timeout)
        print(f"== ctx {ctx} x {batch} windows, {steps} steps: exit {status} after {wall:.0f} s", flush=True)
        if status != 0 or rate is None:
            ok = False
            print(log, flush=True)
        rows.append((ctx, batch, rate))
    print(f"\n{name}, {shape}, vocab {vocab}, {per_token / 1e6:.0f} MFLOP per token; tokens/s: median per-step rate "
          f"after {warmup} steps; MFU against {peak or '?'} TFLOP/s dense bf16\n")
    print("| ctx | windows per step | tokens/s | model TFLOP/s | MFU |")
    print("|---:|---:|---:|---:|---:|")
    for ctx, batch, rate in rows:
        tflops = None if rate is None else rate * per_token / 1e12
        mfu = f"{tflops / peak:.1%}" if tflops is not None and peak else ""
        print(f"| {ctx} | {batch} | {'' if rate is None else f'{rate:,.0f}'} | "
              f"{'' if tflops is None else f'{tflops:.1f}'} | {mfu} |")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
