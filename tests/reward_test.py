"""The reward model: eq. 1 against a slow reference, masking of padded responses, one forward per
response, normalisation, the ranking pipeline, and the RM loop (resume, init from SFT, learning)."""
import functools
import itertools
import math
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import rm as rm_config
from experiments import sft as sft_config
from rlhf_jax import checkpoint, metrics, optim, reward, sharding, steps, tokenizers, trainer
from rlhf_jax import state as state_lib
from rlhf_jax.data import datasets, pipeline

ROOT = pathlib.Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------
# The loss.


def _reference_loss(scores, ranks, valid):
  """Eq. 1 with loops: per prompt the mean over its pairs of -log sigmoid(r_w - r_l), then the
  mean over prompts that have a pair."""
  per_prompt, hits, n = [], 0, 0
  for s, r, v in zip(scores, ranks, valid):
    losses = []
    for i in range(len(s)):
      for j in range(len(s)):
        if v[i] and v[j] and r[i] < r[j]:
          d = float(s[i]) - float(s[j])
          losses.append(math.log1p(math.exp(-d)))
          hits += d > 0
          n += 1
    if losses:
      per_prompt.append(sum(losses) / len(losses))
  return sum(per_prompt) / len(per_prompt), hits / n, n, len(per_prompt)


def _random_groups(rng, b, k_max, ties=True):
  ranks = np.zeros((b, k_max), np.int32)
  valid = np.zeros((b, k_max), np.int32)
  for i in range(b):
    k = rng.integers(2, k_max + 1)
    r = rng.permutation(k)
    if ties and rng.random() < 0.3:
      r[r == 1] = 0                         # a tie between the two best: no pair between them
    ranks[i, :k], valid[i, :k] = r, 1
    ranks[i, k:] = rng.integers(0, k_max, k_max - k)   # junk ranks on padding slots
  return ranks, valid


def test_ranking_loss_matches_slow_reference():
  rng = np.random.default_rng(0)
  ranks, valid = _random_groups(rng, 16, 9)
  valid[3] = 0                              # a wholly padded batch element (eval filler)
  scores = rng.normal(size=(16, 9)).astype(np.float32) * 2
  loss, m = reward.ranking_loss(jnp.asarray(scores), jnp.asarray(ranks), jnp.asarray(valid))
  ref_loss, ref_acc, ref_n, ref_prompts = _reference_loss(scores, ranks, valid)
  np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-6)
  np.testing.assert_allclose(float(m['accuracy']), ref_acc, rtol=1e-6)
  assert int(m['pairs']) == ref_n and int(m['prompts']) == ref_prompts < 15   # a K=2 tie has no pair
  # The host-side metric (used for evaluation) agrees with both.
  host = reward.pairwise_metrics([s[v > 0] for s, v in zip(scores, valid)], [r[v > 0] for r, v in zip(ranks, valid)])
  np.testing.assert_allclose(host['log_loss'], ref_loss, rtol=1e-6)
  np.testing.assert_allclose(host['accuracy'], ref_acc, rtol=1e-6)


def test_padding_contributes_nothing_to_loss_or_gradient():
  rng = np.random.default_rng(1)
  ranks, valid = _random_groups(rng, 8, 6)
  scores = jnp.asarray(rng.normal(size=(8, 6)).astype(np.float32))
  f = lambda s, r: reward.ranking_loss(s, jnp.asarray(r), jnp.asarray(valid))[0]  # noqa: E731
  other = jnp.where(valid > 0, scores, jnp.asarray(rng.normal(size=(8, 6)) * 100 + np.inf * (rng.random((8, 6)) < .2)))
  other_ranks = np.where(valid > 0, ranks, rng.integers(0, 6, (8, 6)))
  assert float(f(scores, ranks)) == float(f(other, other_ranks))
  g = jax.grad(f)(scores, ranks)
  assert np.all(np.asarray(g)[valid == 0] == 0)
  np.testing.assert_array_equal(np.asarray(g), np.asarray(jax.grad(f)(other, other_ranks)))


@pytest.mark.parametrize('k', [2, 4, 9])
def test_each_prompt_weighs_the_same_whatever_its_k(k):
  """Prompt A has one pair with margin d; prompt B has K equal scores (each pair costs log 2).
  Eq. 1 gives (softplus(-d) + log 2) / 2 whatever K is (a flat mean over pairs would not)."""
  d = 1.3
  scores = np.zeros((2, 9), np.float32)
  scores[0, :2] = [d, 0.0]
  ranks = np.tile(np.arange(9, dtype=np.int32), (2, 1))
  valid = np.zeros((2, 9), np.int32)
  valid[0, :2], valid[1, :k] = 1, 1
  loss, _ = reward.ranking_loss(jnp.asarray(scores), jnp.asarray(ranks), jnp.asarray(valid))
  np.testing.assert_allclose(float(loss), (math.log1p(math.exp(-d)) + math.log(2)) / 2, rtol=1e-6)


def test_normalization_fits_mean_zero_and_unit_std():
  raw = np.random.default_rng(2).normal(3.0, 0.4, 1000)
  demo = reward.fit_normalization(raw, 'demonstrations')
  assert demo.gain == 1.0 and abs(demo.apply(raw).mean()) < 1e-12
  ref = reward.fit_normalization(raw, 'reference')
  out = ref.apply(raw)
  assert abs(out.mean()) < 1e-12 and abs(out.std() - 1) < 1e-12
  assert reward.Normalization.from_dict(ref.to_dict()) == ref
  with pytest.raises(ValueError, match='std'):
    reward.fit_normalization(np.ones(4), 'reference')
  with pytest.raises(ValueError, match='mode'):
    reward.fit_normalization(raw, 'median')


# ----------------------------------------------------------------------------
# The pipeline.

TOK = tokenizers.ByteTokenizer()


def test_encode_ranking_reads_each_responses_last_token():
  rec = {'prompt': 'Sort: b a\n', 'responses': ['a b', 'b a', 'x'], 'k': 3}
  e = pipeline.encode_ranking(TOK, rec, seq_len=24, k_max=5)
  assert e['tokens'].shape == (5, 24) and e['read_at'].shape == (5,)
  np.testing.assert_array_equal(e['valid'], [1, 1, 1, 0, 0])
  np.testing.assert_array_equal(e['ranks'][:3], [0, 1, 2])
  for slot, y in enumerate(rec['responses']):
    want = [TOK.bos_id] + TOK.encode(rec['prompt'] + y) + [TOK.eos_id]
    np.testing.assert_array_equal(e['tokens'][slot, :len(want)], want)
    assert e['mask'][slot].sum() == len(want) and e['read_at'][slot] == len(want) - 1
    assert e['tokens'][slot, e['read_at'][slot]] == TOK.eos_id
  assert e['mask'][3:].sum() == 0


def test_more_than_k_max_keeps_a_fixed_subset_in_rank_order():
  rec = {'prompt': 'p', 'responses': [f'r{i}' for i in range(9)]}
  a = pipeline.encode_ranking(TOK, rec, seq_len=8, k_max=4)
  b = pipeline.encode_ranking(TOK, rec, seq_len=8, k_max=4)
  np.testing.assert_array_equal(a['tokens'], b['tokens'])
  assert list(a['ranks']) == sorted(a['ranks']) and len(set(a['ranks'])) == 4 and a['valid'].all()


def test_flat_pairs_are_every_ordered_pair():
  recs = [{'prompt': 'p', 'responses': list('abcd')}, {'prompt': 'q', 'responses': list('xy'), 'ranks': [0, 0]}]
  pairs = pipeline.pairs_of(recs)
  assert [tuple(p['responses']) for p in pairs] == list(itertools.combinations('abcd', 2))


def test_eval_batches_keep_record_order_and_pad_with_empty_elements():
  recs = [{'prompt': f'p{i}', 'responses': ['a', 'b', 'c'][:2 + i % 2]} for i in range(5)]
  batches = list(pipeline.ranking_eval_batches(TOK, recs, seq_len=8, k_max=3, global_batch=4))
  assert len(batches) == 2
  valid = np.concatenate([b['valid'] for b in batches])
  np.testing.assert_array_equal(valid.sum(1), [2, 3, 2, 3, 2, 0, 0, 0])
  first = np.concatenate([b['tokens'] for b in batches])[:, 0]
  assert [TOK.decode(t[1:3]) for t in first[:5]] == [f'p{i}' for i in range(5)]


# ----------------------------------------------------------------------------
# The step.


@pytest.fixture(scope='module')
def smoke_rm():
  c = rm_config.get_config('smoke')
  model = trainer.rm_model(c)
  tx = optim.make(c.optim.to_dict(), 10)
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  init = lambda key: model.init(key, jnp.zeros((1, 16), jnp.int32))['params']  # noqa: E731
  state, shardings = state_lib.create(init, tx, mesh, 0)
  step = steps.compile_step(steps.reward_step, mesh, shardings, pipeline.RANKING_FIELDS, model=model, tx=tx)
  return c, model, tx, mesh, state, step


def _batch(seed=0, b=4, k_max=5):
  rng = np.random.default_rng(seed)
  recs = [{'prompt': f'prompt {i}\n', 'responses': [f'answer {j}{"!" * j}' for j in range(rng.integers(2, k_max + 1))]}
          for i in range(b)]
  return {k: np.stack([pipeline.encode_ranking(TOK, r, 16, k_max)[k] for r in recs]) for k in pipeline.RANKING_FIELDS}


def test_model_runs_once_per_response_not_per_pair(smoke_rm):
  _, model, tx, _, state, _ = smoke_rm
  batch = _batch(b=4, k_max=5)
  seen = []

  def spy(next_fun, args, kwargs, context):
    if context.method_name == 'trunk':
      seen.append(args[0].shape)
    return next_fun(*args, **kwargs)
  with nn.intercept_methods(spy):
    jax.eval_shape(functools.partial(steps.reward_step, model=model, tx=tx), state, batch)
  assert seen == [(4 * 5, 16)]                     # B * K_max rows, not B * C(K, 2)


def test_step_ignores_the_tokens_of_padded_responses(smoke_rm):
  _, _, _, mesh, state, step = smoke_rm
  batch = _batch(seed=1)
  assert (batch['valid'] == 0).any()
  other = {k: v.copy() for k, v in batch.items()}
  pad = other['valid'] == 0
  rng = np.random.default_rng(5)
  other['tokens'][pad] = rng.integers(0, 259, other['tokens'][pad].shape)
  other['mask'][pad] = 1
  other['positions'][pad] = np.arange(16)
  other['read_at'][pad] = 7
  copy = lambda s: jax.tree.map(jnp.copy, s)  # noqa: E731  (the step donates its state)
  s1, m1 = step(copy(state), sharding.shard_batch(batch, mesh))
  s2, m2 = step(copy(state), sharding.shard_batch(other, mesh))
  for k in m1:
    np.testing.assert_array_equal(np.asarray(m1[k]), np.asarray(m2[k]), err_msg=k)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), s1.params, s2.params)


def _pack(batch, row_len=32):
  rows, docs = pipeline.pack_need(batch, row_len)
  rows = -(-rows // 4) * 4                          # the smoke mesh's data * fsdp
  return pipeline.pack_rankings(batch, pipeline.PackShape(rows=rows, row_len=row_len, docs=docs))


def test_packing_keeps_each_response_whole_and_apart():
  batch = _batch(seed=2, b=6, k_max=5)
  p = _pack(batch, row_len=40)
  assert p['tokens'].shape[1] == 40 and p['slot'].shape == batch['valid'].shape
  real = batch['mask'].sum()
  assert p['mask'].sum() == real < p['tokens'].size  # every real token once, fewer slots than [B, K, T]
  docs = p['read_at'].shape[1]
  for i, j in zip(*np.nonzero(batch['valid'])):
    row, doc = divmod(int(p['slot'][i, j]), docs)
    n = int(batch['mask'][i, j].sum())
    (where,) = np.nonzero(p['segments'][row] == doc + 1)
    np.testing.assert_array_equal(where, np.arange(where[0], where[0] + n))    # contiguous, whole
    np.testing.assert_array_equal(p['tokens'][row, where], batch['tokens'][i, j, :n])
    np.testing.assert_array_equal(p['positions'][row, where], np.arange(n))
    assert p['read_at'][row, doc] == where[-1] and where[-1] - where[0] == batch['read_at'][i, j]
  np.testing.assert_array_equal(p['ranks'], batch['ranks'])
  too_small = pipeline.PackShape(rows=1, row_len=40, docs=2)
  with pytest.raises(ValueError, match='rm.pack_rows'):
    pipeline.pack_rankings(batch, too_small)


def test_packed_step_matches_the_unpacked_step(smoke_rm):
  """The same rankings padded to [B, K_max, T] and packed into shared rows: the same loss,
  accuracy and update (the unpacked step is the reference)."""
  _, model, tx, mesh, state, step = smoke_rm
  batch = _batch(seed=3, b=4, k_max=5)
  packed = _pack(batch)
  pstep = steps.compile_step(steps.reward_step, mesh, jax.tree.map(lambda a: a.sharding, state),
                             pipeline.PACKED_RANKING_FIELDS, model=model, tx=tx)
  copy = lambda s: jax.tree.map(jnp.copy, s)  # noqa: E731  (the step donates its state)
  s1, m1 = step(copy(state), sharding.shard_batch(batch, mesh))
  s2, m2 = pstep(copy(state), sharding.shard_batch(packed, mesh))
  for k in ('rm/loss', 'rm/accuracy', 'rm/pairs', 'rm/prompts', 'rm/score_mean', 'rm/grad_norm'):
    np.testing.assert_allclose(np.asarray(m2[k]), np.asarray(m1[k]), rtol=2e-5, atol=1e-6, err_msg=k)

  def grads(b):   # (Adam's first update is ~lr·sign(g): compare the gradients, not the new parameters)
    loss = lambda p: reward.ranking_loss(steps.reward_scores(p, b, model=model), b['ranks'], b['valid'])[0]  # noqa: E731
    return jax.jit(jax.grad(loss))(jax.device_get(state.params))
  g1, g2 = grads(batch), grads(packed)
  scale = max(float(np.abs(a).max()) for a in jax.tree.leaves(g1))   # some leaves' true gradient is 0
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6 * scale)


def test_pack_shape_holds_every_batch_of_the_run():
  recs = [{'prompt': f'prompt {i}\n', 'responses': [f'r{j}' * (1 + (i * j) % 5) for j in range(2 + i % 4)]}
          for i in range(40)]
  kw = dict(seq_len=24, k_max=5, global_batch=8, seed=1)
  shape = pipeline.pack_shape_for(TOK, recs, steps=12, row_len=48, multiple=4, **kw)
  assert shape.rows % 4 == 0
  plain, packed = iter(pipeline.ranking_batches(TOK, recs, **kw)), iter(pipeline.packed_ranking_batches(
      TOK, recs, shape=shape, **kw))
  need = []
  for _ in range(12):                                # three epochs, reshuffled
    b, p = next(plain), next(packed)
    need.append(pipeline.pack_need(b, 48))
    assert p['mask'].sum() == b['mask'].sum() and p['tokens'].shape == (shape.rows, 48)
  assert max(r for r, _ in need) > shape.rows - 4 and max(d for _, d in need) == shape.docs


# ----------------------------------------------------------------------------
# The loop.


def _config(**train):
  c = rm_config.get_config('smoke')
  c.train.update(**{**dict(steps=6, log_every=1, eval_every=6, checkpoint_every=100), **train})
  return c


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('rm_full'))
  return workdir, trainer.train_reward(_config(), workdir)


def test_killed_and_resumed_rm_matches_uninterrupted(uninterrupted, tmp_path):
  full_dir, full = uninterrupted
  assert trainer.train_reward(_config(), str(tmp_path), stop_after=2)['step'] == 2
  resumed = trainer.train_reward(_config(), str(tmp_path))
  read = lambda d: checkpoint.Checkpointer(f'{d}/checkpoints').read_state()['params']  # noqa: E731
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), read(full_dir),
               read(str(tmp_path)))
  losses = lambda d: [(r['step'], r['rm/loss']) for r in metrics.read(d) if 'rm/loss' in r]  # noqa: E731
  assert losses(full_dir) == losses(str(tmp_path))
  for k in ('eval/accuracy', 'eval/log_loss', 'eval/gold_agreement', 'eval/heldout_labeler_accuracy'):
    assert full[k] == resumed[k], k
  assert full['norm'] == resumed['norm']


def test_saved_normalisation_gives_demonstrations_mean_zero(uninterrupted):
  """The constants saved with the final checkpoint, applied to fresh scores of the demonstrations
  they were fit on, give mean 0."""
  full_dir, _ = uninterrupted
  c = _config()
  ckpt = checkpoint.Checkpointer(f'{full_dir}/checkpoints')
  extra = ckpt.read_extra()
  norm = reward.Normalization.from_dict(extra['norm'])
  assert norm.mode == 'demonstrations' and norm.n == c.norm.n and norm.gain == 1.0
  assert extra['model']['scalar_head'] and not extra['model']['lm_head']
  mesh = sharding.make_mesh(data=8)
  model, params, loaded = trainer.load_reward_model(f'{full_dir}/checkpoints', mesh)
  assert loaded == norm and model.cfg == trainer.rm_model(c).cfg
  scorer = trainer.RewardScorer(model, TOK, mesh, seq_len=c.data.seq_len, batch_size=16)
  demos = datasets.demonstrations(c, c.norm.n)
  raw = scorer.texts(params, [d['prompt'] for d in demos], [d['response'] for d in demos])
  assert abs(raw.mean()) > 1e-3                    # the raw scores were not centred already
  assert abs(norm.apply(raw).mean()) < 1e-5


@pytest.fixture(scope='module')
def sft_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('sft'))
  c = sft_config.get_config('smoke')
  c.train.update(steps=2, eval_every=0)
  trainer.train_sft(c, workdir)
  return workdir


def test_init_from_sft_with_fresh_head_and_reference_normalisation(sft_run, tmp_path):
  """The RM starts from the SFT trunk (its LM head dropped, a fresh scalar head); the 'reference'
  normalisation maps the SFT policy's samples to mean 0 and std 1."""
  c = _config(steps=1)
  c.init.checkpoint = f'{sft_run}/checkpoints'
  c.optim.lr = 0.0
  c.norm.mode = 'reference'
  out = trainer.train_reward(c, str(tmp_path))
  rm_params = checkpoint.Checkpointer(f'{tmp_path}/checkpoints').read_state()['params']
  sft_params = checkpoint.Checkpointer(f'{sft_run}/checkpoints').read_state()['params']
  assert set(rm_params) == set(sft_params) | {'score_head'}
  for k in sft_params:
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), rm_params[k], sft_params[k])

  norm = reward.Normalization.from_dict(out['norm'])
  assert norm.mode == 'reference' and norm.gain != 1.0
  # Redraw the same samples (same seed) and score them with the saved RM.
  mesh = sharding.make_mesh(**c.mesh.to_dict())
  policy = trainer.build_model(c)
  prompts = datasets.normalization_prompts(c, c.norm.n)
  ys = datasets.policy_samples(c, policy, sft_params, TOK, mesh, prompts, temperature=c.norm.temperature, seed=c.seed)
  scorer = trainer.RewardScorer(trainer.rm_model(c), TOK, mesh, seq_len=c.data.seq_len, batch_size=16)
  scored = norm.apply(scorer.texts(rm_params, prompts, ys))
  assert abs(scored.mean()) < 1e-4 and abs(scored.std() - 1) < 1e-4


@pytest.fixture(scope='module')
def sft_run_wide(tmp_path_factory):
  """A second SFT policy, of another shape than `sft_run`'s (and so than the smoke RM's)."""
  workdir = str(tmp_path_factory.mktemp('sft_wide'))
  c = sft_config.get_config('smoke')
  c.model.update(d_model=48, n_layer=1)
  c.train.update(steps=2, eval_every=0)
  trainer.train_sft(c, workdir)
  return workdir


def test_policy_comparisons_rank_the_samples_of_init_policy_checkpoint(sft_run, sft_run_wide, tmp_path):
  """With init.policy_checkpoint set, the RM (started from one SFT run) ranks the samples of another
  policy, of another shape: the same comparisons as an RM stage started from that policy itself."""
  def comparisons(name, init, policy='', **model):
    c = _config()
    c.data.update(comparisons='policy', n_policy=8, n_policy_valid=4)
    c.model.update(**model)
    c.init.update(checkpoint=f'{init}/checkpoints', policy_checkpoint=policy and f'{policy}/checkpoints')
    mesh = sharding.make_mesh(**c.mesh.to_dict())
    workdir = tmp_path / name
    workdir.mkdir(exist_ok=True)
    trainer._with_policy_comparisons(c, {}, TOK, mesh, str(workdir))
    return (workdir / 'policy_comparisons.json').read_text()

  other = comparisons('other', sft_run, policy=sft_run_wide)
  assert other == comparisons('reference', sft_run_wide, d_model=48, n_layer=1)
  assert other != comparisons('own', sft_run)
  # A resumed stage whose policy setting changed does not reuse the other policy's samples.
  with pytest.raises(ValueError, match=r'policy_comparisons\.json holds samples of the policy in .*sft_wide'):
    comparisons('other', sft_run)
  assert (tmp_path / 'other' / 'policy_comparisons.json').read_text() == other   # nothing lost


def test_checkpoint_of_another_family_fails_naming_what_is_missing(tmp_path, uninterrupted):
  full_dir, _ = uninterrupted
  c = sft_config.get_config('smoke')
  c.model.tie_embeddings = False                    # an untied LM needs 'lm_head', which the RM lacks
  c.train.update(steps=1, eval_every=0)
  c.init.checkpoint = f'{full_dir}/checkpoints'
  with pytest.raises(ValueError, match="has no parameters \\['lm_head'\\]"):
    trainer.train_sft(c, str(tmp_path))


def test_tiny_rm_learns_the_rankings(tmp_path):
  """A tiny RM trained from scratch on the embedded task's rankings (a fraction of the README's
  run) orders held-out pairs, the held-out labeler's and the gold labeler's well above chance.
  Thresholds are generous; the README has the full run's figures. Runs as a subprocess with XLA's
  normal optimisation."""
  env = dict(os.environ, XLA_FLAGS='')
  cmd = [sys.executable, '-m', 'rlhf_jax.main', f'--config={ROOT}/experiments/rm.py:tiny',
         '--config.train.steps=120', '--config.train.batch_size=16', '--config.train.eval_every=0',
         '--config.data.n_train=2000', '--config.data.n_valid=128', '--config.data.n_heldout=0',
         '--config.norm.n=32', f'--workdir={tmp_path}']
  out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  final = [r for r in metrics.read(str(tmp_path)) if 'eval/accuracy' in r][-1]
  assert final['step'] == 120
  assert final['eval/accuracy'] > 0.6, final
  assert final['eval/heldout_labeler_accuracy'] > 0.6, final
  assert final['eval/gold_agreement'] > 0.6, final
