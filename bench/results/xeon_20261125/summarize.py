"""Per-run table of this folder's JSON lines (rlhf_jax and torch) with per-run ratios and medians."""
import glob, json, os, statistics, sys
here = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__))
rows = {}
for f in sorted(glob.glob(os.path.join(here, '*.jsonl'))):
  impl, run = os.path.basename(f)[:-6].rsplit('_run', 1)
  for line in open(f):
    d = json.loads(line)
    if d['workload'] != 'ENV':
      rows.setdefault(d['workload'], {}).setdefault(impl, {})[int(run)] = d
runs = sorted({r for w in rows.values() for i in w.values() for r in i})
for w, metric in (('SFT', 'value'), ('SFT', 'mfu_with_head'), ('RM', 'value'), ('GEN', 'value')):
  if w not in rows:
    continue
  print(f'{w} {metric}')
  for impl in ('rlhf_jax', 'torch'):
    print(f'  {impl:9s}', ' '.join(f'{rows[w][impl][r][metric]:8.3f}' for r in runs if r in rows[w][impl]))
  if metric == 'value':
    ratios = [rows[w]['rlhf_jax'][r]['value'] / rows[w]['torch'][r]['value'] for r in runs
              if r in rows[w]['rlhf_jax'] and r in rows[w]['torch']]
    print('  ratio    ', ' '.join(f'{x:8.3f}' for x in ratios), f' median {statistics.median(ratios):.3f}')
for p in ('PEAK_JAX', 'PEAK_NUMPY', 'PEAK_TORCH'):
  for impl, d in rows.get(p, {}).items():
    print(p, impl, ' '.join(f"{d[r]['value']:.0f}/{d[r]['best_gflops']:.0f}" for r in runs if r in d))
