#!/usr/bin/env bash
# Issue 19, static decode steps (kind nvidia-h200: ONE GPU shared by the server processes): the shared-memory lanes
# page-locked for the GPU, one CUDA graph per MoE layer around the exchanges (COEL_REAL_STATIC=1, real_backend/
# static.py) vs the fast path + CUDA graphs over the same lanes (COEL_REAL_STATIC=0). GPU parity first (tiny
# scenario: generic, fast+graphs over gloo, static eager and static graphs over shm), then TPOT at batch 1
# (2srv/3srv x app/none) for both, then (PROFILE=1) a torch profile of the static 2srv-raw serve.
# Every step has a hard limit (timeout, then kill 5 s later). Carry .whl and .devstub, then:
#   OUT=$OUT bash benchmarks/results/engine/run_device_static.sh
# Writes $OUT/parity.json, measured_{static,shm}_b{1,32}.csv, log_static.txt (and tprof/ with PROFILE=1).
set -u
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=0 COEL_REAL_STATIC_LOG=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
export PYTHONPATH=.devstub:/tmp/site:.
OUT=${OUT:-/tmp/engine}; mkdir -p "$OUT"
LOG="$OUT/log_static.txt"
COEL_REAL_STATIC=0 timeout -k 5 ${PARITY_S:-75} python3 -m benchmarks.bench_real_engine parity --device cuda --out "$OUT" \
  --variants ${PARITY:-generic fast_graphs_gloo static_graphs} 2>&1 | grep -v Warning | tail -40
run() {  # tag static budget args...
  local tag=$1 static=$2 budget=$3; shift 3
  COEL_REAL_STATIC=$static timeout -k 5 $((budget + 10)) python3 -m benchmarks.bench_testbed measure --fixed-len 128 \
    --timeout-s 60 --out "$OUT" --tag "$tag" --budget-s "$budget" "$@" 2>&1 | grep -v Warning | sed -u "s/^/$tag| /" >> "$LOG"
}
B1="--batch 1 --output-lens 64 --jobs ${JOBS:-2srv-app:ab 2srv-raw:ab 3srv-app:ab 3srv-raw:ab}"
run static_b1 1 ${STATIC_S:-85} $B1
[ "${BASE_S:-70}" -gt 0 ] && run shm_b1 0 ${BASE_S:-70} $B1
if [ -n "${B32:-}" ]; then  # B32=<budget s>: batch 32, static and not
  run static_b32 1 "$B32" --batch 32 --output-lens 32 --jobs ${JOBS32:-2srv-app:ab 2srv-raw:ab}
  run shm_b32 0 "$B32" --batch 32 --output-lens 32 --jobs ${JOBS32:-2srv-app:ab 2srv-raw:ab}
fi
if [ "${PROFILE:-0}" = 1 ]; then
  COEL_REAL_STATIC=1 COEL_TORCH_PROFILE_DIR="$OUT/tprof" timeout -k 5 45 python3 -m benchmarks.bench_testbed measure \
    --fixed-len 128 --timeout-s 60 --out /tmp/prof_out --tag prof --budget-s 35 --batch 1 --output-lens 16 \
    --jobs 2srv-raw:ab 2>&1 | grep -v Warning | sed -u "s/^/prof| /" >> "$LOG"
fi
grep -h "row {\|failed\|rror\|static decode" "$LOG" | cut -c1-400 | sed 's/.latency_s.: [0-9.e-]*, //'
python3 -m benchmarks.bench_real_engine table --dir "$OUT" --variants shm static
