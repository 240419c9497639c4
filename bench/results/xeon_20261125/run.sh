#!/bin/bash
# PEAK, SFT, RM and GEN on an Intel Xeon host (AVX-512, AMX): rlhf_jax and the torch peer,
# interleaved, RUNS rounds, each run started when the machine is idle. From the repository root:
#   RUNS=3 bash bench/results/xeon_20261125/run.sh bench/results/<new folder>
OUT=$1; RUNS=${RUNS:-3}; W=${W:-PEAK SFT RM GEN}
. bench/interleave.sh   # OUT made absolute; ROOT, PEER, PY; waitidle
lscpu > "$OUT/lscpu.txt"
for r in $(seq 1 "$RUNS"); do
  waitidle; t=$(date +%s)
  python bench/run.py --workload $W --tag "run$r" --spec "$PEER/../workload.json" \
    > "$OUT/rlhf_jax_run$r.jsonl" 2> "$OUT/rlhf_jax_run$r.log"
  echo "$(date -u +%H:%M:%SZ) rlhf_jax run$r: rc $?, $(( $(date +%s) - t )) s" >> "$OUT/runs.txt"
  waitidle; t=$(date +%s)
  (cd "$PEER" && "$PY" torch_bench.py --only "$(echo $W | tr ' ' ,)" --tag run$r > "$OUT/torch_run$r.jsonl" 2> "$OUT/torch_run$r.log")
  echo "$(date -u +%H:%M:%SZ) torch run$r: rc $?, $(( $(date +%s) - t )) s" >> "$OUT/runs.txt"
done
echo done >> "$OUT/runs.txt"
