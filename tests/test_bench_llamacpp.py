"""bench/bench_llamacpp.py runs end to end (--quick: a tiny random model, one round, one thread): the greedy
agreement rows, a ratio cell for every precision pair and the bytes-per-token rows. No timing is checked. Skips
where llama-bench is not built (`python bench/llamacpp.py --bench`; `make test` builds only rwkv-greedy)."""
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import llamacpp  # noqa: E402


@pytest.mark.skipif(llamacpp.built(llamacpp.BENCH) is None,
                    reason=f"llama-bench is not built in {llamacpp.CACHE} (python bench/llamacpp.py --bench)")
def test_bench_llamacpp_quick_run_prints_every_row():
    done = subprocess.run([sys.executable, "bench/bench_llamacpp.py", "--quick"], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    tables = done.stdout[done.stdout.index("Greedy agreement"):]  # (the agreement rows are printed early too)
    rows = [line.split("|")[1:-1] for line in tables.splitlines() if line.startswith("| ")]
    agree = [r for r in rows if r[0].strip() in ("default model", "random tiny")]
    assert len(agree) == 10, done.stdout
    assert all(r[3].strip() == "16/16" for r in agree if r[1].strip() == "f32"), "f32 must give our greedy tokens"
    ratios = {r[0].strip(): r[1:] for r in rows if " vs our " in r[0]}
    assert list(ratios) == ["F32 vs our fp32", "BF16 vs our bf16", "F16 vs our bf16", "Q8_0 vs our int8",
                            "Q4_0 vs our int4"]
    assert all(float(cell) > 0 for cells in ratios.values() for cell in cells), done.stdout
    detail = [r for r in rows if r[0].strip() == "1"]
    assert [(r[1].strip(), r[2].strip()) for r in detail] == [("fp32", "f32"), ("bf16", "bf16"), ("bf16", "f16"),
                                                              ("int8", "q8_0"), ("int4", "q4_0")]
    assert all(cell.strip().endswith("%") for r in detail for cell in r[-2:]), done.stdout
