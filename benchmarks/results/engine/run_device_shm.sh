#!/usr/bin/env bash
# Issue 19, shared-memory transport (kind nvidia-h200: ONE GPU shared by the server processes): TPOT of the fast path
# + CUDA graphs with the dispatch messages and the step clock through shared memory (shm, the default on one host)
# vs the gloo process group (COEL_REAL_SHM=0): paper-2server-1gpu and paper-3server-1gpu, links app and none,
# batch 1 and 32; first the layer-exchange micro-benchmark on the device's host and GPU parity (tiny scenario:
# generic / fast / fast+graphs over shm, fast+graphs over gloo). About 7 minutes; every step has a hard limit
# (timeout, then kill 5 s later): 30 + 85 + 2 x 90 + 2 x 115 = 525 s plus the wheel install, under 9 minutes
# (a measure run skips the jobs its budget cannot fit; partial CSVs are kept).
# Carry .whl and .devstub, then: OUT=$OUT bash benchmarks/results/engine/run_device_shm.sh
# Writes $OUT/shm_cuda.{json,md}, parity.json, measured_{shm,gloo}_b{1,32}.csv, log_shm.txt.
set -u
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=0
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
export PYTHONPATH=.devstub:/tmp/site:.
OUT=${OUT:-/tmp/engine}; mkdir -p "$OUT"
timeout -k 5 25 python3 -m benchmarks.bench_real_engine exchange --device cuda --iters 1500 --out "$OUT" >/dev/null 2>&1
cat "$OUT/shm_cuda.md" 2>/dev/null || echo "exchange: no result"
timeout -k 5 80 python3 -m benchmarks.bench_real_engine parity --device cuda --out "$OUT" 2>&1 | grep -v Warning | tail -30
run() {  # tag shm budget args...
  local tag=$1 shm=$2 budget=$3; shift 3
  COEL_REAL_SHM=$shm timeout -k 5 $((budget + 10)) python3 -m benchmarks.bench_testbed measure --fixed-len 128 \
    --timeout-s 60 --out "$OUT" --tag "$tag" --budget-s "$budget" "$@" 2>&1 | grep -v Warning | sed -u "s/^/$tag| /" >> "$OUT/log_shm.txt"
}
B1="--batch 1 --output-lens 64 --jobs 2srv-app:ab 2srv-raw:ab 3srv-app:ab 3srv-raw:ab"
B32="--batch 32 --output-lens 32 --jobs 2srv-app:ab 2srv-raw:ab 3srv-app:ab 3srv-raw:ab"
run shm_b1 1 75 $B1
run gloo_b1 0 75 $B1
run shm_b32 1 100 $B32
run gloo_b32 0 100 $B32
grep -h "row {\|failed\|error" "$OUT/log_shm.txt" | cut -c1-300
python3 -m benchmarks.bench_real_engine table --dir "$OUT" --variants gloo shm
