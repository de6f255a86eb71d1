"""RWKV-7 models on a real GPU: the whole model with the CUDA kernels against the same model on the torch
ops (logits, state, every parameter's gradient, prefill then decode), greedy decoding against the official
`rwkv` package (0.8.x, 'cuda fp32') on the same weights, then prefill and decode speed of the 0.1B shape.

    PYTHONPATH=. python3 bench/gpu_model.py        # torch and CuPy installed; the `rwkv` package optional
    python bench/gpu_model.py --device cpu --quick  # the same code on the CPU (a dry run of the script)

Exits non-zero when a check fails; the speed table is printed last. The official package runs with
RWKV_CUDA_ON=0 (its kernel is a C++ extension built at import): its one-token steps are torch ops either way.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RWKV_V7_ON", "1")  # read by the rwkv package when rwkv.model is imported
os.environ.setdefault("RWKV_CUDA_ON", "0")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rwkv_lm import RWKVConfig, export_official  # noqa: E402
from rwkv_lm.serve import prefill  # noqa: E402
from rwkv_lm.ops.wkv7 import cuda  # noqa: E402
from rwkv_lm.testing import random_model, rel_err  # noqa: E402

SMALL = RWKVConfig(vocab_size=1000, n_layer=4, n_embd=256, head_size=64)
SHAPE_0_1B = RWKVConfig(vocab_size=65536, n_layer=12, n_embd=768, head_size=64)


@contextlib.contextmanager
def backend(name):
    """Run the model's WKV op on one backend for a while (the dispatcher reads this at every call)."""
    old = os.environ.get("RWKV_LM_WKV_BACKEND")
    os.environ["RWKV_LM_WKV_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            del os.environ["RWKV_LM_WKV_BACKEND"]
        else:
            os.environ["RWKV_LM_WKV_BACKEND"] = old


def loss_and_grads(model, tokens):
    logits, state = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
    names, params = zip(*model.named_parameters())
    return logits.detach(), state.layers[-1].wkv.detach(), dict(zip(names, torch.autograd.grad(loss, params)))


def correctness(device, kernel) -> bool:
    ok = True

    def report(what, err, tol):
        nonlocal ok
        ok &= err < tol
        print(f"{'ok  ' if err < tol else 'FAIL'} {what}: {err:.3g} (< {tol:.3g})", flush=True)

    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))
    tokens = torch.randint(SMALL.vocab_size, (2, 301), generator=g).to(device)
    model = random_model(SMALL, seed=int(torch.randint(1 << 30, (1,), generator=g))).to(device)
    with backend("chunked"):
        ref_logits, ref_state, ref_grads = loss_and_grads(model, tokens)
    with backend(kernel):
        logits, state, grads = loss_and_grads(model, tokens)
    report(f"fp32 logits, {kernel} vs chunked", rel_err(logits, ref_logits), 1e-4)
    report(f"fp32 last-layer state, {kernel} vs chunked", rel_err(state, ref_state), 1e-4)
    report(f"fp32 gradients (worst of {len(grads)} parameters), {kernel} vs chunked",
           max(rel_err(grads[n], ref_grads[n]) for n in grads), 1e-3)

    with torch.no_grad(), backend(kernel):
        half = copy.deepcopy(model).to(torch.bfloat16)
        report(f"bf16 model logits ({kernel}) vs the fp32 model", rel_err(half(tokens)[0], model(tokens)[0]), 5e-2)
        full, _ = model(tokens)
        _, state = model(tokens[:, :-1])
        last, _ = model.step(tokens[:, -1], state)
        report("prefill then one decode step vs the whole sequence (fp32)", rel_err(last, full[:, -1]), 1e-4)
    mismatches = official_greedy_mismatch(model, device)
    if mismatches is None:
        print("skip greedy parity: the rwkv package is not installed", flush=True)
    else:
        report("greedy tokens differing from the official rwkv package (fp32, of 40)", mismatches, 1)
    return ok


@torch.no_grad()
def official_greedy_mismatch(model, device, n=40) -> float:
    """How many of n greedy tokens differ from the `rwkv` package's on the same weights (0 passes); None when
    the package is not installed."""
    try:
        from rwkv.model import RWKV as Official
    except ImportError:
        return None
    torch.backends.cuda.matmul.allow_tf32 = False  # the package turns TF32 on at import: compare true fp32
    prompt = torch.randint(model.config.vocab_size, (20,)).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        path = export_official(model, Path(tmp) / "model.pth", dtype=torch.float32)
        official = Official(model=str(path)[: -len(".pth")], strategy=f"{device} fp32")
    theirs, ours = [], []
    out, state = official.forward(prompt, None)
    for _ in range(n):
        theirs.append(int(out.argmax()))
        out, state = official.forward([theirs[-1]], state)
    logits, state = prefill(model, prompt)
    for _ in range(n):
        ours.append(int(logits.argmax()))
        logits, state = model.step(torch.tensor([ours[-1]], device=device), state)
        logits = logits[0]
    return sum(a != b for a, b in zip(ours, theirs))


def seconds(fn, device, reps=5):
    """Median wall time of fn (synchronized), after one warm-up run."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fn()
    times = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


@torch.no_grad()
def speed(device, quick) -> list[tuple[str, float, float | None]]:
    """(what, rwkv_lm tokens/s, official tokens/s or None) for the 0.1B shape with bf16 weights."""
    cfg = SMALL if quick else SHAPE_0_1B
    model = random_model(cfg, dtype=torch.bfloat16).to(device)
    prompt_len, steps = (64, 8) if quick else (4096, 128)
    tokens = torch.randint(cfg.vocab_size, (64, prompt_len), device=device)
    rows = {}
    for batch in (1, 8):
        t = seconds(lambda: model(tokens[:batch], last_only=True), device, reps=3)
        rows[f"prefill B={batch} T={prompt_len}"] = [batch * prompt_len / t, None]
    for batch in (1, 16, 64):
        _, state = model(tokens[:batch, :16])

        def decode():
            s = state
            for i in range(steps):
                _, s = model.step(tokens[:batch, 16 + i], s)

        rows[f"decode B={batch}"] = [batch * steps / seconds(decode, device, reps=3), None]

    official = official_model(model, device)
    if official is not None:
        ids = tokens[0].tolist()
        short = min(512, prompt_len)
        ours = short / seconds(lambda: model(tokens[:1, :short], last_only=True), device)
        rows.setdefault(f"prefill B=1 T={short}", [ours, None])[1] = short / seconds(
            lambda: official.forward(ids[:short], None), device, reps=3)
        _, state = official.forward(ids[:16], None)

        def official_decode():
            s = [x.clone() for x in state]
            for i in range(steps):
                _, s = official.forward([ids[16 + i]], s)

        rows["decode B=1"][1] = steps / seconds(official_decode, device, reps=3)
    return [(what, *values) for what, values in rows.items()]


def official_model(model, device):
    try:
        from rwkv.model import RWKV as Official
    except ImportError:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = export_official(model, Path(tmp) / "model.pth")
        return Official(model=str(path)[: -len(".pth")], strategy=f"{device} bf16")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="a small model for the speed part (dry runs)")
    args = parser.parse_args()
    if args.device == "cuda" and not (torch.cuda.is_available() and cuda.available()):
        sys.exit("gpu_model: needs a CUDA GPU and CuPy")
    kernel = "cuda" if args.device == "cuda" else "naive"  # on the CPU the per-step reference stands in
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}", flush=True)
    ok = correctness(args.device, kernel)
    rows = speed(args.device, args.quick)
    print(f"\n{'all checks passed' if ok else 'SOME CHECKS FAILED'}; {name}, bf16 weights, median wall time\n")
    print("| what | rwkv_lm tok/s | rwkv pip tok/s | ratio |")
    print("|---|---:|---:|---:|")
    for what, ours, theirs in rows:
        print(f"| {what} | {ours:,.0f} | {'' if theirs is None else f'{theirs:,.0f}'} | "
              f"{'' if theirs is None else f'{ours / theirs:.2f}x'} |")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
