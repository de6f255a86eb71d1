"""bench/bench_cpu.py runs end to end (a tiny random model, one round): the official package beside ours, a row
for every kernel level this CPU has, and the bf16, int8 and int4 quality rows of the demo model. No timing is checked."""
import subprocess
import sys
from pathlib import Path

import pytest

from rwkv_lm.ops.cpu_kernels import LEVELS, cpu_level

REPO = Path(__file__).resolve().parents[1]


def test_bench_cpu_quick_run_prints_every_row():
    pytest.importorskip("rwkv", reason="the official rwkv package (the oracle) is in the dev extra")
    done = subprocess.run([sys.executable, "bench/bench_cpu.py", "--shape", "tiny", "--rounds", "1", "--decode-tokens", "2",
                           "--prefill-tokens", "8", "--agreement-tokens", "8", "--quality-step-windows", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line for line in done.stdout.splitlines() if line.startswith("|")}
    levels = LEVELS[:LEVELS.index(cpu_level()) + 1]
    assert all(level in rows for level in levels), done.stdout
    assert {"rwkv pip fp32", "rwkv_lm plain fp32", "rwkv_lm fp32", "rwkv_lm bf16", "rwkv_lm int8", "rwkv_lm int4"} <= rows.keys()
    assert {"fp32", "bf16", "int8", "int4"} <= rows.keys(), "the quality rows"
    assert all("nan" not in line and "inf" not in line for line in rows.values()), done.stdout


def test_bench_load_prints_a_row_for_each_checkout_and_precision(tmp_path, tiny_model):
    import rwkv_lm

    path = rwkv_lm.save(tiny_model, tmp_path / "tiny.safetensors")
    done = subprocess.run([sys.executable, "bench/bench_load.py", str(path), "--weights", "fp32", "int8", "--old", str(REPO),
                           "--rounds", "1"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in done.stdout.splitlines() if line.startswith("| fp32") or line.startswith("| int8")]
    assert sorted((w.strip(), side.strip()) for w, side, *_ in rows) == [("fp32", "new"), ("fp32", "old"), ("int8", "new"), ("int8", "old")]
    assert all(float(row[i]) > 0 for row in rows for i in (2, 3, 5)), done.stdout  # (a tiny model's own memory can round to 0)
