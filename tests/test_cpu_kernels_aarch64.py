"""The CPU kernels' aarch64 paths, run: cross-compiled with tests/aarch64_driver.c and run under qemu-user, their
products and recurrence checked against torch in fp64.

aarch64's two levels, neon (the NEON widening loads) and generic (plain C, no SIMD), both with VW=4 and 6-row
batch tiles, are never taken on an x86 machine, where test_cpu_kernels.py only builds them. Needs
gcc-aarch64-linux-gnu and qemu-user (`make setup-test` installs both)."""
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rwkv_lm.ops.cpu_kernels import INT4_GROUP, SOURCE, dequantize_int4
from rwkv_lm.ops.wkv7 import wkv7_naive
from rwkv_lm.runtime.cpu import to_panels
from rwkv_lm.testing import rel_err

DRIVER = Path(__file__).with_name("aarch64_driver.c")
RTOL = 1e-5  # fp32 accumulation, against the largest magnitude of the reference
# (out, in): `in` a multiple of 4 vectors, of one vector but not four (the single-vector loop), of neither (the
# scalar tails); out never a multiple of the 4-row tile, and 93 x 768 large enough for the threads to split it
GEMV_SHAPES = [(13, 64), (13, 100), (13, 101), (93, 768)]
GEMV_BATCHES = [1, 5, 16, 65]  # one row (no tiles); a part tile; tiles of 6 + 6 + 4; two passes over the weights (33 + 32)
# (batch, len, heads, n): decode steps and prompts, the last two large enough for the threads to split them
WKV_SHAPES = [(1, 1, 2, 16), (17, 1, 2, 32), (5, 1, 4, 64), (2, 7, 3, 64)]
THREADS = [1, 2]


def gemv_cases(gen):
    """(kernel, (out, in, batch), its input arrays, {output: fp64 reference}) for every shape, batch and weight type."""
    for out, in_ in GEMV_SHAPES:
        for batch in GEMV_BATCHES:
            dims = (out, in_, batch)
            x = torch.randn(batch, in_, generator=gen)
            w = torch.randn(out, in_, generator=gen)
            w_bf16 = w.bfloat16()
            w_i8 = torch.randint(-128, 128, (out, in_), generator=gen, dtype=torch.int8)
            scale = torch.rand(out, generator=gen) * 0.02 + 0.001
            yield "gemv_f32", dims, dict(W=w, x=x), dict(y=x.double() @ w.double().T)
            yield "gemv_f32_panels", dims, dict(W=to_panels(w), x=x), dict(y=x.double() @ w.double().T)
            yield "gemv_bf16", dims, dict(W=w_bf16.view(torch.int16), x=x), dict(y=x.bfloat16().double() @ w_bf16.double().T)
            yield ("gemv_bf16_panels", dims, dict(W=to_panels(w_bf16).view(torch.int16), x=x),
                   dict(y=x.bfloat16().double() @ w_bf16.double().T))
            yield ("gemv_i8", dims, dict(W=w_i8, scale=scale, x=x),
                   dict(y=x.double() @ (w_i8.double() * scale.double()[:, None]).T))
            # the LoRAs' kernel, W [in, out]
            yield "gemv_cols_f32", dims, dict(W=w.T, x=x), dict(y=x.double() @ w.double().T)
            yield "gemv_cols_bf16", dims, dict(W=w_bf16.T.view(torch.int16), x=x), dict(y=x.double() @ w_bf16.double().T)
            yield ("gemv_cols_i8", dims, dict(W=w_i8.T, scale=scale, x=x),
                   dict(y=x.double() @ (w_i8.double() * scale.double()[:, None]).T))
            if in_ % INT4_GROUP == 0:  # (int4 rows are whole groups)
                w_i4 = torch.randint(0, 256, (out, in_ // 2), generator=gen, dtype=torch.uint8)
                group_scale = torch.randn(out, in_ // INT4_GROUP, generator=gen) * 0.02
                yield ("gemv_i4", dims, dict(W=w_i4, scale=group_scale, x=x),
                       dict(y=x.double() @ dequantize_int4(w_i4, group_scale).double().T))


def wkv_cases(gen):
    """("wkv7_f32", (batch, len, heads, n), its inputs, {output: fp64 reference}) for every shape: RWKV-7's
    a = -kk, b = kk * iclr and decays in (0, 1), so the state stays bounded as it does in the model."""
    for dims in WKV_SHAPES:
        batch, len_, heads, n = dims

        def values():
            return torch.randn(batch, len_, heads, n, generator=gen)

        r, k, v = values(), values(), values()
        w = torch.exp(-torch.exp(values() * 0.5 - 1.0))
        kk = F.normalize(values(), dim=-1)
        a, b = -kk, kk * torch.rand(batch, len_, heads, n, generator=gen)
        S = torch.randn(batch, heads, n, n, generator=gen) * 0.1
        log_w = w.double().log()  # in fp64: the reference's decays are the kernel's to fp64 precision
        y, S_new = wkv7_naive(*(t.double() for t in (r, log_w, k, v, a, b)), initial_state=S.double())
        yield "wkv7_f32", dims, dict(S=S, r=r, w=w, k=k, v=v, a=a, b=b), dict(y=y, S_new=S_new)


@pytest.mark.parametrize("march", ["armv8-a", "armv8-a+nosimd"], ids=["neon", "generic"])
def test_kernels_run_on_aarch64(tmp_path, march):
    """gemv_f32, gemv_f32_panels, gemv_bf16, gemv_bf16_panels, gemv_i8, gemv_i4, gemv_cols and wkv7_f32 built for
    aarch64 match torch in fp64 (bf16, int8 and int4 weights widened and scaled exactly; bf16 products take x rounded
    to bf16) to fp32 accuracy, at 1 and 2 threads."""
    compiler, qemu = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64")
    if compiler is None:
        pytest.skip("no aarch64 cross compiler (apt-get install gcc-aarch64-linux-gnu, as make setup-test does)")
    if qemu is None:
        pytest.skip("no qemu-aarch64 (apt-get install qemu-user, as make setup-test does)")
    driver = tmp_path / "driver"
    # static (libgomp.a comes with the cross compiler), so qemu needs no aarch64 root for the shared libraries
    build = subprocess.run([compiler, "-O3", f"-march={march}", "-fopenmp", "-static", "-Wall", "-Wextra", "-Werror",
                            "-o", str(driver), str(DRIVER), str(SOURCE), "-lm"], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr

    gen = torch.Generator().manual_seed(0)
    lines, expected = [], []  # expected: (output file, fp64 reference, kernel and output, the case)
    for i, (kernel, dims, inputs, references) in enumerate([*gemv_cases(gen), *wkv_cases(gen)]):
        for threads in THREADS:
            prefix = tmp_path / f"{i}-{threads}"
            for name, tensor in inputs.items():
                tensor.contiguous().numpy().tofile(f"{prefix}.{name}")
            lines.append(f"{kernel} {prefix} {' '.join(map(str, dims))} {threads}")
            for name, reference in references.items():
                expected.append((f"{prefix}.{name}", reference, f"{kernel} {name}", f"{dims} threads={threads}"))

    run = subprocess.run([qemu, str(driver)], input="\n".join(lines), capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr

    worst = {}  # kernel and output -> (error, case)
    for path, reference, output, case in expected:
        err = rel_err(torch.from_numpy(np.fromfile(path, dtype=np.float32)).reshape(reference.shape), reference)
        err = math.inf if math.isnan(err) else err  # not finite (or left unwritten, so NaN): the worst there is
        worst[output] = max(worst.get(output, (-1.0, "")), (err, case))
    print(f"{march}: " + ", ".join(f"{output} {err:.2e}" for output, (err, _) in worst.items()))
    failed = {output: w for output, w in worst.items() if not w[0] < RTOL}
    assert not failed, f"max|diff| / max|ref| >= {RTOL:.0e} on {march}: {failed}"
