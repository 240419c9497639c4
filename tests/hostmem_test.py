"""Host memory reuse on the CPU backend (rlhf_jax/hostmem.py): a step that needs a large temporary
buffer stops page-faulting it in on every call, and the policy follows its environment variable."""
import json
import os
import platform
import subprocess
import sys

import pytest

from rlhf_jax import hostmem

# One jitted call whose temporary buffer is a 64 MiB matrix (16,384 pages of 4 KiB); the page
# faults of each steady-state call are counted with getrusage.
PROBE = r'''
import json, resource, sys
import rlhf_jax
from rlhf_jax import hostmem
import jax, jax.numpy as jnp
f = jax.jit(lambda x, w: (lambda y: jnp.max(y, axis=0).sum() + jnp.min(y, axis=1).sum())(x @ w))
x, w = jnp.ones((1024, 64), jnp.float32), jnp.ones((64, 16384), jnp.float32)
for _ in range(3):
  f(x, w).block_until_ready()
faults = []
for _ in range(15):
  r = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x, w).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r)
print(json.dumps({'applied': hostmem.applied, 'faults': faults}))
'''
PAGES = 1024 * 16384 * 4 // 4096


def probe(mode):
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env.update(JAX_PLATFORMS='cpu', **{hostmem.ENV: mode})
  out = subprocess.run([sys.executable, '-c', PROBE], capture_output=True, text=True, env=env, timeout=120)
  assert out.returncode == 0, out.stderr
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc',
                    reason='the malloc options are glibc-specific')
def test_steady_state_calls_reuse_the_temporary_buffer():
  off, on = probe('off'), probe('on')
  assert off['applied'] is False and on['applied'] is True
  median = lambda xs: sorted(xs)[len(xs) // 2]
  # glibc's default: a fresh mapping each call, every page of it faulted in
  assert median(off['faults']) > PAGES // 2, off
  # retained: the freed buffer is reused (an occasional call grows the heap)
  assert median(on['faults']) < PAGES // 20, on


def test_policy_follows_the_environment(monkeypatch):
  monkeypatch.setattr(hostmem, 'applied', hostmem.applied)   # retain_freed_memory records its outcome
  assert hostmem.runs_on_cpu({'JAX_PLATFORMS': 'cpu'})
  assert hostmem.runs_on_cpu({'JAX_PLATFORMS': 'cpu,tpu'})
  assert not hostmem.runs_on_cpu({'JAX_PLATFORMS': 'tpu'})
  assert not hostmem.runs_on_cpu({'JAX_PLATFORMS': 'cuda,cpu'})
  assert hostmem.wanted({hostmem.ENV: 'on', 'JAX_PLATFORMS': 'tpu'})
  assert not hostmem.wanted({hostmem.ENV: 'off', 'JAX_PLATFORMS': 'cpu'})
  assert hostmem.wanted({'JAX_PLATFORMS': 'cpu'})
  assert not hostmem.retain_freed_memory({hostmem.ENV: 'off'})
  with pytest.raises(ValueError, match=hostmem.ENV):
    hostmem.wanted({hostmem.ENV: 'sometimes'})
