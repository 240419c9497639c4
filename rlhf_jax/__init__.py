"""rlhf_jax: the InstructGPT recipe (SFT, K-way reward model, PPO, PPO-ptx) in JAX."""
from rlhf_jax import hostmem as _hostmem

__version__ = '0.1.0'

# Before JAX starts its CPU client: reuse freed host memory instead of page-faulting fresh
# mappings on every step (rlhf_jax/hostmem.py; RLHF_JAX_HOST_MALLOC=off turns it off).
_hostmem.retain_freed_memory()
