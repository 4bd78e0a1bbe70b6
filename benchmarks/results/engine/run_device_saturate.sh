#!/usr/bin/env bash
# Issue 19, saturating throughput (kind nvidia-h200: ONE GPU shared by the server processes): closed-loop clients
# (`bench_real_engine saturate`), the scenario's lengths (input 128, output 128), for each tree of TREES
# ("tag:dir", run in the order given) and each config of CONFIGS ("job:batch:clients:servers[:batched_tokens]",
# servers as 0 or 0+1). Every run has a hard limit (EACH_S, then kill 5 s later). From the tree's root:
#   TREES="after:. before:.before" OUT=$OUT bash benchmarks/results/engine/run_device_saturate.sh
# Writes $OUT/saturate.jsonl (one JSON row per run, with its tree tag) and $OUT/log_saturate.txt.
set -u
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=0 NCCL_NVLS_ENABLE=0 COEL_REAL_STATIC_LOG=1
ROOT=$PWD
OUT=${OUT:-/tmp/saturate}; mkdir -p "$OUT" /tmp/satj
LOG="$OUT/log_saturate.txt"
for cfg in ${CONFIGS:-2srv-app:64:64:0 2srv-app:64:64:0+1}; do
  IFS=: read -r job batch clients servers tokens <<<"$cfg"
  for tree in ${TREES:-after:.}; do
    tag=${tree%%:*}; dir=${tree#*:}
    name="${tag}_${job}_b${batch}_c${clients}_s${servers}_t${tokens:-0}"
    (cd "$ROOT/$dir" && PYTHONPATH=/tmp/site:$PWD timeout -k 5 "${EACH_S:-120}" python3 -m benchmarks.bench_real_engine \
      saturate --device cuda --job "$job" --batch "$batch" --clients "$clients" --client-servers ${servers//+/ } \
      --per-client "${PER_CLIENT:-2}" --batched-tokens "${tokens:-0}" --tag "$name" --out /tmp/satj) 2>&1 \
      | grep -v Warning | grep -v '^ \|^{\|^}' | sed -u "s/^/$name| /" >> "$LOG"
    f=$(ls /tmp/satj/saturate_${name}_*.json 2>/dev/null | head -1)
    if [ -n "$f" ]; then python3 -c "import json,sys; d=json.load(open('$f')); d['tree']='$tag'; print(json.dumps(d))" \
      >> "$OUT/saturate.jsonl"; else echo "$name| no result" >> "$LOG"; fi
    python3 -c "import json; d=json.loads(open('$OUT/saturate.jsonl').readlines()[-1]); print('$name', {k: d[k] for k in ('tok_s','link_bound_tok_s','half_duplex_bound_tok_s','ttft_mean_s','tpot_mean_s','makespan_s','static','streams_served','steps','fast_steps')})" 2>/dev/null
  done
done
tail -5 "$LOG"
