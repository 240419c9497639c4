"""Per-run table of this folder's JSON lines: rlhf_jax with and without host memory reuse, torch."""
import glob, json, os, statistics
here = os.path.dirname(os.path.abspath(__file__))
rows = {}
for f in sorted(glob.glob(os.path.join(here, '*.jsonl'))):
  name = os.path.basename(f)[:-6]
  impl, run = name.rsplit('_run', 1)
  for line in open(f):
    d = json.loads(line)
    if d['workload'] != 'ENV':
      rows.setdefault(d['workload'], {}).setdefault(impl, {})[int(run)] = d
runs = sorted({r for w in rows.values() for i in w.values() for r in i})
for w, metric in (('SFT', 'value'), ('SFT', 'mfu_with_head'), ('RM', 'value'), ('GEN', 'value')):
  print(f'{w} {metric}')
  for impl in ('rlhf_jax_on', 'rlhf_jax_off', 'torch'):
    print(f'  {impl:13s}', ' '.join(f'{rows[w][impl][r][metric]:8.3f}' for r in runs))
  for impl in (('rlhf_jax_on', 'rlhf_jax_off') if metric == 'value' else ()):
    ratios = [rows[w][impl][r]['value'] / rows[w]['torch'][r]['value'] for r in runs]
    print(f'  {impl}/torch', ' '.join(f'{x:8.3f}' for x in ratios), f' median {statistics.median(ratios):.3f}')
for p in ('PEAK_JAX', 'PEAK_NUMPY', 'PEAK_TORCH'):
  for impl, d in rows.get(p, {}).items():
    print(p, impl, ' '.join(f"{d[r]['value']:.0f}/{d[r]['best_gflops']:.0f}" for r in runs))
