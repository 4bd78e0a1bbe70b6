#!/usr/bin/env bash
# Issue 19, second device call (kind nvidia-h200, one GPU shared by the servers): the fast path with each layer's
# device part (attention, router, shared expert) in a CUDA graph; GPU parity of generic / fast / fast+graphs.
# Carry .whl and .devstub, then: OUT=$OUT bash benchmarks/results/engine/run_device_graphs.sh
set -u
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=0
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
export PYTHONPATH=.devstub:/tmp/site:.
OUT=${OUT:-/tmp/engine}; mkdir -p "$OUT"
timeout 120 python3 -m benchmarks.bench_real_engine parity --device cuda --out "$OUT" 2>&1 | grep -v Warning | tail -20
run() {  # tag graphs budget args...
  local tag=$1 graphs=$2 budget=$3; shift 3
  COEL_REAL_GRAPHS=$graphs timeout -k 5 $((budget + 30)) python3 -m benchmarks.bench_testbed measure --fixed-len 128 \
    --timeout-s 60 --out "$OUT" --tag "$tag" --budget-s "$budget" "$@" 2>&1 | grep -v Warning | sed -u "s/^/$tag| /" >> "$OUT/log_graphs.txt"
}
run graphs_b1 1 150 --batch 1 --output-lens 64 --jobs 2srv-app:ab 2srv-raw:ab 3srv-app:ab 3srv-raw:ab
run graphs_b32 1 80 --batch 32 --output-lens 64 --jobs 2srv-app:ab 2srv-raw:ab
grep -h "row {\|failed" "$OUT/log_graphs.txt" | cut -c1-420
