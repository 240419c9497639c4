#!/bin/bash
# The PPO workload, rlhf_jax and TRL's PPOTrainer interleaved, RUNS rounds, each started when the
# machine is idle (under 15 % busy over 3 s, or after 300 s of waiting). From the repository root:
#   RUNS=5 bash bench/results/<this folder>/run.sh bench/results/<new folder>
OUT=$1; RUNS=${RUNS:-5}
. bench/interleave.sh   # OUT made absolute; ROOT, PEER, PY; waitidle
for r in $(seq 1 "$RUNS"); do
  waitidle; t=$(date +%s)
  python bench/run.py --workload PPO --tag run$r --spec "$PEER/../workload.json" > "$OUT/rlhf_jax_run$r.jsonl" 2> "$OUT/rlhf_jax_run$r.log"
  echo "$(date -u +%H:%M:%SZ) rlhf_jax run$r: rc $?, $(( $(date +%s) - t )) s" >> "$OUT/runs.txt"
  waitidle; t=$(date +%s)
  (cd "$PEER" && "$PY" trl_ppo_bench.py --tag run$r > "$OUT/trl_run$r.jsonl" 2> "$OUT/trl_run$r.log")
  echo "$(date -u +%H:%M:%SZ) trl run$r: rc $?, $(( $(date +%s) - t )) s" >> "$OUT/runs.txt"
done
echo done >> "$OUT/runs.txt"
