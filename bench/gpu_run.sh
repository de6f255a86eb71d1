#!/usr/bin/env bash
# Everything a lent GPU checks, from the repo root (bench/RESULTS.md has the exact commands):
#
#   bash bench/gpu_run.sh [STEP ...]      # default: every step, in this order (more than one 10-minute call)
#   bash bench/gpu_run.sh --dry-run       # the CPU-runnable parts here: emulated kernels, eager "graphs"
#
# Steps, each with a time limit (seconds), correctness before speed within each:
#   pytest      120  the GPU cases of the test suite (WKV kernels; fused step and graphs vs model.step)
#   decode      300  bench/gpu_decode.py: fused step and graph replay vs the eager model (logits, every state
#                    tensor), 64 greedy tokens vs the official package (fp32); decode tok/s at B=1/16/64/256
#   train_speed 330  bench/gpu_train_speed.py: `python -m train fit`, 0.1B shape, ctx 512 and 4096: tok/s, MFU
#   train       100  a short bf16-mixed training run of the tiny config on the kernels
#   model       130  bench/gpu_model.py: whole model on the kernels vs the torch ops, greedy parity, prefill
#   kernels     290  bench/gpu_check.py: the WKV kernels vs fp64, memcheck, timings
# A 10-minute call fits `pytest decode train_speed` (about 5 minutes estimated, never yet run) or
# `train model kernels` (about 8.5 minutes measured in the last GPU session).
# Packages the machine lacks travel as wheels in .whl/ (fla-core, rwkv, pyrwkv-tokenizer, jsonargparse ...).
set -u
OUT=${OUT:-/tmp/gpu_run}
mkdir -p "$OUT"
ALL="pytest decode train_speed train model kernels"

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

if [ "${1:-}" = "--dry-run" ]; then
    export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1
    PY=${PYTHON:-python3}
    TAIL=14 step decode 900 "$PY" bench/gpu_decode.py --dry-run
    TAIL=6 step train_speed 600 "$PY" bench/gpu_train_speed.py --dry-run
    TAIL=10 step model 900 "$PY" bench/gpu_model.py --device cpu --quick
    if [ -n "$failed" ]; then echo "FAILED:$failed"; exit 1; fi
    echo "dry run passed"
    exit 0
fi

for name in "$@"; do
    case " $ALL " in *" $name "*) ;; *) echo "unknown step '$name'; choose from: $ALL"; exit 2 ;; esac
done
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv

for name in ${*:-$ALL}; do
    case $name in
    pytest) step pytest 120 python3 -m pytest -q -p no:cacheprovider tests/test_wkv7_cuda.py tests/test_cuda_step.py -k gpu ;;
    decode) TAIL=40 step decode 300 python3 bench/gpu_decode.py ;;
    train_speed) TAIL=12 step train_speed 330 python3 bench/gpu_train_speed.py ;;
    train)
        step train 100 python3 -m train fit --config train/configs/tiny.yaml --trainer.default_root_dir /tmp/runs \
            --trainer.enable_progress_bar false
        grep -h "" /tmp/runs/*/version_*/metrics.csv 2>/dev/null | cut -c1-160 | sed -n '1p;$p' ;;
    model) TAIL=16 step gpu_model 130 python3 bench/gpu_model.py ;;
    kernels) TAIL=40 step gpu_check 290 python3 bench/gpu_check.py ;;
    esac
done
if [ -n "$failed" ]; then echo "FAILED:$failed"; exit 1; fi
echo "all steps passed"
