#!/usr/bin/env python
"""The SFT and RM benchmark steps with `model.dense` against the same steps with plain einsums.

Both variants are compiled in one process and called alternately, so the machine's drift falls on
both alike; prints each variant's median step time and the speed-up:
    python bench/ab_dense.py [--calls 12] [--spec path/to/workload.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (sets the thread variables and host memory reuse first)

import jax  # noqa: E402

from rlhf_jax import model as model_lib  # noqa: E402

WITH_DENSE = model_lib.dense


def einsum_only(x, w, n_in=1):
  """`dense` without its hand-written gradient: the einsum, differentiated by JAX."""
  return model_lib._contract(x, w, n_in)


def compiled(build, ctx, projection):
  model_lib.dense = projection        # the blocks look `dense` up when they are traced
  try:
    step, state, batch = build(ctx)
    return step.lower(state, batch).compile(), state, batch
  finally:
    model_lib.dense = WITH_DENSE


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--calls', type=int, default=12)
  p.add_argument('--spec', type=Path, default=bench.DEFAULT_SPEC)
  args = p.parse_args(argv)
  ctx = bench.Ctx(spec=json.loads(args.spec.read_text()), spec_sha='', tag='')
  for name, build in (('SFT', bench.sft_step), ('RM', bench.rm_step)):
    runs = {v: list(compiled(build, ctx, f)) for v, f in (('einsum', einsum_only), ('dense', WITH_DENSE))}
    times = {v: [] for v in runs}
    for i in range(args.calls + 2):   # the first two calls of each are warm-up
      for v, r in runs.items():
        t = time.perf_counter()
        r[1], metrics = r[0](r[1], r[2])
        jax.block_until_ready(metrics)
        if i >= 2:
          times[v].append(time.perf_counter() - t)
    med = {v: statistics.median(ts) for v, ts in times.items()}
    print(json.dumps({'workload': name, 'einsum_ms': round(med['einsum'] * 1e3, 1),
                      'dense_ms': round(med['dense'] * 1e3, 1), 'speedup': round(med['einsum'] / med['dense'], 3)}))


if __name__ == '__main__':
  main()
