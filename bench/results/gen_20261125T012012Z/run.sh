#!/bin/bash
# The workload W (default GEN), rlhf_jax (host memory reuse on, the default) and the torch peer, interleaved,
# RUNS rounds, each run started when the machine is idle (under 15 % busy over 3 s, or after 300 s).
# From the repository root:  RUNS=5 [W=GEN] bash bench/results/<this folder>/run.sh bench/results/<new folder>
OUT=$1; RUNS=${RUNS:-5}; W=${W:-GEN}
. bench/interleave.sh   # OUT made absolute; ROOT, PEER, PY; waitidle
for r in $(seq 1 "$RUNS"); do
  waitidle; t=$(date +%s)
  python bench/run.py --workload $W --tag run$r --spec "$PEER/../workload.json" > "$OUT/rlhf_jax_run$r.jsonl" 2> "$OUT/rlhf_jax_run$r.log"
  echo "$(date -u +%H:%M:%SZ) rlhf_jax run$r: rc $?, $(( $(date +%s) - t )) s" >> "$OUT/runs.txt"
  waitidle; t=$(date +%s)
  (cd "$PEER" && "$PY" torch_bench.py --only $W --tag run$r > "$OUT/torch_run$r.jsonl" 2> "$OUT/torch_run$r.log")
  echo "$(date -u +%H:%M:%SZ) torch run$r: rc $?, $(( $(date +%s) - t )) s" >> "$OUT/runs.txt"
done
W=$W python3 - "$OUT" <<'PY' | tee "$OUT/summary.txt"
import json, statistics, sys, glob, os
out = sys.argv[1]; rows = []
for r in range(1, 100):
  f = lambda n: os.path.join(out, f'{n}_run{r}.jsonl')
  if not os.path.exists(f('rlhf_jax')) or not os.path.exists(f('torch')): break
  v = lambda n: next(json.loads(l)['value'] for l in open(f(n)) if json.loads(l)['workload'] == os.environ.get('W', 'GEN'))
  rows.append((v('rlhf_jax'), v('torch')))
for i, (a, b) in enumerate(rows, 1):
  print(f'run {i}: rlhf_jax {a:.1f}  torch {b:.1f}  ratio {a / b:.3f}')
print(f'median ratio {statistics.median(a / b for a, b in rows):.3f}; medians {statistics.median(a for a, _ in rows):.1f} / {statistics.median(b for _, b in rows):.1f}')
PY
echo done >> "$OUT/runs.txt"
