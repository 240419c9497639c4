"""Sharding: one forward and one gradient step give the same numbers on every mesh shape, and the
parameters really are laid out as the rules say."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from rlhf_jax import model as M
from rlhf_jax import sharding

CFGS = {
    'gpt2': M.ModelConfig(vocab_size=64, d_model=32, n_layer=2, n_head=4, d_ff=64, max_len=16),
    'llama': M.ModelConfig(vocab_size=64, d_model=32, n_layer=2, n_head=4, n_kv_head=2, d_ff=64,
                           style='llama'),
}
MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 1, 1)]
B, T = 8, 12


@pytest.fixture(autouse=True)
def _small_query_blocks(monkeypatch):
  """Query blocks of at least 4, so that causal attention over T = 12 runs as three query blocks (each
  attending to the keys up to its end) on every mesh, and in the single-device reference."""
  monkeypatch.setattr(M, 'MIN_QUERY_BLOCK', 4)
  assert M.query_blocks(T, CFGS['gpt2'].attention_blocks) == [(0, 4), (4, 8), (8, 12)]


def _batch():
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 64, size=(B, T)).astype(np.int32)
  lengths = rng.integers(4, T + 1, size=B)
  mask = (np.arange(T)[None] < lengths[:, None]).astype(np.int32)  # right-padded
  return {'tokens': tokens, 'mask': mask}


def _loss(params, batch, model):
  logits = model.apply({'params': params}, batch['tokens'], mask=batch['mask'])['logits']  # [B, T, V]
  logp = jax.nn.log_softmax(logits[:, :-1])
  nll = -jnp.take_along_axis(logp, batch['tokens'][:, 1:, None], -1)[..., 0]              # [B, T-1]
  m = batch['mask'][:, 1:]
  return (nll * m).sum() / m.sum(), logits


def _step(params, opt_state, batch, *, model, tx):
  (loss, logits), grads = jax.value_and_grad(_loss, has_aux=True)(params, batch, model)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss, logits


# Momentum SGD: its update is linear in the gradient, so f32 noise stays f32 noise. (Adam's first
# step is lr * sign(g): on a gradient that is exactly zero in theory, such as the key bias's, it
# turns 1e-9 of summation-order noise into a full +-lr step.)
TX = optax.sgd(0.1, momentum=0.9)


@functools.lru_cache(maxsize=None)
def _reference(style):
  """Single device, no mesh: the numbers every mesh must reproduce."""
  model = M.Transformer(CFGS[style])
  params = jax.jit(lambda k: nn.meta.unbox(model.init(k, jnp.zeros((1, T), jnp.int32))))(jax.random.key(0))
  params = params['params']
  out = jax.jit(functools.partial(_step, model=model, tx=TX))(params, TX.init(params), _batch())
  return jax.device_get(out)


def _expected_spec(path, ndim, mesh_shape):
  """What the rules table says a parameter's PartitionSpec is, spelled out by hand per name."""
  logical = {
      'embedding': ('vocab', 'embed'), 'pos_embedding': (None, 'embed'), 'lm_head': ('embed', 'vocab'),
      'qkv': ('embed', 'heads', None, 'kv'), 'qkv_bias': ('heads', None, 'kv'),
      'out': ('heads', 'kv', 'embed'), 'wo': ('mlp', 'embed'),
      'wi': ('embed', 'mlp') if ndim == 2 else ('embed', None, 'mlp'),
  }.get(path[-1], ('mlp',) if path[-1] == 'wi_bias' else ('embed',))
  to_mesh = {'embed': 'fsdp', 'mlp': 'tensor', 'heads': 'tensor', 'vocab': 'tensor', 'kv': None, None: None}
  sizes = dict(zip(('data', 'fsdp', 'tensor'), mesh_shape))
  # An axis of size 1 is equivalent to no sharding; compare on the effective layout.
  return tuple(to_mesh[n] if to_mesh[n] and sizes[to_mesh[n]] > 1 else None for n in logical)


def _effective(spec, ndim, mesh):
  out = []
  for entry in tuple(spec) + (None,) * (ndim - len(spec)):
    names = (entry,) if isinstance(entry, str) else tuple(entry or ())
    names = tuple(n for n in names if mesh.shape[n] > 1)
    out.append(names[0] if len(names) == 1 else (names or None))
  return tuple(out)


@pytest.mark.parametrize('style,shape', [('gpt2', s) for s in MESHES] + [('llama', (2, 2, 2))],
                         ids=lambda v: v if isinstance(v, str) else 'x'.join(map(str, v)))
def test_same_numbers_on_every_mesh(style, shape):
  mesh = sharding.make_mesh(*shape, devices=jax.devices()[:int(np.prod(shape))])
  model = M.Transformer(CFGS[style])

  def init(key):  # optax maps over the boxed parameters, so its state carries their axis names
    params = model.init(key, jnp.zeros((1, T), jnp.int32))['params']
    return params, TX.init(params)

  (params, opt_state), (p_sh, opt_sh) = sharding.init_sharded(init, mesh, jax.random.key(0))

  # The layout is the rules table's, shard shapes included.
  for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    names = tuple(k.key for k in path)
    want = _expected_spec(names, x.ndim, shape)
    assert _effective(x.sharding.spec, x.ndim, mesh) == want, (names, x.sharding.spec, want)
    split = [mesh.shape[a] if a else 1 for a in want]
    assert x.addressable_shards[0].data.shape == tuple(d // s for d, s in zip(x.shape, split)), names

  trace = opt_state[0].trace
  jax.tree.map(lambda m, x: assert_same(m.sharding, x.sharding, x.ndim), trace, params)  # momentum too
  batch = sharding.shard_batch(_batch(), mesh)
  assert batch['tokens'].sharding.spec == P(('data', 'fsdp'), None)
  step = jax.jit(sharding.under_rules(functools.partial(_step, model=model, tx=TX), mesh),
                 in_shardings=(p_sh, opt_sh, sharding.batch_sharding(mesh)),
                 out_shardings=(p_sh, opt_sh, sharding.replicated(mesh), None), donate_argnums=(0, 1))
  new_params, _, loss, logits = step(params, opt_state, batch)

  ref_params, _, ref_loss, ref_logits = _reference(style)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(logits, ref_logits, rtol=1e-4, atol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), jax.device_get(new_params),
               ref_params)
  # Updated parameters keep their layout (out_shardings) and logits are batch-sharded.
  jax.tree.map(lambda x, s: assert_same(x.sharding, s, x.ndim), new_params, p_sh)
  if mesh.shape['data'] * mesh.shape['fsdp'] > 1:
    assert logits.sharding.spec[0] is not None


def assert_same(a, b, ndim):
  assert a.is_equivalent_to(b, ndim), (a, b)


def test_mesh_shape_resolves_and_rejects():
  assert sharding.mesh_shape(-1, 2, 2, n_devices=8) == (2, 2, 2)
  assert sharding.mesh_shape(1, -1, 1, n_devices=8) == (1, 8, 1)
  with pytest.raises(ValueError, match='at most one'):
    sharding.mesh_shape(-1, -1, 1, n_devices=8)
  with pytest.raises(ValueError, match='does not fit'):
    sharding.mesh_shape(-1, 3, 1, n_devices=8)
  with pytest.raises(ValueError, match='uses 4 devices'):
    sharding.mesh_shape(2, 2, 1, n_devices=8)


def test_batch_must_divide_the_mesh():
  mesh = sharding.make_mesh(2, 2, 2)
  sharding.check_batch(8, mesh)
  with pytest.raises(ValueError, match='batch_size=6 is not divisible by mesh data\\*fsdp=4'):
    sharding.check_batch(6, mesh)
