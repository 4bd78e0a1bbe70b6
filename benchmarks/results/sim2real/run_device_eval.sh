#!/usr/bin/env bash
# Issue 16, item 3: policies evaluated on the real backend (one H200, both servers on it) next to the surrogate's
# prediction of the same windows. Carry .whl (pydantic, gymnasium, hydra-core, omegaconf, antlr4 wheels) and the
# exported agent (outputs/sim2real/train/policy, trained here first: see README.md). From the repo root:
#   SEEDS=10 BUDGET_S=330 OUT=$OUT bash benchmarks/results/sim2real/run_device_eval.sh
# (BUDGET_S: evaluate's time_budget_s, no instance starts after it; TIMEOUT_S: the hard stop of the whole run;
# SCENARIO: a file of conf/scenario here, default paper-2server-10g; LINKS: the real backend's links, default app;
# OFFSET: the first test instance)
# Writes $OUT/eval/{leaderboard.md,leaderboard.csv,episodes.csv} and $OUT/evaluate_log.txt.
set -u
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=0 WANDB_MODE=offline
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # NVLink multicast stays off
OUT=${OUT:-/tmp/sim2real}
mkdir -p "$OUT"
SITE=${SITE:-/tmp/site}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl || exit
export PYTHONPATH=$SITE:$PWD
time timeout -k 10 "${TIMEOUT_S:-540}" python3 -m experiments.evaluate backend=real backend.device=cuda \
    +backend.gen_device=cuda +backend.links="${LINKS:-app}" backend.hardware=h200 \
    "scenarios=[benchmarks/results/sim2real/conf/scenario/${SCENARIO:-paper-2server-10g}.yaml]" \
    "policies=[static_linear,eplb,coel,outputs/sim2real/train/policy]" add_references=false \
    seeds="${SEEDS:-10}" seed_offset="${OFFSET:-0}" max_epochs="${EPOCHS:-2}" time_budget_s="${BUDGET_S:-330}" \
    logger=disabled plots=false \
    progress_bar=true hydra.run.dir="$OUT/eval" hydra.output_subdir=null 2>&1 \
    | grep --line-buffered -v Warning | tee "$OUT/evaluate_log.txt" | cut -c1-300
