"""Multi-process start-up: `jax.distributed.initialize` from flags, the environment, or the cluster.

Where the processes of one run learn about each other, in order:
1. explicit values (`python -m rlhf_jax.main --coordinator_address=host:port --num_processes=N
   --process_id=i`);
2. the environment: `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID` (what
   `launch/local.py` sets for N processes on one machine);
3. the cluster: on a Cloud TPU pod slice (several workers) and under SLURM's `srun` (several
   tasks), JAX finds the coordinator, the process count and this process's id by itself.
Otherwise the run is one process and nothing is initialised.

On CPU the processes exchange data with gloo collectives (the multi-host tests run this way).
"""
from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)

ENV = ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID')


def _cluster() -> str | None:
  """The multi-host environment we are in, if any: 'tpu' (a pod slice of several workers),
  'slurm' (several tasks of one srun), else None."""
  hosts = os.environ.get('TPU_WORKER_HOSTNAMES', '')
  if len([h for h in hosts.split(',') if h]) > 1:
    return 'tpu'
  if 'SLURM_JOB_ID' in os.environ and int(os.environ.get('SLURM_NTASKS', os.environ.get('SLURM_NPROCS', '1'))) > 1:
    return 'slurm'
  return None


def settings(coordinator_address: str | None = None, num_processes: int | None = None,
             process_id: int | None = None, environ=None) -> dict | None:
  """The arguments of `jax.distributed.initialize` for this process: explicit values first, then
  the environment; {} where the cluster is auto-detected; None for a single process."""
  env = os.environ if environ is None else environ
  address = coordinator_address or env.get('JAX_COORDINATOR_ADDRESS') or None
  n = num_processes if num_processes is not None else env.get('JAX_NUM_PROCESSES')
  pid = process_id if process_id is not None else env.get('JAX_PROCESS_ID')
  if address is None and n is None and pid is None:
    return {} if (_cluster() if environ is None else None) else None
  missing = [name for name, v in zip(ENV, (address, n, pid)) if v is None]
  if missing:
    raise ValueError(f'multi-process start-up: {", ".join(missing)} not set (give the coordinator address, '
                     'the number of processes and this process id together, as flags or environment variables)')
  try:
    n, pid = int(n), int(pid)
  except ValueError:
    raise ValueError(f'multi-process start-up: JAX_NUM_PROCESSES={n!r} and JAX_PROCESS_ID={pid!r} '
                     'must be integers') from None
  if not 0 <= pid < n:
    raise ValueError(f'multi-process start-up: process id {pid} is not in [0, {n})')
  return dict(coordinator_address=address, num_processes=n, process_id=pid)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """Join the run's other processes (see the module docstring); a no-op for one process or when
  already initialised. Call before anything touches a device."""
  args = settings(coordinator_address, num_processes, process_id)
  if args is None or jax.distributed.is_initialized():
    return
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')  # CPU devices' cross-process collectives
  jax.distributed.initialize(**args)
  log.info('process %d of %d, %d of %d devices local', jax.process_index(), jax.process_count(),
           jax.local_device_count(), jax.device_count())
