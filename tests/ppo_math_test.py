"""PPO's per-token maths against slow NumPy references written here (loops, float64)."""
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import ppo

TOL = dict(rtol=1e-5, atol=1e-5)
N = 7
LENGTHS = (1, 4, N, 3)  # a length-1 row, a full row and two in between


def make_mask(lengths, n, left):
  """[B, n] int32 mask with a contiguous block of lengths[b] real tokens at the end (left-padded)
  or at the start (right-padded) of each row."""
  mask = np.zeros((len(lengths), n), np.int32)
  for b, length in enumerate(lengths):
    if left:
      mask[b, n - length:] = 1
    else:
      mask[b, :length] = 1
  return mask


def real_positions(mask_row):
  """Positions of a row's real tokens, in order."""
  return [t for t in range(len(mask_row)) if mask_row[t] > 0]


# ----------------------------------------------------------------------------
# References.


def last_index_reference(mask):
  out = np.zeros(mask.shape[0], np.int64)
  for b in range(mask.shape[0]):
    for t in range(mask.shape[1]):
      if mask[b, t] > 0:
        out[b] = t
  return out


def token_rewards_reference(kl, mask, score, beta):
  B, T = kl.shape
  rewards = np.zeros((B, T))
  for b in range(B):
    pos = real_positions(mask[b])
    for t in pos:
      rewards[b, t] = -beta * float(kl[b, t])
    if pos:
      rewards[b, pos[-1]] += float(score[b])
  return rewards


def gae_reference(rewards, values, mask, gamma, lam):
  B, T = rewards.shape
  adv, ret = np.zeros((B, T)), np.zeros((B, T))
  for b in range(B):
    pos = real_positions(mask[b])
    next_value, next_adv = 0.0, 0.0
    for t in reversed(pos):
      v = float(values[b, t])
      delta = float(rewards[b, t]) + gamma * next_value - v
      next_adv = delta + gamma * lam * next_adv
      adv[b, t] = next_adv
      ret[b, t] = next_adv + v
      next_value = v
  return adv, ret


def moments_reference(x, mask):
  vals = [float(x[b, t]) for b in range(x.shape[0]) for t in range(x.shape[1]) if mask[b, t] > 0]
  mean = sum(vals) / len(vals)
  var = sum((v - mean) ** 2 for v in vals) / len(vals)  # biased (population) variance
  return mean, var


def whiten_reference(x, mask, shift_mean):
  mean, var = moments_reference(x, mask)
  out = np.zeros(x.shape)
  for b in range(x.shape[0]):
    for t in range(x.shape[1]):
      if mask[b, t] > 0:
        out[b, t] = (float(x[b, t]) - mean) / np.sqrt(var + 1e-8) + (0.0 if shift_mean else mean)
  return out


def policy_loss_reference(new_logp, old_logp, adv, mask, clip):
  loss, clipped, kl, n = 0.0, 0.0, 0.0, 0
  for b in range(mask.shape[0]):
    for t in real_positions(mask[b]):
      d = float(new_logp[b, t]) - float(old_logp[b, t])
      ratio, a = np.exp(d), float(adv[b, t])
      loss += max(-a * ratio, -a * min(max(ratio, 1 - clip), 1 + clip))
      clipped += float(abs(ratio - 1) > clip)
      kl += 0.5 * d * d
      n += 1
  return loss / n, clipped / n, kl / n


def value_loss_reference(new_v, old_v, returns, mask, clip):
  err, clipped, n = 0.0, 0.0, 0
  for b in range(mask.shape[0]):
    for t in real_positions(mask[b]):
      v_new, v_old, r = float(new_v[b, t]), float(old_v[b, t]), float(returns[b, t])
      e = (v_new - r) ** 2
      if clip > 0:
        v_clipped = v_old + min(max(v_new - v_old, -clip), clip)
        e = max(e, (v_clipped - r) ** 2)
        clipped += float(abs(v_new - v_old) > clip)
      err += e
      n += 1
  return 0.5 * err / n, clipped / n


def kl_controller_reference(beta, kl, n, target, horizon):
  err = min(max(kl / target - 1.0, -0.2), 0.2)
  return beta * (1.0 + err * n / horizon)


def kl_penalty_reference(logp, ref_logp, estimator):
  out = np.zeros(logp.shape)
  for idx in np.ndindex(logp.shape):
    d = float(logp[idx]) - float(ref_logp[idx])
    out[idx] = {'k1': d, 'k2': 0.5 * d * d, 'k3': np.exp(-d) - 1.0 + d, 'abs': abs(d)}[estimator]
  return out


def truncate_at_stop_reference(tokens, mask, stop_id, after):
  new_mask, has = mask.copy(), np.zeros(mask.shape[0], bool)
  for b in range(mask.shape[0]):
    for t in range(mask.shape[1]):
      if mask[b, t] > 0 and t >= after and tokens[b, t] == stop_id:
        has[b] = True
        new_mask[b, t + 1:] = 0
        break
  return new_mask, has


# ----------------------------------------------------------------------------
# Tests.


@pytest.mark.parametrize('left', [False, True], ids=['right_padded', 'left_padded'])
def test_last_index_vs_reference(left):
  mask = make_mask(LENGTHS, N, left)
  np.testing.assert_array_equal(ppo.last_index(jnp.asarray(mask)), last_index_reference(mask))


def test_last_index_empty_row():
  """The docstring: 0 for a row with no real token."""
  mask = make_mask((0, 3), N, left=False)
  assert int(ppo.last_index(jnp.asarray(mask))[0]) == 0


@pytest.mark.parametrize('left', [False, True], ids=['right_padded', 'left_padded'])
def test_token_rewards_vs_reference(left):
  rng = np.random.default_rng(0)
  mask = make_mask(LENGTHS, N, left)
  kl = rng.normal(size=(len(LENGTHS), N)).astype(np.float32)   # [B, N], garbage on padding too
  score = rng.normal(size=len(LENGTHS)).astype(np.float32) * 3  # [B]
  beta = 0.05
  out = ppo.token_rewards(jnp.asarray(kl), jnp.asarray(mask), jnp.asarray(score), beta)
  np.testing.assert_allclose(out, token_rewards_reference(kl, mask, score, beta), **TOL)
  assert np.all(np.asarray(out)[mask == 0] == 0)


@pytest.mark.parametrize('gamma,lam', [(1.0, 0.95), (0.9, 0.8)])
@pytest.mark.parametrize('left', [False, True], ids=['right_padded', 'left_padded'])
def test_gae_vs_reference(left, gamma, lam):
  rng = np.random.default_rng(1)
  mask = make_mask(LENGTHS, N, left)
  rewards = (rng.normal(size=mask.shape) * mask).astype(np.float32)  # [B, N]
  values = rng.normal(size=mask.shape).astype(np.float32)            # [B, N]
  values[mask == 0] = 1e3                                            # padding must be ignored
  adv, ret = ppo.gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), gamma, lam)
  ref_adv, ref_ret = gae_reference(rewards, values, mask, gamma, lam)
  np.testing.assert_allclose(adv, ref_adv, **TOL)
  np.testing.assert_allclose(ret, ref_ret, **TOL)
  assert np.all(np.asarray(adv)[mask == 0] == 0) and np.all(np.asarray(ret)[mask == 0] == 0)


@pytest.mark.parametrize('shift_mean', [True, False])
@pytest.mark.parametrize('left', [False, True], ids=['right_padded', 'left_padded'])
def test_whiten_vs_reference(left, shift_mean):
  rng = np.random.default_rng(2)
  mask = make_mask(LENGTHS, N, left)
  x = (rng.normal(size=mask.shape) * 2 + 0.7).astype(np.float32)  # [B, N]
  x[mask == 0] = 1e3                                              # padding must not enter the moments
  out = ppo.whiten(jnp.asarray(x), jnp.asarray(mask), shift_mean=shift_mean)
  np.testing.assert_allclose(out, whiten_reference(x, mask, shift_mean), **TOL)
  assert np.all(np.asarray(out)[mask == 0] == 0)


def test_whiten_has_zero_mean_unit_std():
  rng = np.random.default_rng(3)
  mask = make_mask(LENGTHS, N, left=False)
  x = (rng.normal(size=mask.shape) * 5 - 3).astype(np.float32)  # [B, N]
  out = np.asarray(ppo.whiten(jnp.asarray(x), jnp.asarray(mask)), np.float64)
  mean, var = moments_reference(out, mask)
  np.testing.assert_allclose(mean, 0.0, atol=1e-5)
  np.testing.assert_allclose(np.sqrt(var), 1.0, rtol=1e-5)


@pytest.mark.parametrize('left', [False, True], ids=['right_padded', 'left_padded'])
def test_policy_loss_vs_reference(left):
  rng = np.random.default_rng(4)
  mask = make_mask(LENGTHS, N, left)
  old_logp = rng.normal(size=mask.shape).astype(np.float32) - 2         # [B, N]
  new_logp = (old_logp + 0.3 * rng.normal(size=mask.shape)).astype(np.float32)
  adv = rng.normal(size=mask.shape).astype(np.float32)                  # [B, N]
  clip = 0.2
  loss, aux = ppo.policy_loss(jnp.asarray(new_logp), jnp.asarray(old_logp), jnp.asarray(adv),
                              jnp.asarray(mask), clip)
  ref_loss, ref_clipfrac, ref_kl = policy_loss_reference(new_logp, old_logp, adv, mask, clip)
  assert 0 < ref_clipfrac < 1                                          # both branches are exercised
  np.testing.assert_allclose(loss, ref_loss, **TOL)
  np.testing.assert_allclose(aux['clipfrac'], ref_clipfrac, **TOL)
  np.testing.assert_allclose(aux['approx_kl'], ref_kl, **TOL)


@pytest.mark.parametrize('clip', [0.0, 0.2])
@pytest.mark.parametrize('left', [False, True], ids=['right_padded', 'left_padded'])
def test_value_loss_vs_reference(left, clip):
  rng = np.random.default_rng(5)
  mask = make_mask(LENGTHS, N, left)
  old_v = rng.normal(size=mask.shape).astype(np.float32)                # [B, N]
  new_v = (old_v + 0.3 * rng.normal(size=mask.shape)).astype(np.float32)
  returns = rng.normal(size=mask.shape).astype(np.float32)              # [B, N]
  loss, aux = ppo.value_loss(jnp.asarray(new_v), jnp.asarray(old_v), jnp.asarray(returns),
                             jnp.asarray(mask), clip)
  ref_loss, ref_clipfrac = value_loss_reference(new_v, old_v, returns, mask, clip)
  np.testing.assert_allclose(loss, ref_loss, **TOL)
  np.testing.assert_allclose(aux['clipfrac'], ref_clipfrac, **TOL)
  if clip == 0:
    mse = sum((float(new_v[b, t]) - float(returns[b, t])) ** 2
              for b in range(mask.shape[0]) for t in real_positions(mask[b])) / mask.sum()
    np.testing.assert_allclose(loss, 0.5 * mse, **TOL)
  else:
    assert 0 < ref_clipfrac < 1


@pytest.mark.parametrize('kl', [1.0, 5.9, 6.0, 6.3, 60.0])  # below, near, at and far above target
def test_kl_controller_vs_reference(kl):
  beta, n, target, horizon = 0.1, 512, 6.0, 10000
  out = ppo.kl_controller(jnp.float32(beta), jnp.float32(kl), n, target=target, horizon=horizon)
  np.testing.assert_allclose(out, kl_controller_reference(beta, kl, n, target, horizon), **TOL)


def test_kl_controller_sequence_vs_loop():
  rng = np.random.default_rng(6)
  kls = rng.uniform(0, 15, size=20)
  target, horizon, n = 6.0, 10000, 256
  beta, ref = jnp.float32(0.2), 0.2
  for kl in kls:
    beta = ppo.kl_controller(beta, jnp.float32(kl), n, target=target, horizon=horizon)
    ref = kl_controller_reference(ref, float(np.float32(kl)), n, target, horizon)
  np.testing.assert_allclose(beta, ref, **TOL)


@pytest.mark.parametrize('estimator', ppo.KL_ESTIMATORS)
def test_kl_penalty_vs_reference(estimator):
  rng = np.random.default_rng(7)
  logp = rng.normal(size=(3, N)).astype(np.float32) - 2                     # [B, N]
  ref_logp = (logp + rng.normal(size=(3, N))).astype(np.float32)            # [B, N]
  out = ppo.kl_penalty(jnp.asarray(logp), jnp.asarray(ref_logp), estimator)
  np.testing.assert_allclose(out, kl_penalty_reference(logp, ref_logp, estimator), **TOL)
  if estimator in ('k2', 'k3', 'abs'):
    assert np.all(np.asarray(out) >= 0)


def test_kl_penalty_rejects_unknown_estimator():
  with pytest.raises(ValueError):
    ppo.kl_penalty(jnp.zeros(3), jnp.zeros(3), 'k4')


@pytest.mark.parametrize('after', [0, 2])
def test_truncate_at_stop_vs_reference(after):
  stop = 1
  mask = make_mask((N, 5, 6, 2, N, 4), N, left=False)
  tokens = np.array([
      [5, 6, 1, 7, 1, 8, 9],   # first stop at 2, a second at 4
      [1, 6, 7, 1, 8, 0, 0],   # stop at 0 (ignored when after = 2), then at 3
      [5, 6, 7, 8, 9, 4, 1],   # a stop only on padding: ignored
      [5, 1, 0, 0, 0, 0, 0],   # stop at 1, the row's last real token
      [5, 6, 7, 8, 9, 4, 3],   # no stop
      [9, 9, 9, 9, 1, 1, 1],   # stops only on padding
  ], np.int32)                 # [B, N]
  new_mask, has = ppo.truncate_at_stop(jnp.asarray(tokens), jnp.asarray(mask), stop, after)
  ref_mask, ref_has = truncate_at_stop_reference(tokens, mask, stop, after)
  np.testing.assert_array_equal(new_mask, ref_mask)
  np.testing.assert_array_equal(has, ref_has)
  assert new_mask.dtype == mask.dtype


def test_truncate_at_stop_random_vs_reference():
  rng = np.random.default_rng(8)
  for left in (False, True):
    mask = make_mask(rng.integers(1, N + 1, size=16), N, left)
    tokens = rng.integers(0, 4, size=mask.shape).astype(np.int32)  # [B, N]: stop id 0 is frequent
    for after in range(N + 1):
      new_mask, has = ppo.truncate_at_stop(jnp.asarray(tokens), jnp.asarray(mask), 0, after)
      ref_mask, ref_has = truncate_at_stop_reference(tokens, mask, 0, after)
      np.testing.assert_array_equal(new_mask, ref_mask)
      np.testing.assert_array_equal(has, ref_has)
