"""Decoding on a GPU: the fused step (rwkv_lm/runtime/cuda_step.py) and its CUDA graphs (rwkv_lm/runtime/cuda_graphs.py)
checked against the eager model, greedy tokens against the official `rwkv` package, then tokens/s.

    PYTHONPATH=. python3 bench/gpu_decode.py            # a CUDA GPU and CuPy; the rwkv package optional
    PYTHONPATH=. python3 bench/gpu_decode.py --dry-run  # the same code on the CPU: the kernels through the
                                                        # emulation (tests/cuda_emu), graphs replayed eagerly

Correctness first (exit 1 when a check fails): for fp32 and bf16 weights, the fused step and the graph replay
against model.step on fresh random weights and states, logits and every state tensor, over batch sizes that
share and change buckets; 64 greedy tokens through the graphs identical to the official package's (fp32).
Then a table for the 0.1B shape with bf16 weights: decode tokens/s at B = 1, 16, 64, 256 for model.step,
the fused step, the fused step in graphs, and the official package (`cuda bf16`, one sequence: B = 1 only).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RWKV_V7_ON", "1")  # read by the rwkv package when rwkv.model is imported
os.environ.setdefault("RWKV_CUDA_ON", "0")  # its kernel is a C++ extension built at import; its decode is torch ops

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from rwkv_lm import RWKVConfig, export_official  # noqa: E402
from rwkv_lm.runtime import cuda_graphs, cuda_step  # noqa: E402
from rwkv_lm.serve import prefill  # noqa: E402
from rwkv_lm.ops import cuda_kernels  # noqa: E402
from rwkv_lm.testing import random_model, rel_err  # noqa: E402

SMALL = RWKVConfig(vocab_size=1000, n_layer=4, n_embd=256, head_size=64, decay_lora=37, iclr_lora=29, value_lora=17,
                   gate_lora=61)  # odd LoRA ranks
DRY = RWKVConfig(vocab_size=300, n_layer=2, n_embd=64, head_size=32, decay_lora=5, iclr_lora=7, value_lora=3, gate_lora=9)
SHAPE_0_1B = RWKVConfig(vocab_size=65536, n_layer=12, n_embd=768, head_size=64)
# max|diff| / max|ref| against the fp32 model.step on the same weights: fp32, and bf16 at least as close as
# model.step in bf16 is (within 1.5x) or within 2e-2
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


class Setup:
    """Where things run: a GPU with the compiled kernels and real graphs, or (dry run) the CPU emulation."""

    def __init__(self, dry_run: bool):
        self.dry_run = dry_run
        self.device = "cpu" if dry_run else "cuda"
        self.kernels = self.capture = None
        if dry_run:
            sys.path.insert(0, str(ROOT / "tests"))
            from cuda_emu.emu import EmuKernels, build, eager_capture

            self.kernels = EmuKernels(build("rwkv7_step_emu", Path(tempfile.mkdtemp())))
            self.capture = eager_capture([])

    def graphs(self, model):
        return cuda_graphs.CUDAGraphStep(model, kernels=self.kernels, capture=self.capture)

    def fused(self, model):
        return lambda tokens, state: cuda_step.fused_step(model, tokens, state, kernels=self.kernels)

    def sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()


def random_state(model, batch_size, generator):
    return model.init_state(batch_size).map(lambda t: torch.randn(t.shape, generator=generator).to(t.dtype).to(t.device))


def worst(ours, ref):
    """(name, rel_err) of the worst of the logits and every state tensor."""
    (logits, state), (ref_logits, ref_state) = ours, ref
    ref_tensors = ref_state.tensors()
    errs = {"logits": rel_err(logits, ref_logits), **{n: rel_err(t, ref_tensors[n]) for n, t in state.tensors().items()}}
    name = max(errs, key=lambda n: float("inf") if errs[n] != errs[n] else errs[n])  # NaN is the worst
    return name, errs[name]


@torch.no_grad()
def correctness(setup: Setup) -> bool:
    ok = True
    torch.backends.cuda.matmul.allow_tf32 = False  # compare true fp32 (the rwkv package turns TF32 on)
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    cfg = DRY if setup.dry_run else SMALL
    exact = random_model(cfg, seed=int(torch.randint(1 << 30, (1,), generator=g))).to(setup.device)
    batches = (1, 3, 4, 3) if setup.dry_run else (1, 3, 16, 64, 3, 256)
    for dtype in TOLERANCE:
        model = copy.deepcopy(exact).to(dtype)
        fused, graphs = setup.fused(model), setup.graphs(model)
        for B in batches:
            state = random_state(exact, B, g)
            tokens = torch.randint(cfg.vocab_size, (B,), generator=g).to(setup.device)
            cast = state.map(lambda t: t if t.dim() == 4 else t.to(dtype))
            ref = exact.step(tokens, state)
            _, eager_err = worst(model.step(tokens, cast), ref)
            limit = TOLERANCE[dtype] if dtype == torch.float32 else max(TOLERANCE[dtype], 1.5 * eager_err)
            for what, step in (("fused", fused), ("graphs", graphs)):
                name, err = worst(step(tokens, cast), ref)
                passed = err < limit
                ok &= passed
                print(f"{'ok  ' if passed else 'FAIL'} {str(dtype)[6:]} {what} B={B}: worst {name} {err:.2e} "
                      f"(< {limit:.1e}; model.step in this dtype: {eager_err:.2e})", flush=True)
        captured = sorted(bucket for bucket, graph in graphs._graphs.items() if graph is not None)
        print(f"info {str(dtype)[6:]}: graphs captured for buckets {captured}", flush=True)
    mismatches = official_greedy_mismatch(exact, setup, n=64)
    if mismatches is None:
        print("skip greedy parity: the rwkv package is not installed", flush=True)
    else:
        ok &= mismatches == 0
        print(f"{'ok  ' if mismatches == 0 else 'FAIL'} greedy tokens through the graphs differing from the official "
              f"rwkv package (fp32): {mismatches} of 64", flush=True)
    return ok


def official(model, device, dtype):
    try:
        from rwkv.model import RWKV as Official
    except ImportError:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = export_official(model, Path(tmp) / "model.pth", dtype=torch.float32 if dtype == "fp32" else torch.bfloat16)
        return Official(model=str(path)[: -len(".pth")], strategy=f"{device} {dtype}")


def official_greedy_mismatch(model, setup: Setup, n: int) -> int | None:
    """How many of n greedy tokens differ between the graph steps and the rwkv package (fp32, same weights)."""
    theirs_model = official(model, setup.device, "fp32")
    if theirs_model is None:
        return None
    torch.backends.cuda.matmul.allow_tf32 = False
    prompt = torch.randint(model.config.vocab_size, (20,)).tolist()
    theirs, ours = [], []
    out, state = theirs_model.forward(prompt, None)
    for _ in range(n):
        theirs.append(int(out.argmax()))
        out, state = theirs_model.forward([theirs[-1]], state)
    graphs = setup.graphs(model)
    logits, state = prefill(model, prompt)
    for _ in range(n):
        ours.append(int(logits.argmax()))
        logits, state = graphs(torch.tensor([ours[-1]], device=setup.device), state)
        logits = logits[0]
    return sum(a != b for a, b in zip(ours, theirs))


def tokens_per_second(step, tokens, state, steps, setup: Setup, reps=3):
    """Median over reps of B * steps / wall time of `steps` chained steps, after one warm-up run."""
    def run():
        s = state
        for i in range(steps):
            _, s = step(tokens[i], s)

    run()
    times = []
    for _ in range(reps):
        setup.sync()
        start = time.perf_counter()
        run()
        setup.sync()
        times.append(time.perf_counter() - start)
    return tokens.shape[1] * steps / sorted(times)[len(times) // 2]


@torch.no_grad()
def speed(setup: Setup):
    cfg = DRY if setup.dry_run else SHAPE_0_1B
    model = random_model(cfg, dtype=torch.bfloat16).to(setup.device)
    steps = 2 if setup.dry_run else 64
    batches = (1, 4) if setup.dry_run else (1, 16, 64, 256)
    impls = {"model.step (eager)": torch.no_grad()(model.step), "fused step": setup.fused(model),
             "fused step + CUDA graphs": setup.graphs(model)}
    rows = []
    for B in batches:
        tokens = torch.randint(cfg.vocab_size, (steps, B)).to(setup.device)
        _, state = model(torch.randint(cfg.vocab_size, (B, 8)).to(setup.device))
        row = [f"decode B={B}"]
        for name, step in impls.items():
            row.append(tokens_per_second(step, tokens, state, steps, setup))
            print(f"timed {name} B={B}: {row[-1]:,.0f} tok/s", flush=True)
        row.append(official_speed(model, setup, steps) if B == 1 else None)
        rows.append(row)
    return list(impls) + ["rwkv pip cuda bf16" if setup.device == "cuda" else "rwkv pip cpu fp32"], rows


def official_speed(model, setup: Setup, steps):
    theirs = official(model, setup.device, "bf16" if setup.device == "cuda" else "fp32")
    if theirs is None:
        return None
    ids = torch.randint(model.config.vocab_size, (steps + 16,)).tolist()
    _, state = theirs.forward(ids[:16], None)

    def run():
        s = [x.clone() for x in state]
        for i in range(steps):
            _, s = theirs.forward([ids[16 + i]], s)

    run()
    times = []
    for _ in range(3):
        setup.sync()
        start = time.perf_counter()
        run()
        setup.sync()
        times.append(time.perf_counter() - start)
    return steps / sorted(times)[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="on the CPU through the emulation, small models")
    parser.add_argument("--skip-speed", action="store_true", help="correctness only")
    args = parser.parse_args()
    if not args.dry_run and not cuda_kernels.available():
        sys.exit("gpu_decode: needs a CUDA GPU and CuPy (or --dry-run)")
    setup = Setup(args.dry_run)
    name = "CPU (dry run: emulated kernels)" if args.dry_run else torch.cuda.get_device_name()
    print(f"{name}, torch {torch.__version__}", flush=True)
    started = time.time()
    ok = correctness(setup)
    columns, rows = ([], []) if args.skip_speed else speed(setup)
    print(f"\n{'all checks passed' if ok else 'SOME CHECKS FAILED'} in {time.time() - started:.0f} s; {name}, "
          f"{'dry-run model' if args.dry_run else '0.1B shape'}, bf16 weights, tokens/s (median of 3 runs)\n")
    if rows:
        print("| what | " + " | ".join(columns) + " |")
        print("|---|" + "---:|" * len(columns))
        for what, *values in rows:
            print(f"| {what} | " + " | ".join("" if v is None else f"{v:,.0f}" for v in values) + " |")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
