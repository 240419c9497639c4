"""The SFT loop: exact resume (same mesh and another mesh), non-finite guard, init from a run."""
import jax
import numpy as np
import pytest

from experiments import sft as sft_config
from rlhf_jax import checkpoint, metrics, trainer


def _config(**train):
  c = sft_config.get_config('smoke')
  c.train.update(steps=6, log_every=1, eval_every=6, checkpoint_every=100, **train)
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
