#!/bin/bash
# PEAK, SFT, RM and GEN: rlhf_jax with host memory reuse (the default), rlhf_jax without it
# (RLHF_JAX_HOST_MALLOC=off) and the torch peer, interleaved, RUNS rounds, each run started when the
# machine is idle (under 15 % busy over 3 s, or after 300 s of waiting). From the repository root:
#   RUNS=3 bash bench/results/<this folder>/run.sh bench/results/<new folder>
OUT=$1; RUNS=${RUNS:-3}
. bench/interleave.sh   # OUT made absolute; ROOT, PEER, PY; waitidle
W="PEAK SFT RM GEN"
for r in $(seq 1 "$RUNS"); do
  for mode in on off; do
    waitidle; t=$(date +%s)
    RLHF_JAX_HOST_MALLOC=$mode python bench/run.py --workload $W --tag "run$r,malloc=$mode" --spec "$PEER/../workload.json" \
      > "$OUT/rlhf_jax_${mode}_run$r.jsonl" 2> "$OUT/rlhf_jax_${mode}_run$r.log"
    echo "$(date -u +%H:%M:%SZ) rlhf_jax malloc=$mode run$r: rc $?, $(( $(date +%s) - t )) s" >> "$OUT/runs.txt"
  done
  waitidle; t=$(date +%s)
  (cd "$PEER" && "$PY" torch_bench.py --only PEAK,SFT,RM,GEN --tag run$r > "$OUT/torch_run$r.jsonl" 2> "$OUT/torch_run$r.log")
  echo "$(date -u +%H:%M:%SZ) torch run$r: rc $?, $(( $(date +%s) - t )) s" >> "$OUT/runs.txt"
done
echo done >> "$OUT/runs.txt"
