"""Sampler: determinism, greedy / top-k / top-p, EOS, log-probs, padding, and the draw itself."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import model as M
from rlhf_jax import sampling

CFGS = {
    'gpt2': M.ModelConfig(vocab_size=64, d_model=32, n_layer=2, n_head=4, d_ff=64, max_len=32),
    'llama': M.ModelConfig(vocab_size=64, d_model=32, n_layer=2, n_head=4, n_kv_head=2, d_ff=64,
                           style='llama'),
}
P, N = 6, 8


@functools.lru_cache(maxsize=None)
def _model(style):
  model = M.Transformer(CFGS[style])
  params = jax.jit(lambda k: nn.meta.unbox(model.init(k, jnp.zeros((1, 4), jnp.int32))))(jax.random.key(0))
  # Sharpen the tied head a little so greedy choices are not near-ties.
  return model, jax.tree.map(lambda x: x * 3 if x.ndim == 2 else x, params['params'])


@functools.lru_cache(maxsize=None)
def _gen(style, **kw):
  model, _ = _model(style)
  return sampling.make_generate(model, sampling.SampleConfig(max_new_tokens=N, **kw))


def _prompts(lengths=(2, 6, 4, 5), seed=0):
  rng = np.random.default_rng(seed)
  toks = np.zeros((len(lengths), P), np.int32)
  mask = np.zeros((len(lengths), P), np.int32)
  for i, n in enumerate(lengths):  # left-padded
    toks[i, P - n:] = rng.integers(1, 64, size=n)
    mask[i, P - n:] = 1
  return toks, mask


def test_deterministic_for_a_key():
  _, params = _model('gpt2')
  toks, mask = _prompts()
  gen = _gen('gpt2', temperature=1.0)
  a = gen(params, toks, mask, jax.random.key(1))
  b = gen(params, toks, mask, jax.random.key(1))
  c = gen(params, toks, mask, jax.random.key(2))
  np.testing.assert_array_equal(a['tokens'], b['tokens'])
  np.testing.assert_array_equal(a['logprobs'], b['logprobs'])
  assert not np.array_equal(a['tokens'], c['tokens'])


def test_top_k_one_is_greedy():
  _, params = _model('gpt2')
  toks, mask = _prompts()
  greedy = _gen('gpt2', temperature=0.0)(params, toks, mask, jax.random.key(0))
  topk = _gen('gpt2', temperature=1.0, top_k=1)(params, toks, mask, jax.random.key(5))
  np.testing.assert_array_equal(greedy['tokens'], topk['tokens'])


@pytest.mark.parametrize('style', sorted(CFGS))
def test_greedy_matches_full_forward_and_ignores_padding(style):
  """Greedy tokens are the argmax of a plain full forward (no cache) over each row's prompt and
  tokens so far, laid out right-padded instead of left-padded."""
  model, params = _model(style)
  toks, mask = _prompts()
  out = _gen(style, temperature=0.0)(params, toks, mask, jax.random.key(0))
  fwd = jax.jit(lambda t, m: model.apply({'params': params}, t, mask=m)['logits'])
  for i in range(len(toks)):
    seq = list(toks[i][mask[i] > 0])
    for t in range(N):  # slow reference: one full forward per token
      buf = np.zeros((1, P + N), np.int32)
      buf[0, :len(seq)] = seq
      nxt = int(np.argmax(fwd(buf, (np.arange(P + N) < len(seq))[None])[0, len(seq) - 1]))
      assert nxt == out['tokens'][i, t], (i, t)
      seq.append(nxt)


def test_logprobs_match_recomputed_logprobs_at_temperature():
  """The sampler's log-probs are log softmax(logits / T) of a fresh forward at the same tokens
  (what PPO's scoring pass computes), so the first PPO ratio is 1."""
  model, params = _model('gpt2')
  toks, mask = _prompts()
  T = 0.7
  out = _gen('gpt2', temperature=T)(params, toks, mask, jax.random.key(3))
  seq = np.concatenate([toks, out['tokens']], 1)
  full_mask = np.concatenate([mask, out['mask']], 1)
  logits = model.apply({'params': params}, seq, mask=full_mask)['logits'][:, P - 1:-1]   # [B, N, V]
  ref = np.take_along_axis(np.asarray(jax.nn.log_softmax(logits / T)), out['tokens'][..., None], -1)[..., 0]
  real = np.asarray(out['mask']) > 0
  np.testing.assert_allclose(np.asarray(out['logprobs'])[real], ref[real], atol=1e-4)


@pytest.mark.parametrize('style', sorted(CFGS))
def test_sampling_on_a_mesh_draws_what_one_device_draws(style):
  """`make_generate(..., mesh)` with params placed by the sharding rules and prompts split over
  the batch axes (heads and MLP split over `tensor`): the same tokens and log-probs as on one
  device, for the same key. The benchmark's GEN runs this way, data-parallel over a host's cores."""
  from rlhf_jax import sharding
  model, params = _model(style)
  toks, mask = _prompts()
  one = _gen(style, temperature=1.0)(params, toks, mask, jax.random.key(4))
  mesh = sharding.make_mesh(data=4, tensor=2)
  _, shardings = sharding.abstract_and_shardings(lambda k: model.init(k, jnp.zeros((1, 4), jnp.int32)),
                                                 mesh, jax.random.key(0))
  placed = jax.device_put(params, shardings['params'])
  assert placed['block_0']['attn']['qkv'].sharding.spec[1] == 'tensor'   # [embed, heads, 3, kv]
  t, m = sharding.shard_batch((toks, mask), mesh)
  gen = sampling.make_generate(model, sampling.SampleConfig(max_new_tokens=N, temperature=1.0), mesh)
  out = gen(placed, t, m, jax.random.key(4))
  assert out['tokens'].sharding.spec[0] in (('data', 'fsdp'), 'data')
  np.testing.assert_array_equal(out['tokens'], one['tokens'])
  np.testing.assert_allclose(out['logprobs'], one['logprobs'], atol=1e-5)


def test_eos_stops_a_sequence():
  _, params = _model('gpt2')
  toks, mask = _prompts()
  free = _gen('gpt2', temperature=0.0)(params, toks, mask, jax.random.key(0))['tokens']
  eos = int(free[0, 2])                   # make row 0's third token the stop token
  first = {i: list(free[i]).index(eos) for i in range(len(free)) if eos in list(free[i])}
  out = _gen('gpt2', temperature=0.0, eos_id=eos, pad_id=63)(params, toks, mask, jax.random.key(0))
  assert first[0] <= 2
  for i in range(len(free)):
    stop = first.get(i, N - 1)
    np.testing.assert_array_equal(out['tokens'][i, :stop + 1], free[i, :stop + 1])
    np.testing.assert_array_equal(out['mask'][i], (np.arange(N) <= stop).astype(np.int32))
    assert (np.asarray(out['tokens'][i, stop + 1:]) == 63).all()
    assert (np.asarray(out['logprobs'][i, stop + 1:]) == 0).all()


def test_rejects_overlong_generation():
  model, params = _model('gpt2')
  with pytest.raises(ValueError, match='max_len'):
    sampling.generate(params, jnp.zeros((1, 30), jnp.int32), jnp.ones((1, 30)), jax.random.key(0),
                      model=model, cfg=sampling.SampleConfig(max_new_tokens=8))


# --------------------------------------------------------------------- the draw, against closed forms
LOGITS = np.log(np.array([0.5, 0.3, 0.1, 0.07, 0.03, 0.0]) + 1e-30).astype(np.float32)
DRAWS = 40000


def _frequencies(**kw):
  cfg = sampling.SampleConfig(max_new_tokens=1, **kw)
  logits = jnp.broadcast_to(jnp.asarray(LOGITS), (DRAWS, len(LOGITS)))
  u = jax.random.uniform(jax.random.key(0), (DRAWS,))
  toks, logp = jax.jit(lambda l, u: sampling.sample_logits(l, u, cfg))(logits, u)
  return np.bincount(np.asarray(toks), minlength=len(LOGITS)) / DRAWS, np.asarray(toks), np.asarray(logp)


def _probs(temperature=1.0):
  p = np.exp(LOGITS.astype(np.float64) / temperature)
  return p / p.sum()


@pytest.mark.parametrize('temperature', [1.0, 0.5])
def test_draw_matches_softmax(temperature):
  freq, toks, logp = _frequencies(temperature=temperature)
  p = _probs(temperature)
  tol = 4 * np.sqrt(p * (1 - p) / DRAWS) + 1e-9   # 4 standard errors per token
  assert (np.abs(freq - p) <= tol).all(), (freq, p)
  assert freq[-1] == 0                             # a zero-probability token is never drawn
  np.testing.assert_allclose(logp, np.log(p[toks]), rtol=1e-5)


def test_top_k_and_top_p_renormalise_the_kept_tokens():
  p = _probs()
  freq, toks, logp = _frequencies(top_k=2)
  want = np.where(np.arange(6) < 2, p, 0) / p[:2].sum()
  assert (np.abs(freq - want) <= 4 * np.sqrt(want * (1 - want) / DRAWS) + 1e-9).all(), freq
  np.testing.assert_allclose(logp, np.log(p[toks]), rtol=1e-5)   # log-probs stay untruncated
  # Nucleus 0.85: mass before tokens 0..3 is 0, .5, .8, .9 -> keep tokens 0, 1, 2.
  freq, _, _ = _frequencies(top_p=0.85)
  want = np.where(np.arange(6) < 3, p, 0) / p[:3].sum()
  assert (np.abs(freq - want) <= 4 * np.sqrt(want * (1 - want) / DRAWS) + 1e-9).all(), freq


def test_inverse_cdf_matches_searchsorted():
  """Across many blocks, with a vocabulary that is not a multiple of the block and zero weights:
  the index equals NumPy's search of the float64 cumulative sum."""
  rng = np.random.default_rng(0)
  w = rng.exponential(size=(64, 1000)) * (rng.random((64, 1000)) > 0.3)   # [B, V], 30 % zeros
  cdf = np.cumsum(w, -1)
  u = rng.random(64) * cdf[:, -1]
  got = np.asarray(jax.jit(sampling.inverse_cdf)(jnp.asarray(w, jnp.float32), jnp.asarray(u, jnp.float32)))
  want = np.array([np.searchsorted(c, x, side='right') for c, x in zip(cdf, u)])
  # float32 vs float64 sums may disagree only for u within rounding of a boundary: skip those.
  clear = np.array([np.min(np.abs(c - x)) > 1e-4 * c[-1] for c, x in zip(cdf, u)])
  assert clear.sum() > 50
  np.testing.assert_array_equal(got[clear], want[clear])
  assert (w[np.arange(64), got] > 0).all()          # never a zero-weight index, even at boundaries
  # u at the very top of the range still lands on the last positive weight.
  top = np.asarray(sampling.inverse_cdf(jnp.asarray(w, jnp.float32), jnp.asarray(cdf[:, -1], jnp.float32)))
  np.testing.assert_array_equal(top, [np.nonzero(r)[0][-1] for r in w])


def test_vocab_limit_never_draws_padding_ids():
  """With a tokenizer smaller than the model's vocabulary, ids at or above its size are never
  drawn, and log-probs are those of the softmax over the real ids."""
  model, params = _model('gpt2')
  toks, mask = _prompts()
  out = _gen('gpt2', temperature=1.0, vocab_size=10)(params, toks, mask, jax.random.key(7))
  assert int(np.max(out['tokens'])) < 10
  seq = np.concatenate([toks, out['tokens']], 1)
  logits = model.apply({'params': params}, seq, mask=np.concatenate([mask, out['mask']], 1))['logits']
  ref = jax.nn.log_softmax(logits[:, P - 1:-1, :10])
  ref = np.take_along_axis(np.asarray(ref), out['tokens'][..., None], -1)[..., 0]
  np.testing.assert_allclose(out['logprobs'], ref, atol=1e-4)
