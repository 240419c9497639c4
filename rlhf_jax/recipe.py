"""The whole InstructGPT recipe in one run: pretraining (CPU sizes) -> SFT and SFT + pretraining mix ->
RM -> PPO and PPO-ptx -> evaluations and a report (experiments/instructgpt.py).

Each stage is an ordinary stage config (experiments/sft.py, rm.py, ppo.py) nested in the recipe's
config under its name, and runs in `<workdir>/<name>`. A stage whose `init.*` checkpoint is empty
reads the previous stage's (the table `INPUTS`); one given in the config is used as is, with
`{workdir}` standing for the recipe's workdir (`rm.init.checkpoint='{workdir}/sft_rm/checkpoints'`:
the full-size recipe's 6B RM starts from a 6B SFT run, whatever the policy's size). A stage that
finished (its `done.json` exists) is skipped; an interrupted one resumes from its checkpoints. The
evaluation stage reruns when its config differs from the one it ran with.
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

# stage name -> {its config's init key: the stage whose checkpoints it reads}. An input is filled in only
# where the recipe's config has that stage: the full-size recipes have no `pretrain` stage (a real run
# starts SFT from a pretrained LM given in `sft.init.checkpoint`, or else from random weights).
INPUTS = {
    'pretrain': {},    # the base LM on the pretraining corpus (GPT-3 in InstructGPT); the CPU sizes only
    'sft': {'checkpoint': 'pretrain'},
    # InstructGPT's PPO policy is a separate fine-tuning run of the base model on demonstrations with
    # 10 % pretraining text mixed in, not a continuation of SFT.
    'sft_mix': {'checkpoint': 'pretrain'},
    'sft_rm': {},      # an SFT run of the RM's shape when it differs from the policy's (InstructGPT: 6B)
    # The RM starts from the SFT model (InstructGPT) and ranks samples of the policy PPO starts from.
    'rm': {'checkpoint': 'sft', 'policy_checkpoint': 'sft_mix'},
    'ppo': {'checkpoint': 'sft_mix', 'reward_checkpoint': 'rm'},
    'ppo_ptx': {'checkpoint': 'sft_mix', 'reward_checkpoint': 'rm'},
    'pretrain_large': {},
    'sft_large': {'checkpoint': 'pretrain_large'},   # a larger SFT-only policy (experiments/headline.py)
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
      if not sub.init[key] and src in c:
        sub.init[key] = checkpoints(workdir, src)
  return sub


def _write_json(path: str, obj) -> None:
  if jax.process_index() == 0:
    fs.write_text(path, json.dumps(obj, indent=1, default=float))


def _check_inputs(c: ml_collections.ConfigDict, name: str, workdir: str) -> None:
  """A stage that starts from an earlier stage's checkpoints needs that stage finished, in this run or
  before. (Only `init.checkpoint`, which every stage reads: the others are read only in some settings,
  such as the RM's policy samples, and the stage's own errors name them.)"""
  src = INPUTS[name].get('checkpoint')
  if src and src in c and not c[name].init.checkpoint and not fs.exists(done_path(workdir, src)):
    raise ValueError(
        f'config.{name}.init.checkpoint is empty, so stage {name!r} starts from stage {src!r} in '
        f'{checkpoints(workdir, src)}, which has not finished: add {src!r} to config.stages '
        f'(currently {c.stages!r}) or set config.{name}.init.checkpoint')


def _evals_key(c: ml_collections.ConfigDict) -> dict:
  """The evaluation's config (its models, comparisons and sets) as the JSON it is recorded as."""
  return json.loads(json.dumps(c.evals.to_dict(), default=str))


def _evaluated_with(done: str):
  return json.loads(fs.read_text(done)).get('evaluated')


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
      if name != 'evals' or _evaluated_with(done) == _evals_key(c):
        log.info('[%s] finished earlier (%s): skipped', name, done)
        continue
      # The evaluation is cheap next to training and its config names the models it compares: a run
      # that adds models or comparisons (experiments/headline.py in the main job's workdir) reruns it.
      log.info('[%s] finished earlier with another evals config (%s): rerunning', name, done)
    log.info('[%s] starting in %s', name, fs.join(workdir, name))
    t0 = time.time()
    if name == 'evals':
      from rlhf_jax.evals import report as report_lib
      report = report_lib.evaluate_recipe(c, workdir)
      result = {'report': fs.join(workdir, 'report.json')}
    else:
      _check_inputs(c, name, workdir)
      sub = stage_config(c, name, workdir)
      result = train[sub.stage](sub, fs.join(workdir, name))
    timings[name] = time.time() - t0
    record = {'seconds': timings[name], 'result': result}
    if name == 'evals':
      record['evaluated'] = _evals_key(c)
    _write_json(done, record)
    log.info('[%s] done in %.0f s', name, timings[name])
  return report
