"""Run an experiment: `python -m rlhf_jax.main --config=experiments/<file>.py[:arg] --workdir=DIR`.

Overrides: `--config.optim.lr=1e-4`. Configs are locked, so a mistyped key fails naming it.
Several processes (hosts): every process runs the same command; see `rlhf_jax.distributed` for how
they find each other (`--coordinator_address`, `--num_processes`, `--process_id`, the environment,
or a TPU pod / SLURM by itself) and `launch/` for the scripts that start them.
"""
import logging

import jax
from absl import app, flags
from ml_collections import config_flags

from rlhf_jax import distributed, recipe, trainer

_CONFIG = config_flags.DEFINE_config_file('config', None, 'experiment config file[:arg]', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'where checkpoints, metrics and reports go')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (multi-process runs)')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'number of processes (multi-process runs)')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'this process, in [0, num_processes)')

STAGES = {'sft': trainer.train_sft, 'rm': trainer.train_reward, 'ppo': trainer.train_ppo, 'recipe': recipe.run}


def run(config, workdir: str):
  stage = config.stage
  if stage not in STAGES:
    raise ValueError(f'config.stage={stage!r}; valid: {sorted(STAGES)}')
  return STAGES[stage](config, workdir)


def main(argv):
  del argv
  logging.basicConfig(format='%(asctime)s %(levelname)s %(message)s')
  logging.getLogger('rlhf_jax').setLevel(logging.INFO)
  logging.getLogger('absl').setLevel(logging.WARNING)  # checkpoint I/O chatter
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if jax.process_index() != 0:  # progress is logged by process 0; the others report only problems
    logging.getLogger('rlhf_jax').setLevel(logging.WARNING)
  try:
    run(_CONFIG.value, _WORKDIR.value)
  except trainer.Preempted as e:  # state saved: a clean exit, so the scheduler can restart us
    logging.getLogger('rlhf_jax').warning('%s', e)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main)
