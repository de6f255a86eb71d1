"""bench/bench_serve.py runs end to end (a tiny model, the smoke settings): the engine, the real server over HTTP
and the prefix cache measurement all answer, and every number and goal line is printed. No timing is checked."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_serve_quick_run_prints_every_number():
    done = subprocess.run([sys.executable, "bench/bench_serve.py", "--quick", "--shape", "tiny", "--threads", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| streams"))
    table = [line for line in lines[start:] if line.startswith("|")]
    table = table[:next((i for i, line in enumerate(table) if i > 1 and not line.split("|")[1].strip()[:1].isdigit()), len(table))]
    assert [line.split("|")[1].strip() for line in table[2:]] == ["1 by 1", "1", "16"]
    assert all("nan" not in line for line in table), out
    assert "prefix cache, 2000-token shared prefix" in out
    assert sum(line.startswith(("- PASS", "- FAIL")) for line in out.splitlines()) == 5, out  # serving 3, features 2
    assert "Command: `python bench/bench_serve.py --quick --shape tiny --threads 1`" in out
