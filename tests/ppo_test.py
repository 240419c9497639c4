"""PPO's jitted functions: rollout log-probs vs the scoring pass, the scanned update vs a
step-by-step reference, mesh invariance, PPO-ptx's gradient; and the loop (resume, errors).
The per-token maths against NumPy references is in ppo_math_test.py."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import ppo as ppo_config
from experiments import rm as rm_config
from experiments import sft as sft_config
from rlhf_jax import checkpoint, losses, metrics, ppo, sharding, trainer
from rlhf_jax import model as model_lib

CFG = model_lib.ModelConfig(d_model=32, n_layer=2, n_head=2, d_ff=64, vocab_size=320, max_len=64)
POLICY = model_lib.Transformer(CFG)
VALUE = model_lib.Transformer(CFG.replace(lm_head=False, scalar_head=True))
V_REAL, EOS, PAD = 259, 2, 0
B, P, N = 16, 6, 10
MODELS = ppo.Models(policy=POLICY, value=VALUE, reward=VALUE, vocab_size=V_REAL, stop_id=EOS)
# Momentum SGD for the comparisons (its update is linear in the gradient, so f32 summation noise
# stays f32 noise; Adam's first step, lr·sign(g), would not).
TX = ppo.make_tx(optax.sgd(0.05, momentum=0.9), optax.sgd(0.05, momentum=0.9))


def _init(cfg, mesh, tx=TX, models=MODELS):
  """(state, shardings, reference params, RM params) on `mesh`, the same numbers on every mesh."""
  ex = jnp.zeros((1, 8), jnp.int32)
  init = ppo.make_init(lambda k: models.policy.init(k, ex)['params'],
                       None if models.value is None else (lambda k: models.value.init(k, ex)['params']), tx, cfg)
  state, shardings = sharding.init_sharded(init, mesh, 0)
  ref, _ = sharding.init_sharded(lambda s: POLICY.init(jax.random.key(s), ex)['params'], mesh, 0)
  rm, _ = sharding.init_sharded(lambda s: VALUE.init(jax.random.key(s), ex)['params'], mesh, 7)
  return state, shardings, ref, rm


def _prompts(seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, V_REAL, (B, P)).astype(np.int32)
  lengths = rng.integers(2, P + 1, B)
  mask = (np.arange(P)[None] >= P - lengths[:, None]).astype(np.int32)     # left-padded
  return {'prompt_ids': np.where(mask > 0, ids, PAD), 'prompt_mask': mask}


def _jit(fn, mesh, **statics):
  return jax.jit(sharding.under_rules(functools.partial(fn, **statics), mesh))


def _scfg(cfg, eos=EOS):
  return ppo.sample_config(cfg, MODELS, max_new_tokens=N, eos_id=eos, pad_id=PAD)


@pytest.fixture(scope='module')
def one_device():
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  cfg = ppo.PPOConfig(epochs=2, minibatches=2)
  state, shardings, ref, rm = _init(cfg, mesh)
  batch = sharding.shard_batch(_prompts(), mesh)
  sample = _jit(ppo.rollout, mesh, models=MODELS, sample_cfg=_scfg(cfg))(state, batch)
  return mesh, cfg, state, shardings, ref, rm, batch, sample


@pytest.mark.parametrize('temperature', [1.0, 0.7])
def test_rollout_logprobs_equal_the_scoring_pass(one_device, temperature):
  """The sampler's log-probs are the policy's at the sampling temperature, over the tokenizer's
  ids: recomputing them on the sampled sequence gives the same numbers, so the first
  minibatch's ratio is 1."""
  mesh, _, state, _, ref, rm, batch, _ = one_device
  cfg = ppo.PPOConfig(temperature=temperature)
  sample = _jit(ppo.rollout, mesh, models=MODELS, sample_cfg=_scfg(cfg))(state, batch)
  tokens, mask, positions = ppo.sequences(batch['prompt_ids'], batch['prompt_mask'], sample['tokens'],
                                          sample['mask'])
  logp, _, _ = _jit(ppo.policy_and_value, mesh, models=MODELS, cfg=cfg, P=P)(
      state.params, tokens, mask, positions, sample['tokens'])
  m = np.asarray(sample['mask'])
  assert m.sum() > B                                                   # real tokens to compare
  ratio = np.exp(np.asarray(logp) - np.asarray(sample['logprobs']))
  np.testing.assert_allclose(ratio[m > 0], 1.0, atol=2e-5)
  # And the scoring pass that recomputes them agrees with the one that reuses them.
  reuse, _ = _jit(ppo.score, mesh, models=MODELS, cfg=cfg)(state, ref, rm, batch, sample)
  again, _ = _jit(ppo.score, mesh, models=MODELS, cfg=dataclasses.replace(cfg, recompute_logprobs=True))(
      state, ref, rm, batch, sample)
  for k in ('logp', 'advantages', 'returns'):
    np.testing.assert_allclose(np.asarray(reuse[k]), np.asarray(again[k]), atol=5e-5, err_msg=k)


def test_score_places_the_reward_at_the_last_real_token(one_device):
  """With β = 0 the rewards are the RM score alone; the returns of each response's first token
  then equal its score (γ = 1), and padding holds nothing. The RM reads the last real token."""
  mesh, _, state, _, ref, rm, batch, sample = one_device
  cfg = ppo.PPOConfig(whiten_advantages=False, lam=1.0)
  state = state.replace(kl_coef=jnp.zeros_like(state.kl_coef))          # β lives in the state
  # Stop early in some rows: truncate after the 4th token in odd rows by declaring it the stop token.
  toks = np.asarray(sample['tokens']).copy()
  stop = 258                                                           # not drawn in these rows
  toks[1::2, 3] = stop
  s = dict(sample, tokens=jnp.asarray(toks))
  models = dataclasses.replace(MODELS, stop_id=stop)
  roll, m = _jit(ppo.score, mesh, models=models, cfg=cfg)(state, ref, rm, batch, s)
  rmask = np.asarray(roll['response_mask'])
  assert (rmask[1::2].sum(-1) == 4).all() and (rmask[0::2].sum(-1) == N).all()
  # The RM's score, read at each row's last kept token, by a plain forward over the kept sequence.
  full = np.concatenate([np.asarray(batch['prompt_ids']), toks], 1)
  fmask = np.concatenate([np.asarray(batch['prompt_mask']), rmask], 1)
  scores = VALUE.apply({'params': rm}, jnp.asarray(full), mask=jnp.asarray(fmask))['scores']
  last = P + rmask.sum(-1) - 1
  expect = np.asarray(scores)[np.arange(B), last]
  np.testing.assert_allclose(np.asarray(roll['returns'])[:, 0], expect, rtol=1e-4, atol=1e-4)
  assert float(m['ppo/no_stop_frac']) == 0.5
  assert (np.asarray(roll['returns'])[rmask == 0] == 0).all()
  # OAI-2019's penalty: the rows with no stop token score -1 instead of the RM's score.
  pen, _ = _jit(ppo.score, mesh, models=models, cfg=dataclasses.replace(cfg, penalize_no_stop=True))(
      state, ref, rm, batch, s)
  np.testing.assert_allclose(np.asarray(pen['returns'])[0::2, 0], -1.0, atol=1e-5)
  np.testing.assert_allclose(np.asarray(pen['returns'])[1::2, 0], expect[1::2], rtol=1e-4, atol=1e-4)


def test_a_non_finite_minibatch_changes_nothing_and_is_recorded(one_device):
  mesh, cfg, state, _, ref, rm, batch, sample = one_device
  roll, _ = _jit(ppo.score, mesh, models=MODELS, cfg=cfg)(state, ref, rm, batch, sample)
  bad = dict(roll, advantages=roll['advantages'].at[0, 0].set(jnp.nan))
  mb = jax.tree.map(lambda a: a[:8], bad)
  new, _ = jax.jit(functools.partial(ppo.minibatch_step, models=MODELS, cfg=cfg, tx=TX))(state, mb, None)
  assert int(new.bad_step) == int(state.step)
  jax.tree.map(np.testing.assert_array_equal, (new.params, new.ema, new.opt_state),
               (state.params, state.ema, state.opt_state))


def _reference_update(state, rollouts, ptx, cfg, tx, models=MODELS):
  """The update one minibatch at a time, in Python, over the same permutations."""
  perm = np.asarray(ppo.permutations(state.key(1), cfg.epochs, B)).reshape(cfg.epochs * cfg.minibatches, -1)
  step = jax.jit(functools.partial(ppo.minibatch_step, models=models, cfg=cfg, tx=tx))
  auxes = []
  for i, idx in enumerate(perm):
    mb = jax.tree.map(lambda a: a[idx], rollouts)
    pmb = None if ptx is None else jax.tree.map(lambda a: a.reshape(len(perm), -1, *a.shape[1:])[i], ptx)
    state, aux = step(state, mb, pmb)
    auxes.append(aux)
  return state, jax.tree.map(lambda *x: np.mean(np.stack(x)), *auxes)


def _ptx_batch(rows, T=12, seed=3):
  rng = np.random.default_rng(seed)
  toks = rng.integers(3, V_REAL, (rows, T)).astype(np.int32)
  ones = np.ones_like(toks)
  return {'tokens': toks, 'mask': ones, 'positions': np.broadcast_to(np.arange(T), toks.shape).copy(),
          'segments': ones, 'loss_mask': ones}


def test_scanned_update_equals_a_step_by_step_reference(one_device):
  mesh, cfg, state, _, ref, rm, batch, sample = one_device
  cfg = dataclasses.replace(cfg, ptx_coef=0.5, ptx_ratio=1, adaptive_kl=True, kl_target=0.01, kl_horizon=100)
  roll, _ = _jit(ppo.score, mesh, models=MODELS, cfg=cfg)(state, ref, rm, batch, sample)
  ptx = sharding.shard_batch(_ptx_batch(cfg.epochs * B), mesh)
  copy = lambda t: jax.tree.map(jnp.copy, t)  # noqa: E731  (update donates its state)
  want, want_m = _reference_update(copy(state), roll, ptx, cfg, TX)
  got, got_m = jax.jit(functools.partial(ppo.update, models=MODELS, cfg=cfg, tx=TX), donate_argnums=0)(
      copy(state), roll, ptx)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6),
               got.params, want.params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6),
               got.ema, want.ema)
  for k in want_m:
    np.testing.assert_allclose(float(got_m[k]), float(want_m[k]), rtol=1e-4, atol=1e-6, err_msg=k)
  assert int(got.step) == int(state.step) + 1
  # The adaptive controller moved β by its formula, from this batch's KL.
  kl = float(np.asarray(roll['kl']).mean())
  expect = cfg.beta * (1 + np.clip(kl / cfg.kl_target - 1, -0.2, 0.2) * B / cfg.kl_horizon)
  np.testing.assert_allclose(float(got.kl_coef), expect, rtol=1e-6)
  assert not jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), got.params, state.params))


@pytest.mark.parametrize('shape', [(8, 1, 1), (2, 2, 2)])
def test_score_and_update_give_the_same_numbers_on_every_mesh(one_device, shape):
  _, cfg, state0, _, _, _, _, sample = one_device
  host_sample = jax.device_get(sample)
  cfg = dataclasses.replace(cfg, ema_decay=0.9)

  def run(mesh):
    state, shardings, ref, rm = _init(cfg, mesh)
    batch = sharding.shard_batch(_prompts(), mesh)
    s = sharding.shard_batch(host_sample, mesh)
    roll, m = _jit(ppo.score, mesh, models=MODELS, cfg=cfg)(state, ref, rm, batch, s)
    upd = jax.jit(sharding.under_rules(functools.partial(ppo.update, models=MODELS, cfg=cfg, tx=TX), mesh),
                  out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
    new, mu = upd(state, roll, None)
    return jax.device_get((roll, m, new.params, new.ema, mu))

  want = run(sharding.make_mesh(devices=jax.devices()[:1]))
  got = run(sharding.make_mesh(*shape))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6), got, want)


def test_ptx_with_zero_coefficient_is_ppo_and_its_gradient_is_the_sum(one_device):
  mesh, cfg, state, _, ref, rm, batch, sample = one_device
  roll, _ = _jit(ppo.score, mesh, models=MODELS, cfg=cfg)(state, ref, rm, batch, sample)
  mb = jax.device_get(jax.tree.map(lambda a: a[:8], roll))
  ptx = _ptx_batch(16)
  grad = lambda c, p: jax.jit(jax.grad(  # noqa: E731
      lambda params: ppo.minibatch_loss(params, mb, p, models=MODELS, cfg=c)[0]))(state.params)
  plain = grad(cfg, None)
  zero = grad(dataclasses.replace(cfg, ptx_coef=0.0), ptx)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-9), zero, plain)
  # γ > 0: the PPO gradient plus γ times the pretraining NLL's gradient, computed apart through
  # the model's plain forward.
  gamma = 2.5
  both = grad(dataclasses.replace(cfg, ptx_coef=gamma), ptx)

  def nll(policy):
    logits = POLICY.apply({'params': policy}, ptx['tokens'], ptx['positions'], ptx['mask'])['logits']
    return losses.sft_loss(logits, ptx['tokens'], ptx['loss_mask'])[0]
  g_ptx = jax.jit(jax.grad(nll))(state.params['policy'])
  want = {'policy': jax.tree.map(lambda a, b: a + gamma * b, plain['policy'], g_ptx), 'value': plain['value']}
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7), both, want)
  assert float(optax.tree.norm(g_ptx)) > 0


def test_accumulated_ptx_gradient_equals_one_pass(one_device):
  """ptx_microbatches = 4: the pretraining gradient summed over 4 chunks of rows (with token counts
  that differ per chunk) gives the same step as one pass over all the rows."""
  mesh, cfg, state, _, ref, rm, batch, sample = one_device
  cfg = dataclasses.replace(cfg, ptx_coef=2.5)
  roll, _ = _jit(ppo.score, mesh, models=MODELS, cfg=cfg)(state, ref, rm, batch, sample)
  mb = jax.device_get(jax.tree.map(lambda a: a[:8], roll))
  ptx = _ptx_batch(16)
  ptx['loss_mask'][:4, 7:] = 0        # the first chunk has fewer scored tokens: a mean of chunk means would differ
  copy = lambda t: jax.tree.map(jnp.copy, t)  # noqa: E731
  step = lambda c: jax.jit(functools.partial(ppo.minibatch_step, models=MODELS, cfg=c, tx=TX))(  # noqa: E731
      copy(state), mb, ptx)
  want, want_aux = step(cfg)
  got, got_aux = step(dataclasses.replace(cfg, ptx_microbatches=4))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6),
               got.params, want.params)
  for k in ('ppo/ptx_loss', 'ppo/loss', 'ppo/grad_norm', 'ppo/policy_loss'):
    np.testing.assert_allclose(float(got_aux[k]), float(want_aux[k]), rtol=1e-5, err_msg=k)
  assert not jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), got.params, state.params))
  with pytest.raises(ValueError, match='do not split into ppo.ptx_microbatches=3'):
    step(dataclasses.replace(cfg, ptx_microbatches=3))


def test_shared_value_head_starts_at_zero_and_trains(one_device):
  """OAI-2019's option: values from a zero-initialised head on the policy trunk."""
  mesh, _, _, _, ref, rm, batch, sample = one_device
  policy = model_lib.Transformer(CFG.replace(scalar_head=True))
  models = dataclasses.replace(MODELS, policy=policy, value=None, reference=POLICY)
  cfg = ppo.PPOConfig(value_model='shared', minibatches=2, whiten_advantages=False)
  tx = ppo.make_tx(optax.adam(1e-3), None)
  state, _, _, _ = _init(cfg, mesh, tx=tx, models=models)
  state = state.replace(params={'policy': dict(state.params['policy'],
                                              score_head=jnp.zeros_like(state.params['policy']['score_head']))})
  roll, m = _jit(ppo.score, mesh, models=models, cfg=cfg)(state, ref, rm, batch, sample)
  assert float(m['ppo/values_mean']) == 0.0
  new, _ = jax.jit(functools.partial(ppo.update, models=models, cfg=cfg, tx=tx))(state, roll, None)
  assert float(jnp.abs(new.params['policy']['score_head']).sum()) > 0


# ----------------------------------------------------------------------------
# The loop.


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
  """Smoke SFT and RM runs: the checkpoints PPO starts from."""
  sft_dir = str(tmp_path_factory.mktemp('sft'))
  c = sft_config.get_config('smoke')
  c.train.update(steps=2, eval_every=0)
  trainer.train_sft(c, sft_dir)
  rm_dir = str(tmp_path_factory.mktemp('rm'))
  c = rm_config.get_config('smoke')
  c.train.update(steps=2, eval_every=0)
  c.init.checkpoint = f'{sft_dir}/checkpoints'
  c.norm.n = 8
  trainer.train_reward(c, rm_dir)
  return f'{sft_dir}/checkpoints', f'{rm_dir}/checkpoints'


def _config(checkpoints, **train):
  c = ppo_config.get_config('smoke')
  c.init.checkpoint, c.init.reward_checkpoint = checkpoints
  c.train.update(**{**dict(steps=4, log_every=1, eval_every=4, checkpoint_every=100), **train})
  return c


@pytest.fixture(scope='module')
def uninterrupted(checkpoints, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('ppo_full'))
  c = _config(checkpoints)
  c.ppo.update(ptx_coef=0.5, adaptive_kl=True)
  return c, workdir, trainer.train_ppo(c, workdir)


def test_killed_and_resumed_ppo_matches_uninterrupted(uninterrupted, tmp_path):
  c, full_dir, full = uninterrupted
  trainer.train_ppo(c, str(tmp_path), stop_after=2)        # as if killed after iteration 2
  resumed = trainer.train_ppo(c, str(tmp_path))
  assert resumed['step'] == full['step'] == 4
  a = checkpoint.Checkpointer(f'{full_dir}/checkpoints').read_state()
  b = checkpoint.Checkpointer(f'{tmp_path}/checkpoints').read_state()
  jax.tree.map(np.testing.assert_array_equal, a, b)       # params, optimizer, EMA, β, RNG: all of it
  logged = lambda d: [r for r in metrics.read(d) if 'objective/score' in r]  # noqa: E731
  assert [r['step'] for r in logged(str(tmp_path))] == [1, 2, 3, 4]
  for r1, r2 in zip(logged(full_dir), logged(str(tmp_path))):
    assert r1['step'] == r2['step']
    for k in ('objective/score', 'objective/kl', 'ppo/loss', 'ppo/ptx_loss', 'objective/kl_coef'):
      assert r1[k] == r2[k], (k, r1, r2)


def test_ppo_logs_the_oai_metrics_and_saves_the_policy_shape(uninterrupted):
  _, workdir, final = uninterrupted
  rows = [r for r in metrics.read(workdir) if 'objective/score' in r]
  want = {'objective/score', 'objective/kl', 'objective/kl_coef', 'ppo/entropy', 'ppo/policy_loss',
          'ppo/value_loss', 'ppo/policy_clipfrac', 'ppo/value_clipfrac', 'ppo/approx_kl',
          'ppo/explained_variance', 'ppo/response_length', 'ppo/no_stop_frac', 'ppo/ptx_loss',
          'objective/gold_score', 'ppo/lr'}
  assert want <= set(rows[-1]), want - set(rows[-1])
  assert all(np.isfinite(r[k]) for r in rows for k in want)
  assert 'eval/gold_score' in final and 'eval/pretrain_loss' in final
  extra = checkpoint.Checkpointer(f'{workdir}/checkpoints').read_extra()
  assert model_lib.ModelConfig.from_dict(extra['model']) == trainer.build_model(_config(('', ''))).cfg


def test_missing_reward_checkpoint_and_bad_keys_fail_by_name(checkpoints, tmp_path):
  c = _config(checkpoints)
  c.init.reward_checkpoint = ''
  with pytest.raises(ValueError, match='init.reward_checkpoint'):
    trainer.train_ppo(c, str(tmp_path))
  c = _config(checkpoints)
  c.ppo.minibatches = 3                                    # 16 episodes do not split in 3
  with pytest.raises(ValueError, match='ppo.minibatches'):
    trainer.train_ppo(c, str(tmp_path))
  with pytest.raises(ValueError, match='kl_estimatr'):
    ppo.PPOConfig.from_dict({'kl_estimatr': 'k1'})
