"""The CUDA WKV-7 kernels on a real GPU: correctness against fp64 (about two minutes), a compute-sanitizer
memcheck, then forward and forward+backward timings against the torch chunked op and fla (if installed;
its Triton autotuning takes minutes on first use).

    python bench/gpu_check.py            # needs a CUDA GPU and `pip install -e ".[cuda]"`
    PYTHONPATH=. python3 bench/gpu_check.py   # from the repo root, where torch and CuPy are installed already

Exits non-zero when a check fails; the timing table is printed last, in Markdown for bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import functools
import inspect
import math
import os
import random
import shutil
import subprocess
import sys
import time

import torch

from rwkv_lm.model import DECAY_SCALE
from rwkv_lm.ops.wkv7 import cuda, wkv7, wkv7_chunked, wkv7_one, wkv7_step
from rwkv_lm.testing import random_inputs, rel_err

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 2e-3}  # max|diff| / max|ref|
# (B, T, H, N, with initial state): one token, odd lengths, a multiple of the checkpoint interval, long
SHAPES = [(1, 1, 1, 64, True), (2, 37, 3, 64, True), (3, 16, 2, 64, False), (2, 300, 12, 64, True), (1, 4096, 2, 64, True)]
# how many trailing arguments of each kernel are outputs (they are filled with NaN before every launch)
OUTPUTS = {"wkv7_forward": 4, "wkv7_backward": 7, "wkv7_decode": 2}
GRAD_NAMES = "r log_w k v a b initial_state".split()
MEMCHECK_FOUND_ERRORS = 3  # compute-sanitizer's exit status when it found errors
SPLITS = (1, 2, 4, 8)  # lanes per state row to check and time (cuda.row_split picks 1 or 2)


SEEDS = random.Random()  # seeded once per run (--seed), so a failure can be run again with the same inputs


def cuda_inputs(B, T, H, N, dtype, requires_grad=False, fp32_decay=False):
    """Fresh random inputs on the GPU; fp32_decay: log_w unrounded in fp32, as the model makes it."""
    xs, s0 = random_inputs(B, T, H, N, device="cuda", seed=SEEDS.getrandbits(63))
    xs = [x if i == 1 and fp32_decay else x.to(dtype) for i, x in enumerate(xs)]
    return [x.requires_grad_(requires_grad) for x in xs], s0


class Poisoned:
    """The kernels' launcher for x, filling every output with NaN first, so that nothing unwritten can pass."""

    def __init__(self, x, threads_per_row=1):
        self.launch = cuda._launcher(x, threads_per_row)
        if self.launch is None:
            sys.exit("gpu_check: the CUDA kernels are unavailable (see the warning above)")
        self.threads_per_row = threads_per_row

    def __call__(self, name, grid, block, *args):
        for x in args[-OUTPUTS[name.split("<")[0]]:]:
            if x is not None:
                x.fill_(float("nan"))
        self.launch(name, grid, block, *args)


def check_sequence(B, T, H, N, with_state, dtype, grad, threads_per_row=None, fp32_decay=False):
    """Forward (and, with grad, every gradient) of the kernels against the fp64 chunked op on the same inputs,
    with the row split the op picks unless one is given."""
    xs, s0 = cuda_inputs(B, T, H, N, dtype, requires_grad=grad, fp32_decay=fp32_decay)
    threads_per_row = threads_per_row or cuda.row_split(xs[0], grad)
    s0 = s0.requires_grad_(grad) if with_state else None
    ref_in = [x.detach().double().requires_grad_(grad) for x in xs + ([s0] if with_state else [])]
    o_ref, s_ref = wkv7_chunked(*ref_in[:6], ref_in[6] if with_state else None)
    o, s = cuda._run(Poisoned(xs[0], threads_per_row), cuda.CHECKPOINT_EVERY, *xs, s0)
    # the state is fp32 throughout: 1e-4 fails if anything rounds it (or the decays) to 16 bits
    errs = {"o": (rel_err(o, o_ref), TOLERANCE[dtype]), "state": (rel_err(s, s_ref), 1e-4)}
    if grad:
        do, ds = torch.randn_like(o_ref), torch.randn_like(s_ref)
        inputs = xs + ([s0] if with_state else [])
        grads = torch.autograd.grad((o.double() * do).sum() + (s.double() * ds).sum(), inputs)
        grads_ref = torch.autograd.grad((o_ref * do).sum() + (s_ref * ds).sum(), ref_in)
        for name, g, g_ref in zip(GRAD_NAMES, grads, grads_ref):
            errs[f"d{name}"] = (rel_err(g, g_ref), TOLERANCE[dtype])
    return errs


def check_decode(B, H, N, dtype):
    xs, s0 = cuda_inputs(B, 1, H, N, dtype)
    xs = [x[:, 0] for x in xs]
    o_ref, s_ref = wkv7_step(s0.double(), *(x.double() for x in xs))
    o, s = cuda._decode(Poisoned(xs[0]), s0, *xs)
    return {"o": (rel_err(o, o_ref), TOLERANCE[dtype]), "state": (rel_err(s, s_ref), 1e-5)}


def correctness() -> bool:
    ok = True

    def report(what, errs):
        nonlocal ok
        bad = [k for k, (e, tol) in errs.items() if not e < tol]
        ok &= not bad
        worst = ", ".join(f"{k} {e:.1e}" for k, (e, _) in errs.items())
        print(f"{'FAIL' if bad else 'ok  '} {what}: {worst}" + (f"  <-- {bad}" if bad else ""), flush=True)

    for dname, dtype in DTYPES.items():
        for B, T, H, N, with_state in SHAPES:  # at the row split the op picks for each
            report(f"{dname} B={B} T={T} H={H} N={N} state={with_state} fwd+bwd",
                   check_sequence(B, T, H, N, with_state, dtype, grad=True))
        if dtype != torch.float32:  # what the model feeds: 16-bit inputs with fp32 decays, kept fp32
            report(f"{dname} B=2 T=300 H=12 N=64 fp32 log_w fwd+bwd",
                   check_sequence(2, 300, 12, 64, True, dtype, grad=True, fp32_decay=True))
        report(f"{dname} B=4 T=100 H=12 N=64 inference", check_sequence(4, 100, 12, 64, True, dtype, grad=False))
        for B, H in [(1, 1), (8, 12), (3, 64)]:
            report(f"{dname} decode B={B} H={H} N=64", check_decode(B, H, 64, dtype))
        for split in SPLITS:
            report(f"{dname} B=2 T=37 H=3 N=64 {split} lanes/row fwd+bwd", check_sequence(2, 37, 3, 64, True, dtype, True, split))
    # the dispatcher's default on CUDA tensors is the kernel, and the RNN op agrees with the sequence op
    xs, s0 = cuda_inputs(2, 20, 4, 64, torch.bfloat16)
    o, s = wkv7(*xs, initial_state=s0)
    state = s0
    for t in range(20):
        _, state = wkv7_one(state, *(x[:, t] for x in xs))
    report("bf16 dispatcher default + wkv7_one steps", {"state": (rel_err(state, s.double()), 1e-5)})
    used = [k for k, v in cuda._modules.items() if v is not None]
    print(f"{'ok  ' if used else 'FAIL'} kernels compiled and used for {used}", flush=True)
    return ok and bool(used)


def sanitize_run():
    """What compute-sanitizer watches: small launches of every kernel in every dtype, at the row splits the
    op picks (1 and 2 lanes per row), nothing else."""
    for dtype in DTYPES.values():
        xs, s0 = cuda_inputs(2, 19, 2, 64, dtype, requires_grad=True)
        s0.requires_grad_()
        for split in (1, 2):
            o, s = cuda.wkv7_cuda(*xs, initial_state=s0, threads_per_row=split)
            torch.autograd.grad(o.float().sum() + s.sum(), xs + [s0])
        with torch.no_grad():
            wkv7(*xs, backend="cuda")
            wkv7_one(s0, *(x[:, 0] for x in xs), backend="cuda")
    torch.cuda.synchronize()


def memcheck() -> bool | None:
    """compute-sanitizer memcheck over `sanitize_run` in a child process; None where it cannot run."""
    candidates = [shutil.which("compute-sanitizer"), os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "compute-sanitizer")]
    tool = next((c for c in candidates if c and os.path.exists(c)), None)
    if tool is None:
        print("skip memcheck: compute-sanitizer not found", flush=True)
        return None
    cmd = [tool, "--tool", "memcheck", "--error-exitcode", str(MEMCHECK_FOUND_ERRORS), sys.executable, __file__, "--sanitize-run"]
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        print("skip memcheck: timed out after 120 s", flush=True)
        return None
    summary = next((line for line in reversed(run.stdout.splitlines()) if "ERROR SUMMARY" in line), "no summary")
    if run.returncode in (0, MEMCHECK_FOUND_ERRORS):
        print(f"{'ok  ' if run.returncode == 0 else 'FAIL'} memcheck: {summary}", flush=True)
    else:  # the tool or the child failed for another reason (some sandboxes refuse the sanitizer)
        print(f"skip memcheck: it exited with {run.returncode} ({summary})", flush=True)
    if run.returncode:
        print(run.stdout[-4000:], run.stderr[-4000:], sep="\n", flush=True)
    return {0: True, MEMCHECK_FOUND_ERRORS: False}.get(run.returncode)


def milliseconds(fn, budget_s=1.0):
    """Median of CUDA-event timings, as many runs as fit the budget (3 to 20) after one warm-up."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    reps = max(3, min(20, int(budget_s / max(time.perf_counter() - t0, 1e-6))))
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def fla_ops():
    """fla's chunked RWKV-7 op (the fastest public one) as name -> op, when fla is installed; its state is
    [B, H, key, value], ours [B, H, value, key]."""
    try:
        from fla.ops.rwkv7 import chunk_rwkv7
    except ImportError:
        print("fla is not installed: no fla rows", flush=True)
        return {}
    # fla takes the decays in the inputs' dtype
    ops = {"fla chunk_rwkv7": lambda r, log_w, k, v, a, b: chunk_rwkv7(
        r, log_w.to(r.dtype), k, v, a, b, output_final_state=True)}
    if "lower_bound" in inspect.signature(chunk_rwkv7).parameters:  # the decay bound lets it use bigger chunks
        ops["fla chunk_rwkv7, lower_bound"] = lambda r, log_w, k, v, a, b: chunk_rwkv7(
            r, log_w.to(r.dtype), k, v, a, b, output_final_state=True, lower_bound=-DECAY_SCALE)
    return ops


def check_fla():
    """fla against the same fp64 reference, for comparison (it does not decide pass or fail)."""
    for name, op in fla_ops().items():
        xs, _ = cuda_inputs(2, 300, 12, 64, torch.bfloat16)
        o_ref, s_ref = wkv7_chunked(*(x.double() for x in xs))
        try:
            o, s = op(*xs)
            errs = f"o {rel_err(o, o_ref):.1e}, state {rel_err(s.transpose(-1, -2), s_ref):.1e}"
        except Exception as e:
            errs = f"failed: {type(e).__name__}: {str(e)[:200]}"
        print(f"info {name} bf16 B=2 T=300 H=12 N=64 against fp64: {errs}", flush=True)


def implementations():
    """name -> op on (r, log_w, k, v, a, b) returning (o, final state)."""
    impls = {"cuda (row split by size)": cuda.wkv7_cuda}
    impls |= {f"cuda, {p} lanes/row": functools.partial(cuda.wkv7_cuda, threads_per_row=p) for p in SPLITS}
    impls["torch chunked"] = lambda *xs: wkv7(*xs, backend="chunked")
    return impls | fla_ops()


def benchmark(only=()):
    """bf16 inputs with an fp32 log_w, as the model makes them: training shapes, then a 0.1B model's prefill."""
    rows = []
    for B, T, H, N in [(8, 4096, 64, 64), (8, 4096, 12, 64), (1, 4096, 12, 64)]:
        xs, _ = cuda_inputs(B, T, H, N, torch.bfloat16, requires_grad=True)
        xs[1] = xs[1].detach().float().requires_grad_()
        do = torch.randn(B, T, H, N, device="cuda", dtype=torch.bfloat16)
        for name, fn in implementations().items():
            if only and not any(word in name for word in only):
                continue
            def fwd():
                with torch.no_grad():
                    fn(*xs)

            def fwd_bwd():
                torch.autograd.grad(fn(*xs)[0], xs, do)

            ms = []
            for run in (fwd, fwd_bwd):
                try:
                    ms.append(milliseconds(run))
                except torch.cuda.OutOfMemoryError:
                    ms.append(float("nan"))  # shown as OOM
                except Exception as e:  # another library's op refusing these inputs is a result, not a crash
                    print(f"error {name}: {type(e).__name__}: {str(e)[:300]}", flush=True)
                    ms.append(float("nan"))
                torch.cuda.empty_cache()
            rows.append((name, f"B={B} T={T} H={H} N={N}", *ms, *(B * T * H / (m / 1e3) for m in ms)))
            print(f"timed {name} B={B} T={T} H={H}: fwd {ms[0]:.2f} ms, fwd+bwd {ms[1]:.2f} ms", flush=True)
    return rows


def cell(x, fmt):
    return "--" if math.isnan(x) else format(x, fmt)  # out of memory or refused (the log says which)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sanitize-run", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--skip-bench", action="store_true", help="correctness and memcheck only")
    parser.add_argument("--bench-only", action="store_true", help="timings only (after a run that checked)")
    parser.add_argument("--seed", type=int, help="the run's random seed (default: a fresh one, printed)")
    parser.add_argument("--impls", default="", help="time only the implementations whose names contain one of "
                        "these comma-separated words, e.g. '1 lanes,4 lanes,fla'")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA GPU")
    if args.sanitize_run:
        return sanitize_run()
    started = time.time()
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    SEEDS.seed(seed)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}; "
          f"inputs from --seed {seed}", flush=True)
    ok = True
    if not args.bench_only:
        ok = correctness()
        check_fla()
        ok &= memcheck() is not False
    rows = [] if args.skip_bench else benchmark([w for w in args.impls.split(",") if w])
    print(f"\n{'all checks passed' if ok else 'SOME CHECKS FAILED'} in {time.time() - started:.0f} s; "
          f"{torch.cuda.get_device_name()}, bf16, median of CUDA-event timings\n")
    print("| implementation | shape | fwd ms | fwd+bwd ms | fwd head-tokens/s | fwd+bwd head-tokens/s |")
    print("|---|---|---|---|---|---|")
    for name, shape, f, fb, tf, tfb in rows:
        print(f"| {name} | {shape} | {cell(f, '.2f')} | {cell(fb, '.2f')} | {cell(tf, '.3g')} | {cell(tfb, '.3g')} |")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
