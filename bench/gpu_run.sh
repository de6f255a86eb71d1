#!/usr/bin/env bash
# Everything a lent GPU checks, in one call from the repo root (bench/RESULTS.md has the exact command):
# the GPU cases of the test suite, a short bf16-mixed training run on the kernels, the model-level check
# and speed table (bench/gpu_model.py), then the kernels' check and timing table (bench/gpu_check.py).
# Packages the machine lacks travel as wheels in .whl/ (fla-core, rwkv, pyrwkv-tokenizer, jsonargparse ...).
set -u
OUT=${OUT:-/tmp/gpu_run}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv

failed=""
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, show the end
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS status
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    status=$?
    echo "== $name: exit $status after $((SECONDS - start)) s"
    tail -n "${TAIL:-8}" "$OUT/$name.log"
    [ "$status" = 0 ] || failed="$failed $name"
}
step pytest 60 python3 -m pytest -q -p no:cacheprovider tests/test_wkv7_cuda.py -k gpu
step train 100 python3 -m train fit --config train/configs/tiny.yaml --trainer.default_root_dir /tmp/runs \
    --trainer.enable_progress_bar false
grep -h "" /tmp/runs/*/version_*/metrics.csv 2>/dev/null | cut -c1-160 | sed -n '1p;$p'
TAIL=16 step gpu_model 130 python3 bench/gpu_model.py
TAIL=40 step gpu_check 290 python3 bench/gpu_check.py
if [ -n "$failed" ]; then echo "FAILED:$failed"; exit 1; fi
echo "all steps passed"
