#!/usr/bin/env bash
# The device command (nvidia-h200-x4) that produced measured_*.csv; run from the repo root with .whl and .devstub
# carried (pydantic/gymnasium wheels; numba no-op stub). Phases keep each GPU in one job; every job has a budget
# and writes its CSV row by row, so a killed run still leaves what it measured under $OUT.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
export PYTHONPATH=.devstub:/tmp/site:.
OUT=${OUT:-/tmp/testbed}; mkdir -p "$OUT"
B1=${B1:-175}; B2=${B2:-100}; B3=${B3:-140}
{ nvidia-smi; nvidia-smi topo -m; python3 -c 'import torch; print(torch.__version__, torch.cuda.device_count())'; } > "$OUT/gpu.txt" 2>&1
run() {  # tag gpus budget jobs...
  local tag=$1 gpus=$2 budget=$3; shift 3
  CUDA_VISIBLE_DEVICES=$gpus timeout -k 5 $((budget + 40)) python3 -m benchmarks.bench_testbed measure \
    --out "$OUT" --tag "$tag" --budget-s "$budget" --jobs "$@" 2>&1 | sed -u "s/^/$tag| /" >> "$OUT/log.txt"
}
date >> "$OUT/log.txt"
# phase 1: (a)/(b) one server with 2 GPUs || two servers with 1 GPU, 1 Gb/s app-shaped LAN
run A 0,1 "$B1" 1srv-2gpu:ab & run B 2,3 "$B1" 2srv-app:ab & wait
# phase 2: (c) three servers with 1 GPU
run C 0,1,2 "$B2" 3srv-app:c
# phase 3: (c) two servers || issue 6: (a)/(b) two servers over the raw link (NVLink/PCIe, no shaper)
run D 0,1 "$B3" 2srv-app:c & run E 2,3 "$B3" 2srv-raw:ab & wait
date >> "$OUT/log.txt"
