"""Test set-up: 8 simulated CPU devices for sharding tests, f32 matmuls, fast compiles.

XLA_FLAGS must be set before jax initialises its backends, so this runs before any test module
imports jax.
"""
import os

# Test models are tiny, so XLA's compile time dominates the suite: skipping LLVM's backend
# optimisations makes compiles about 4x faster and does not change what the tests check.
for _flag in ('--xla_force_host_platform_device_count=8', '--xla_backend_optimization_level=0'):
  if _flag.split('=')[0] not in os.environ.get('XLA_FLAGS', ''):
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + _flag).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')
