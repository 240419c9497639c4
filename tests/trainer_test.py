"""The SFT loop: exact resume (same mesh and another mesh), non-finite guard, init from a run."""
import jax
import numpy as np
import pytest

from experiments import sft as sft_config
from rlhf_jax import checkpoint, metrics, trainer


def _config(**train):
  c = sft_config.get_config('smoke')
  c.train.update(**{**dict(steps=6, log_every=1, eval_every=6, checkpoint_every=100), **train})
  return c


def _final(workdir):
  ckpt = checkpoint.Checkpointer(f'{workdir}/checkpoints')
  step = ckpt.latest_step()
  params = ckpt.read_state(step)['params']
  return step, jax.tree.map(np.asarray, params)


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('full'))
  out = trainer.train_sft(_config(), workdir)
  return workdir, out


def _same_run(a_dir, b_dir, a_eval, b_eval, atol=0.0):
  step_a, pa = _final(a_dir)
  step_b, pb = _final(b_dir)
  assert step_a == step_b == 6
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=atol, rtol=0), pa, pb)
  losses = lambda d: [r['sft/loss'] for r in metrics.read(d) if 'sft/loss' in r]  # noqa: E731
  np.testing.assert_allclose(losses(a_dir), losses(b_dir), atol=max(atol, 1e-7), rtol=0)
  for k in ('eval/sft_loss', 'eval/pretrain_loss', 'eval/gold_score'):
    np.testing.assert_allclose(a_eval[k], b_eval[k], atol=max(atol, 1e-6))


def test_killed_and_resumed_run_matches_uninterrupted(uninterrupted, tmp_path):
  full_dir, full = uninterrupted
  part = trainer.train_sft(_config(), str(tmp_path), stop_after=2)   # stops at step 2, checkpointed
  assert part['step'] == 2
  resumed = trainer.train_sft(_config(), str(tmp_path))               # a fresh call continues
  assert [r['step'] for r in metrics.read(str(tmp_path)) if 'sft/loss' in r] == [1, 2, 3, 4, 5, 6]
  _same_run(full_dir, str(tmp_path), full, resumed)


def test_resume_onto_another_mesh(uninterrupted, tmp_path):
  full_dir, full = uninterrupted
  c = _config()
  trainer.train_sft(c, str(tmp_path), stop_after=3)
  c.mesh.update(data=2, fsdp=2, tensor=2)                              # restore sharded differently
  resumed = trainer.train_sft(c, str(tmp_path))
  _same_run(full_dir, str(tmp_path), full, resumed, atol=2e-5)         # f32 reduction order differs


def test_non_finite_loss_stops_naming_the_step(tmp_path):
  c = _config()
  c.optim.update(lr=1e30, grad_clip=0.0)
  with pytest.raises(FloatingPointError, match=r'non-finite loss or gradient at step \d'):
    trainer.train_sft(c, str(tmp_path))


def test_checkpoint_of_another_shape_fails_clearly(uninterrupted, tmp_path):
  import shutil
  full_dir, _ = uninterrupted
  shutil.copytree(f'{full_dir}/checkpoints', f'{tmp_path}/checkpoints')
  c = _config()
  c.model.d_ff = 96
  with pytest.raises(ValueError, match='different model shape'):
    trainer.train_sft(c, str(tmp_path))


def test_sigterm_saves_and_exits_cleanly(tmp_path):
  """A SIGTERM mid-run (preemption) saves a checkpoint at the current step and exits with 0; the
  same command then continues from there."""
  import pathlib
  import signal
  import subprocess
  import sys
  import time
  root = pathlib.Path(__file__).resolve().parents[1]
  cmd = [sys.executable, '-m', 'rlhf_jax.main', f'--config={root}/experiments/sft.py:smoke',
         '--config.train.steps=100000', '--config.train.log_every=1', '--config.train.eval_every=0',
         f'--workdir={tmp_path}']
  proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 180
  while time.time() < deadline and not (tmp_path / 'metrics.jsonl').exists():
    time.sleep(0.5)
  time.sleep(2)                                        # a few steps in
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-2000:]
  assert 'SIGTERM at step' in err
  step = checkpoint.Checkpointer(f'{tmp_path}/checkpoints').latest_step()
  assert step is not None and 0 < step < 100000
  logged = [r['step'] for r in metrics.read(str(tmp_path)) if 'sft/loss' in r]
  assert logged[-1] == step                            # saved exactly where it stopped


def test_tiny_sft_learns_the_task_and_ppo_improves_on_it(tmp_path):
  """The README's tiny SFT command, shortened to 300 of its 1,500 steps: validation loss falls and
  the gold labeler scores greedy samples well above the untrained model (step 0). Then PPO from
  that checkpoint, rewarded by the gold labeler (`:gold=True`, the oracle run; the RM path needs
  the RM stage's minutes and is measured in the README): the gold score of its rollouts rises over
  its start while the KL to the SFT policy stays bounded. Thresholds are generous. Runs as
  subprocesses with XLA's normal optimisation (the suite's fast-compile flag would make them slow)."""
  import os
  import pathlib
  import subprocess
  import sys
  root = pathlib.Path(__file__).resolve().parents[1]
  env = dict(os.environ, XLA_FLAGS='')
  sft_dir, ppo_dir = tmp_path / 'sft', tmp_path / 'ppo'
  cmd = [sys.executable, '-m', 'rlhf_jax.main', f'--config={root}/experiments/sft.py:tiny',
         '--config.train.steps=300', '--config.train.eval_every=300', '--config.data.n_train=4000',
         '--config.data.n_valid=64', '--config.data.n_pretrain=64', '--config.eval.gold_prompts=64',
         f'--workdir={sft_dir}']
  out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  evals = [r for r in metrics.read(str(sft_dir)) if 'eval/sft_loss' in r]
  start, final = evals[0], evals[-1]
  assert (start['step'], final['step']) == (0, 300)
  assert final['eval/sft_loss'] < 0.7 * start['eval/sft_loss'], (start, final)
  assert final['eval/gold_score'] > start['eval/gold_score'] + 0.1, (start, final)

  cmd = [sys.executable, '-m', 'rlhf_jax.main', f'--config={root}/experiments/ppo.py:tiny,gold=True',
         f'--config.init.checkpoint={sft_dir}/checkpoints', '--config.train.steps=40',
         '--config.train.log_every=1', '--config.train.eval_every=0', '--config.optim.lr=1e-4',
         '--config.value_optim.lr=3e-4', '--config.data.n_valid=32', '--config.data.n_pretrain=32',
         '--config.eval.gold_prompts=32', f'--workdir={ppo_dir}']
  out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  rows = [r for r in metrics.read(str(ppo_dir)) if 'objective/gold_score' in r]
  assert [r['step'] for r in rows] == list(range(1, 41))
  first = np.mean([r['objective/gold_score'] for r in rows[:8]])
  last = np.mean([r['objective/gold_score'] for r in rows[-8:]])
  assert last > first + 0.03, (first, last)
  assert max(r['objective/kl'] for r in rows) < 5.0, rows[-1]


def test_init_from_another_runs_checkpoint(uninterrupted, tmp_path):
  """`init.checkpoint` loads a previous stage's parameters (not its optimizer or step)."""
  full_dir, _ = uninterrupted
  c = _config(steps=1)
  c.init.checkpoint = f'{full_dir}/checkpoints'
  c.optim.lr = 0.0                                     # one step that changes nothing
  trainer.train_sft(c, str(tmp_path))
  step, params = _final(str(tmp_path))
  assert step == 1
  _, source = _final(full_dir)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), params, source)


def test_sft_sources_mix_pretraining_rows_or_pretrain_alone():
  """data.pretrain_frac: 0 demonstrations only (SFT), 0.1 a 90/10 mix (SFT + mix), 1 the pretraining
  corpus alone (the base model the CPU-sized recipe pretrains)."""
  data = {'train': ['demo'], 'pretrain_train': ['doc']}
  assert trainer.sft_sources(0.0, data) == ([['demo']], None)
  assert trainer.sft_sources(0.1, data) == ([['demo'], ['doc']], [0.9, 0.1])
  assert trainer.sft_sources(1.0, data) == ([['doc']], None)
  with pytest.raises(ValueError, match=r'data.pretrain_frac=1.5 must lie in \[0, 1\]'):
    trainer.sft_sources(1.5, data)
  with pytest.raises(ValueError, match='set data.pretrain_source'):
    trainer.sft_sources(1.0, {'train': ['demo'], 'pretrain_train': []})
