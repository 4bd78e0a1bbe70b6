#!/usr/bin/env bash
# Issue 16: calibration + fidelity on ONE H200 (kind nvidia-h200): micro sweeps, then the end-to-end windows of
# paper-2server-1gpu / paper-3server-1gpu / paper-1server-2gpu with every server process on the GPU (gloo through
# host memory), the overhead regression and the fidelity report (conf/calibrate_h200.yaml).
# Carry .whl (pydantic, pydantic_core, annotated-types, typing-inspection, gymnasium, Farama-Notifications, and
# hydra-core, omegaconf, antlr4-python3-runtime) and .devstub (numba no-op stub, used only where numba is missing);
# from the repo root:  OUT=$OUT bash benchmarks/results/calibration/run_device_h200.sh
# (CONFIG / CAL_ARGS / SITE / TIMEOUT_S / TOTAL_S: another config name, more overrides, another wheels folder, the
# limits of calibrate and of the whole script with its refit; e.g. a CPU smoke test.)
# Writes 7 files under $OUT (the device returns at most 8): log.txt, sweeps_h200.json, rows_h200.jsonl (one line
# per window, as measured), h200.yaml (the fitted profile), fidelity_h200.{json,md,png}. At most ~9.3 min:
# calibrate keeps to budget_s=490 (windows that would overrun it are skipped), `timeout` stops it at 520 s, and if it
# left no report, a refit from the rows already written gets what is left.
set -u
T0=$SECONDS
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=0
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # NVLink multicast stays off
OUT=${OUT:-/tmp/calib_h200}
mkdir -p "$OUT"
LOG=$OUT/log.txt
SITE=${SITE:-/tmp/site}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl || exit
export PYTHONPATH=$SITE:$PWD
if ! python3 -c "import numba; assert numba.njit(lambda x: x + 1)(1) == 2" 2>> "$LOG"; then
  PYTHONPATH=$PWD/.devstub:$PYTHONPATH  # the surrogate in plain Python (~20 ms a window instead of ~0.1)
  echo "numba unusable: the no-op stub" | tee -a "$LOG"
fi
if ! python3 -c "import hydra, omegaconf, scipy, safetensors" 2>> "$LOG"; then
  echo "error: hydra/omegaconf/scipy/safetensors missing: carry their wheels in .whl" | tee -a "$LOG"
  exit 1
fi
{ nvidia-smi; python3 -c 'import torch; print(torch.__version__, torch.cuda.get_device_name())'; } >> "$LOG" 2>&1
# the surrogate's numba kernels compile (cached in __pycache__) while the micro sweeps run
python3 -m experiments.calib.fidelity paper-2server-1gpu paper-3server-1gpu paper-1server-2gpu > /tmp/warm_surrogate.txt 2>&1 &
# shellcheck disable=SC2206  # CAL_ARGS: overrides split on spaces
CAL=(python3 -m experiments.calibrate --config-name "${CONFIG:-calibrate_h200}" "out_dir=$OUT" "profile_path=$OUT/h200.yaml"
     hydra.run.dir=/tmp/calib_h200_run ${CAL_ARGS:-})
timeout -k 10 "${TIMEOUT_S:-520}" "${CAL[@]}" 2>&1 | grep --line-buffered -v Warning | tee -a "$LOG" | cut -c1-240
if [ ! -s "$OUT/fidelity_h200.json" ] && [ -s "$OUT/rows_h200.jsonl" ]; then
  LEFT=$((${TOTAL_S:-560} - (SECONDS - T0)))
  echo "no report: refit from the rows written ($LEFT s left)" | tee -a "$LOG"
  [ "$LEFT" -gt 15 ] && timeout -k 5 "$LEFT" "${CAL[@]}" "rows_from=$OUT/rows_h200.jsonl" 2>&1 | tee -a "$LOG" | tail -5
fi
wait
echo "total $((SECONDS - T0)) s" | tee -a "$LOG"
ls -la "$OUT"
