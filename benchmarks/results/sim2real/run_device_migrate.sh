#!/usr/bin/env bash
# Issue 16: a plan change's migration on the real backend (one H200, both servers on it) next to the surrogate's
# prediction: session 9's server code (OLD_RB, a `git archive <rev> real_backend | gzip` tarball, when given) and this
# tree's, unshaped; then this tree's with the links shaped to 10 Gb/s; then the GPU tests. From the repo root:
#   OLD_RB=.old_rb.tgz OUT=$OUT bash benchmarks/results/sim2real/run_device_migrate.sh
set -u
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=0 WANDB_MODE=offline
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # NVLink multicast stays off
OUT=${OUT:-/tmp/migrate}
mkdir -p "$OUT"
SITE=${SITE:-/tmp/site}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl || exit
SC=benchmarks/results/sim2real/conf/scenario/paper-2server-busy.yaml
bench() { timeout -k 10 "${STEP_S:-150}" python3 -m benchmarks.bench_real_engine migrate --scenario $SC --out "$OUT" "$@"; }
if [ -n "${OLD_RB:-}" ]; then
    mkdir -p /tmp/old_rb && tar xzf "$OLD_RB" -C /tmp/old_rb
    PYTHONPATH=$SITE:/tmp/old_rb:$PWD bench --links none --repeats 1 --tag old_none 2>&1 | tail -4
fi
export PYTHONPATH=$SITE:$PWD
bench --links none --repeats 2 --tag new_none 2>&1 | tail -4
bench --links app --lan-gbps 10 --repeats 2 --tag new_app10g 2>&1 | tail -4
timeout -k 10 180 python3 -m pytest -q -p no:cacheprovider tests/real_backend/test_real_gpu.py 2>&1 | tail -5 | tee "$OUT/pytest_gpu.txt"
