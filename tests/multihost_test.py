"""Multi-host runs on one machine: two processes with 4 CPU devices each (jax.distributed over gloo,
started by launch/local.py) against one process with 8 devices, on the same (2, 2, 2) mesh.

Each process reads only its rows of every batch, parameters are sharded across the processes, and
metrics, checkpoints and evaluations must come out as in one process: SFT, RM and PPO (tests/
multihost_worker.py), the evaluations' sampler and log-likelihood, and checkpoints saved by two
processes and resumed by one on another mesh shape (and the other way round).

Tolerances. Discrete results (generated text, pair counts, response lengths, accuracies) must be
equal. The processes sum gradients with gloo instead of in one process, so floats differ in the
last bits; SFT stays within 1e-4. The RM's loss depends only on score differences, so the gradient
along "shift every score" is rounding noise, which Adam (step ≈ lr·g/(|g| + eps)) turns into
steps of a sizeable fraction of the learning rate: the RM's score offset (score means, the
normalisation bias) and PPO's value model initialised from it drift by ~1e-4 while every
score difference (loss, accuracy) stays equal; those stages are compared at 1e-3. The smoke RM after
its few steps is near chance, and some of its ~2,600 validation pairs are near ties: that rounding can
flip one of them, so its accuracies may differ by 1e-3 (about 2 pairs), not by more.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, 'tests', 'multihost_worker.py')
LOCAL = os.path.join(ROOT, 'launch', 'local.py')
INTEGER_KEYS = ('pairs', 'prompts', 'tokens', 'response_length', 'accuracy', 'agreement', 'no_stop_frac',
                'clipfrac', 'norm/n', 'gold_score')


def _env(devices: int) -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith('JAX_') or k == 'JAX_PLATFORMS'}
  flags = [f for f in env.get('XLA_FLAGS', '').split() if not f.startswith('--xla_force_host_platform_device_count')]
  env['XLA_FLAGS'] = ' '.join(flags + [f'--xla_force_host_platform_device_count={devices}'])
  env['JAX_PLATFORMS'] = 'cpu'
  return env


def _start(processes: int, args: list[str], log_dir: str) -> subprocess.Popen:
  """The worker in one process with 8 devices, or in `processes` processes of 8/n devices each."""
  os.makedirs(log_dir, exist_ok=True)
  cmd = [sys.executable, WORKER, *args]
  if processes > 1:
    cmd = [sys.executable, LOCAL, f'--processes={processes}', f'--devices_per_process={8 // processes}',
           f'--log_dir={log_dir}', '--', *cmd]
  log = open(os.path.join(log_dir, 'launcher.log'), 'w')
  return subprocess.Popen(cmd, cwd=ROOT, env=_env(8), stdout=log, stderr=subprocess.STDOUT)


def _wait(procs: dict) -> None:
  for name, (p, log_dir) in procs.items():
    if p.wait(timeout=900):
      logs = ''.join(open(os.path.join(log_dir, f)).read()[-3000:] for f in sorted(os.listdir(log_dir)))
      pytest.fail(f'{name} exited with {p.returncode}:\n{logs}')


def _resume_copy(src: str, dst: str) -> None:
  """The SFT run in `src` as if it had stopped after its step-3 checkpoint."""
  shutil.copytree(os.path.join(src, 'sft', 'checkpoints'), os.path.join(dst, 'sft', 'checkpoints'))
  shutil.rmtree(os.path.join(dst, 'sft', 'checkpoints', '6'))


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  d = str(tmp_path_factory.mktemp('multihost'))
  w = {name: os.path.join(d, name) for name in ('one', 'two', 'one_to_two', 'two_to_one')}
  _wait({name: (_start(n, ['recipe', w[name]], os.path.join(d, 'logs', name)), os.path.join(d, 'logs', name))
         for name, n in (('one', 1), ('two', 2))})
  _resume_copy(w['one'], w['one_to_two'])
  _resume_copy(w['two'], w['two_to_one'])
  _wait({name: (_start(n, ['sft', w[name], mesh], os.path.join(d, 'logs', name)), os.path.join(d, 'logs', name))
         for name, n, mesh in (('one_to_two', 2, '1,4,2'), ('two_to_one', 1, '4,1,2'))})
  return w


def _metrics(path: str) -> dict:
  out = {}
  with open(path) as f:
    for line in f:
      row = json.loads(line)
      out.update({(row['step'], k): v for k, v in row.items() if k not in ('step', 'time', 'stage')})
  return out


def _compare(got: dict, want: dict, rtol: float, atol: float, pair_flips: float = 1e-6) -> None:
  assert set(got) == set(want), sorted(set(got) ^ set(want))
  for key in sorted(want):
    if any(k in key[1] for k in INTEGER_KEYS) and 'score_by' not in key[1]:
      tol = pair_flips if ('accuracy' in key[1] or 'agreement' in key[1]) else 1e-6
      assert got[key] == pytest.approx(want[key], abs=tol), key
    else:
      np.testing.assert_allclose(got[key], want[key], rtol=rtol, atol=atol, err_msg=str(key))


def test_two_processes_train_sft_like_one(runs):
  sft = [_metrics(os.path.join(runs[k], 'sft', 'metrics.jsonl')) for k in ('two', 'one')]
  assert any(k[1] == 'sft/loss' for k in sft[1]) and any(k[1] == 'eval/gold_score' for k in sft[1])
  _compare(*sft, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('stage', ['rm', 'ppo'])
def test_two_processes_train_rm_and_ppo_like_one(runs, stage):
  got, want = (_metrics(os.path.join(runs[k], stage, 'metrics.jsonl')) for k in ('two', 'one'))
  _compare(got, want, rtol=1e-3, atol=1e-3, pair_flips=1e-3 if stage == 'rm' else 1e-6)


def test_two_processes_sample_and_score_like_one(runs):
  """The evaluations' sampler (greedy and at temperature 1) and log-likelihood, when each process
  holds half of every batch."""
  got, want = (json.load(open(os.path.join(runs[k], 'lm.json'))) for k in ('two', 'one'))
  assert (got['processes'], want['processes']) == (2, 1)
  assert got['greedy'] == want['greedy'] and got['sampled'] == want['sampled']
  np.testing.assert_allclose(got['loglik'], want['loglik'], rtol=1e-5)


@pytest.mark.parametrize('resumed,uninterrupted', [('one_to_two', 'one'), ('two_to_one', 'two')])
def test_checkpoint_restores_across_process_counts_and_meshes(runs, resumed, uninterrupted):
  """Saved at step 3 by one process on a (2, 2, 2) mesh and finished by two on (1, 4, 2), or saved by
  two and finished by one on (4, 1, 2): the same numbers as the run that was never stopped (the
  data position included: the resumed run's batches are the ones the original run saw next)."""
  got = _metrics(os.path.join(runs[resumed], 'sft', 'metrics.jsonl'))
  assert {k[0] for k in got} == {4, 6}
  # Step 4's log averages steps 3-4 in the original run but only step 4 after the restore; the
  # step-6 log (steps 5-6) and evaluation are comparable.
  want = {k: v for k, v in _metrics(os.path.join(runs[uninterrupted], 'sft', 'metrics.jsonl')).items() if k[0] == 6}
  _compare({k: v for k, v in got.items() if k[0] == 6}, want, rtol=1e-4, atol=1e-5)
