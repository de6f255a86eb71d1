"""bench/bench_demo.py's arena mode runs end to end on the default models (short settings): the race and the
sweep print a row per model and round. No timing is checked."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_demo_arena_prints_the_race_and_the_sweep():
    done = subprocess.run([sys.executable, "bench/bench_demo.py", "arena", "--rounds", "1", "--max-tokens", "8",
                           "--lengths", "8,24", "--steps", "2", "--threads", "1"], cwd=REPO, capture_output=True,
                          text=True, timeout=900, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in done.stdout.splitlines() if line.startswith("| 1 |")]
    assert [row[1].strip() for row in rows] == ["RWKV-7", "GPT (baseline)", "RWKV-7 ms/token", "RWKV-7 MB",
                                                "GPT (baseline) ms/token", "GPT (baseline) MB"], done.stdout
    assert "2.0M parameters" in done.stdout
