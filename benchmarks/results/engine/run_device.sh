#!/usr/bin/env bash
# Issue 19 device command (kind nvidia-h200: ONE GPU shared by all server processes, gloo through host memory).
# Carry .whl (pydantic/gymnasium wheels), .devstub (numba no-op stub) and .before (real_backend/ of the commit
# before the fast path, `git show <commit>:real_backend/<file>`), then: OUT=$OUT bash benchmarks/results/engine/run_device.sh
set -u
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=0
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
OUT=${OUT:-/tmp/engine}; mkdir -p "$OUT"
ROOT=$PWD
rm -rf /tmp/before && cp -r "$ROOT" /tmp/before && rm -rf /tmp/before/real_backend && cp -r .before/real_backend /tmp/before/
run() {  # tag dir fast budget args...
  local tag=$1 dir=$2 fast=$3 budget=$4; shift 4
  (cd "$dir" && PYTHONPATH=.devstub:/tmp/site:. COEL_REAL_FAST=$fast timeout -k 5 $((budget + 30)) \
    python3 -m benchmarks.bench_testbed measure --fixed-len 128 --timeout-s 60 --out "$OUT" --tag "$tag" \
    --budget-s "$budget" "$@" 2>&1 | grep -v Warning | sed -u "s/^/$tag| /" >> "$OUT/log.txt")
}
# after: the fast path (KV slots, batched decode, grouped experts, one host copy per exchange)
run fast_b1 "$ROOT" 1 150 --batch 1 --output-lens 64 --jobs 2srv-app:ab 2srv-raw:ab 3srv-app:ab 3srv-raw:ab
# after, fast path off (generic path, with the no-cuDNN attention and the new message protocol)
run generic_b1 "$ROOT" 0 60 --batch 1 --output-lens 32 --jobs 2srv-app:ab
# before: the previous commit's real_backend/
run before_b1 /tmp/before 1 110 --batch 1 --output-lens 32 --jobs 2srv-app:ab 3srv-app:ab
# saturating continuous batching: 32 requests at t = 0 on server 0 (max_batch 32)
run fast_b32 "$ROOT" 1 80 --batch 32 --output-lens 64 --jobs 2srv-app:ab 2srv-raw:ab
grep -h "row {" "$OUT/log.txt" | cut -c1-420
