"""The whole InstructGPT recipe in one run: SFT -> SFT + pretraining mix -> RM -> PPO and PPO-ptx ->
evaluations and a report (experiments/instructgpt.py).

Each stage is an ordinary stage config (experiments/sft.py, rm.py, ppo.py) nested in the recipe's
config under its name, and runs in `<workdir>/<name>`. A stage whose `init.*` checkpoint is empty
reads the previous stage's (the table `INPUTS`); one given in the config is used as is, with
`{workdir}` standing for the recipe's workdir (`rm.init.checkpoint='{workdir}/sft_rm/checkpoints'`:
the full-size recipe's 6B RM starts from a 6B SFT run, whatever the policy's size). A stage that
finished (its `done.json` exists) is skipped; an interrupted one resumes from its checkpoints.
"""
from __future__ import annotations

import copy
import json
import logging
import time

import jax
import ml_collections

from rlhf_jax import fs

log = logging.getLogger('rlhf_jax')

# stage name -> {its config's init key: the stage whose checkpoints it reads}
INPUTS = {
    'sft': {},
    'sft_mix': {'checkpoint': 'sft'},
    'sft_rm': {},      # an SFT run of the RM's shape when it differs from the policy's (InstructGPT: 6B)
    # The RM starts from the SFT model (InstructGPT) and ranks samples of the policy PPO starts from.
    'rm': {'checkpoint': 'sft', 'policy_checkpoint': 'sft_mix'},
    'ppo': {'checkpoint': 'sft_mix', 'reward_checkpoint': 'rm'},
    'ppo_ptx': {'checkpoint': 'sft_mix', 'reward_checkpoint': 'rm'},
    'sft_large': {},   # an SFT-only policy of a larger shape (experiments/headline.py)
}
ORDER = tuple(INPUTS) + ('evals',)


def checkpoints(workdir: str, name: str) -> str:
  return fs.join(workdir, name, 'checkpoints')


def done_path(workdir: str, name: str) -> str:
  return fs.join(workdir, name, 'done.json')


def stage_config(c: ml_collections.ConfigDict, name: str, workdir: str) -> ml_collections.ConfigDict:
  """The config stage `name` runs with: its own, inputs filled in from earlier stages' workdirs."""
  sub = copy.deepcopy(c[name])
  with sub.unlocked():
    for key, value in sub.init.items():
      if isinstance(value, str) and '{workdir}' in value:
        sub.init[key] = value.replace('{workdir}', workdir)
    for key, src in INPUTS[name].items():
      if not sub.init[key]:
        sub.init[key] = checkpoints(workdir, src)
  return sub


def _write_json(path: str, obj) -> None:
  if jax.process_index() == 0:
    fs.write_text(path, json.dumps(obj, indent=1, default=float))


def run(c: ml_collections.ConfigDict, workdir: str) -> dict:
  """Run `c.stages` (comma-separated, in ORDER) in `workdir`; returns the report (when evals ran)."""
  from rlhf_jax import trainer
  train = {'sft': trainer.train_sft, 'rm': trainer.train_reward, 'ppo': trainer.train_ppo}
  stages = [s.strip() for s in c.stages.split(',') if s.strip()]
  unknown = [s for s in stages if s not in ORDER]
  if unknown:
    raise ValueError(f'config.stages: unknown {unknown}; valid: {ORDER}')
  timings = {}
  report = None
  for name in sorted(stages, key=ORDER.index):
    done = done_path(workdir, name)
    if fs.exists(done):
      log.info('[%s] finished earlier (%s): skipped', name, done)
      continue
    log.info('[%s] starting in %s', name, fs.join(workdir, name))
    t0 = time.time()
    if name == 'evals':
      from rlhf_jax.evals import report as report_lib
      report = report_lib.evaluate_recipe(c, workdir)
      result = {'report': fs.join(workdir, 'report.json')}
    else:
      sub = stage_config(c, name, workdir)
      result = train[sub.stage](sub, fs.join(workdir, name))
    timings[name] = time.time() - t0
    _write_json(done, {'seconds': timings[name], 'result': result})
    log.info('[%s] done in %.0f s', name, timings[name])
  return report
