"""Model: NumPy reference forward, padding invariance, KV cache, heads, dtypes, remat, axis names."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import model as M

TINY = dict(vocab_size=64, d_model=32, n_layer=2, n_head=4, d_ff=48, max_len=32)
STYLES = {
    'gpt2': M.ModelConfig(**TINY, style='gpt2', scalar_head=True),
    'llama': M.ModelConfig(**TINY, style='llama', n_kv_head=2, scalar_head=True),
}


@pytest.fixture(scope='module', params=sorted(STYLES))
def setup(request):
  cfg = STYLES[request.param]
  model = M.Transformer(cfg)
  params = jax.jit(lambda k: nn.meta.unbox(model.init(k, jnp.zeros((1, 4), jnp.int32))))(jax.random.key(0))['params']
  # Perturb every parameter so biases, norms and heads are not at their trivial init.
  params = jax.jit(perturb)(params, jax.random.key(1))
  fwd = jax.jit(lambda p, t, pos, m: model.apply({'params': p}, t, pos, m))
  return cfg, model, params, fwd


def perturb(params, key, scale=0.1):
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(tree, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


# ---------------------------------------------------------------- slow NumPy reference, per sequence
def _np(x):
  return np.asarray(x, np.float64)


def ref_forward(cfg, params, tokens):
  """Unpadded single sequence [T] -> (logits [T, V], scores [T]); written from the formulas."""
  p = jax.tree.map(_np, params)
  T, D, H = len(tokens), cfg.d_model, cfg.n_head
  Hkv, Dh = cfg.kv_heads, D // H
  G = H // Hkv

  def norm(x, q):
    if cfg.style == 'gpt2':
      mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
      return (x - mu) / np.sqrt(var + cfg.norm_eps) * q['scale'] + q['bias']
    return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + cfg.norm_eps) * q['scale']

  def rope(x):  # x [T, Dh] at positions 0..T-1
    half = Dh // 2
    out = np.empty_like(x)
    for t in range(T):
      for i in range(half):
        ang = t * cfg.rope_theta ** (-i / half)
        a, b = x[t, i], x[t, i + half]
        out[t, i], out[t, i + half] = a * np.cos(ang) - b * np.sin(ang), b * np.cos(ang) + a * np.sin(ang)
    return out

  x = p['embedding'][tokens]
  if cfg.style == 'gpt2':
    x = x + p['pos_embedding'][:T]
  for i in range(cfg.n_layer):
    b = p[f'block_{i}']
    a = b['attn']
    hn = norm(x, b['norm1'])
    w = a['qkv']                                   # [D, Hkv, G+2, Dh]
    heads = []
    for h in range(H):
      kv = h // G                                  # query head h reads KV head h // G
      q = hn @ w[:, kv, h % G] + (a['qkv_bias'][kv, h % G] if cfg.use_bias else 0)
      k = hn @ w[:, kv, G] + (a['qkv_bias'][kv, G] if cfg.use_bias else 0)
      v = hn @ w[:, kv, G + 1] + (a['qkv_bias'][kv, G + 1] if cfg.use_bias else 0)
      if cfg.style == 'llama':
        q, k = rope(q), rope(k)
      s = q @ k.T / np.sqrt(Dh)
      s = np.where(np.tril(np.ones((T, T))) > 0, s, -np.inf)
      s = np.exp(s - s.max(-1, keepdims=True))
      heads.append((s / s.sum(-1, keepdims=True)) @ v)
    att = sum(heads[h] @ a['out'][h] for h in range(H)) + (a['out_bias'] if cfg.use_bias else 0)
    x = x + att
    hn = norm(x, b['norm2'])
    m = b['mlp']
    if cfg.style == 'gpt2':
      u = hn @ m['wi'] + m['wi_bias']
      u = 0.5 * u * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u ** 3)))
      x = x + u @ m['wo'] + m['wo_bias']
    else:
      g, u = hn @ m['wi'][:, 0], hn @ m['wi'][:, 1]
      x = x + (g / (1 + np.exp(-g)) * u) @ m['wo']
  h = norm(x, p['final_norm'])
  logits = h @ (p['embedding'].T if cfg.tied else p['lm_head'])
  return logits, h @ p['score_head']


def test_forward_matches_numpy_reference(setup):
  cfg, _, params, fwd = setup
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 9))
  mask = np.ones_like(tokens)
  out = fwd(params, tokens, M.default_positions(jnp.asarray(mask)), mask)
  for b in range(2):
    logits, scores = ref_forward(cfg, params, tokens[b])
    np.testing.assert_allclose(out['logits'][b], logits, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(out['scores'][b], scores, atol=1e-4, rtol=1e-4)


def _padded(seqs, length, left, pad=0):
  toks = np.full((len(seqs), length), pad)
  mask = np.zeros((len(seqs), length), np.int32)
  for i, s in enumerate(seqs):
    sl = slice(length - len(s), length) if left else slice(0, len(s))
    toks[i, sl], mask[i, sl] = s, 1
  return toks, mask


@pytest.mark.parametrize('left', [True, False], ids=['left', 'right'])
def test_padding_invariance(setup, left):
  cfg, _, params, fwd = setup
  rng = np.random.default_rng(1)
  seqs = [rng.integers(1, cfg.vocab_size, size=n) for n in (3, 7, 10)]
  toks, mask = _padded(seqs, 12, left, pad=5)
  out = fwd(params, toks, M.default_positions(jnp.asarray(mask)), mask)
  for i, s in enumerate(seqs):
    one = fwd(params, s[None], jnp.arange(len(s))[None], np.ones((1, len(s))))
    real = mask[i].astype(bool)
    np.testing.assert_allclose(out['logits'][i][real], one['logits'][0], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(out['scores'][i][real], one['scores'][0], atol=1e-4, rtol=1e-4)


def test_kv_cache_decode_matches_full_forward(setup):
  """Prefill left-padded prompts into a cache, then feed the continuation one token at a time:
  each step's logits equal the full forward's at that position."""
  cfg, model, params, fwd = setup
  rng = np.random.default_rng(2)
  prompts = [rng.integers(1, cfg.vocab_size, size=n) for n in (2, 6, 5)]
  cont = rng.integers(1, cfg.vocab_size, size=(3, 7))
  P, N = 6, cont.shape[1]
  ptoks, pmask = _padded(prompts, P, left=True)
  full_toks = np.concatenate([ptoks, cont], 1)
  full_mask = np.concatenate([pmask, np.ones_like(cont)], 1)
  full = fwd(params, full_toks, M.default_positions(jnp.asarray(full_mask)), full_mask)['logits']

  trunk = jax.jit(lambda p, t, pos, m, c: model.apply({'params': p}, t, pos, m, cache=c, method='trunk'))
  head = jax.jit(lambda p, h: model.apply({'params': p}, h, method='logits'))
  cache = M.init_cache(cfg, 3, P + N)
  h, cache = trunk(params, ptoks, M.default_positions(jnp.asarray(pmask)), pmask, cache)
  np.testing.assert_allclose(head(params, h[:, -1]), full[:, P - 1], atol=1e-4, rtol=1e-4)
  # The sampler's prefill (no cache in, a cache of P + N slots out) builds the same cache.
  _, built = jax.jit(lambda p, t, pos, m: model.apply({'params': p}, t, pos, m, cache_length=P + N,
                                                      method='trunk'))(params, ptoks, None, pmask)
  np.testing.assert_array_equal(built['mask'], cache['mask'])
  assert int(built['index']) == int(cache['index']) == P
  real = np.asarray(cache['mask'], bool)               # padding slots hold masked-out garbage
  for a, b in zip(jax.tree.leaves(built['layers']), jax.tree.leaves(cache['layers'])):
    np.testing.assert_allclose(np.moveaxis(np.asarray(a), 2, 1)[real], np.moveaxis(np.asarray(b), 2, 1)[real],
                               atol=1e-5)
  pos = pmask.sum(1)
  for i in range(N - 1):
    h, cache = trunk(params, cont[:, i:i + 1], (pos + i)[:, None], np.ones((3, 1)), cache)
    np.testing.assert_allclose(head(params, h[:, 0]), full[:, P + i], atol=1e-4, rtol=1e-4)
  assert int(cache['index']) == P + N - 1


def test_scalar_head_at_any_position(setup):
  cfg, model, params, fwd = setup
  toks = np.random.default_rng(3).integers(0, cfg.vocab_size, size=(2, 8))
  full = fwd(params, toks, None, None)['scores']
  idx = jnp.array([3, 7])

  @jax.jit
  def at(params):
    h, _ = model.apply({'params': params}, toks, method='trunk')
    return model.apply({'params': params}, h[jnp.arange(2), idx], method='score')
  np.testing.assert_allclose(at(params), full[jnp.arange(2), idx], atol=1e-5)


def test_read_at_equals_full_forward_at_that_position(setup):
  """Reading one position per row (the last real token of right-padded rows) gives the full
  forward's hidden state there, although the last block only runs at that position."""
  cfg, model, params, fwd = setup
  rng = np.random.default_rng(4)
  toks, mask = _padded([rng.integers(1, cfg.vocab_size, size=n) for n in (3, 9, 6)], 10, left=False)
  last = mask.sum(1) - 1
  full = fwd(params, toks, None, mask)

  @jax.jit
  def read(params):
    h, _ = model.apply({'params': params}, toks, mask=mask, read_at=jnp.asarray(last), method='trunk')
    return model.apply({'params': params}, h, method='logits'), model.apply({'params': params}, h, method='score')

  logits, scores = read(params)
  np.testing.assert_allclose(logits, full['logits'][np.arange(3), last], atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(scores, full['scores'][np.arange(3), last], atol=1e-4, rtol=1e-4)


def test_read_from_equals_full_forward_there_with_gradients(setup):
  """Reading positions 6 .. T - 1 of left-padded rows (a policy's response positions) gives the full
  forward's logits there, and a loss on them the same parameter gradient, although the last block
  runs at those positions only."""
  cfg, model, params, _ = setup
  rng = np.random.default_rng(6)
  toks, mask = _padded([rng.integers(1, cfg.vocab_size, size=n) for n in (4, 10, 7)], 10, left=True)
  start = 6
  w = jnp.asarray(rng.normal(size=(3, 10 - start, cfg.vocab_size)), jnp.float32)

  def loss(params, read_from):
    h, _ = model.apply({'params': params}, toks, mask=mask, read_from=read_from, method='trunk')
    logits = model.apply({'params': params}, h[:, -(10 - start):], method='logits')
    return jnp.sum(logits * w), logits

  (l_full, logits_full), g_full = jax.jit(jax.value_and_grad(lambda p: loss(p, None), has_aux=True))(params)
  (l_read, logits_read), g_read = jax.jit(jax.value_and_grad(lambda p: loss(p, start), has_aux=True))(params)
  assert logits_read.shape == (3, 10 - start, cfg.vocab_size)
  np.testing.assert_allclose(logits_read, logits_full, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(l_read, l_full, rtol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-3), g_read, g_full)


def test_packed_documents_never_attend_across(setup):
  """Two documents packed in one row (segments, positions restarting) give each document's own
  unpacked outputs: attention never crosses the boundary."""
  cfg, _, params, fwd = setup
  rng = np.random.default_rng(5)
  a, b = rng.integers(1, cfg.vocab_size, size=5), rng.integers(1, cfg.vocab_size, size=6)
  toks = np.concatenate([a, b, [0]])[None]                       # one pad slot at the end
  segs = np.array([[1] * 5 + [2] * 6 + [0]])
  pos = np.array([list(range(5)) + list(range(6)) + [0]])
  mask = (segs > 0).astype(np.int32)
  packed = jax.jit(lambda p: M.Transformer(cfg).apply({'params': p}, toks, pos, mask, segments=segs))(params)
  for doc, sl in ((a, slice(0, 5)), (b, slice(5, 11))):
    alone = fwd(params, doc[None], jnp.arange(len(doc))[None], np.ones((1, len(doc))))
    np.testing.assert_allclose(packed['logits'][0, sl], alone['logits'][0], atol=1e-4, rtol=1e-4)


def test_causal_query_blocks_equal_one_block(setup, monkeypatch):
  """Causal self-attention split into query blocks, each attending only to the keys up to its end,
  gives the NumPy reference's outputs, and the outputs and parameter gradients of one T x T block on
  left-padded and packed rows, with and without read_from."""
  cfg, _, params, _ = setup
  monkeypatch.setattr(M, 'MIN_QUERY_BLOCK', 2)
  assert M.query_blocks(10, 4) == [(0, 2), (2, 5), (5, 7), (7, 10)]
  assert M.query_blocks(3, 4) == [(0, 3)]
  one, four = (M.Transformer(cfg.replace(attention_blocks=n)) for n in (1, 4))
  rng = np.random.default_rng(7)
  tokens = rng.integers(0, cfg.vocab_size, size=(2, 11))
  out = jax.jit(lambda p: four.apply({'params': p}, tokens))(params)
  for b in range(2):
    logits, scores = ref_forward(cfg, params, tokens[b])
    np.testing.assert_allclose(out['logits'][b], logits, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(out['scores'][b], scores, atol=1e-4, rtol=1e-4)
  # Row 0: two packed documents; rows 1 and 2: left-padded.
  toks, mask = _padded([rng.integers(1, cfg.vocab_size, size=n) for n in (12, 5, 9)], 12, left=True)
  segs = mask.copy()
  segs[0, 7:] = 2
  pos = np.where(segs == 2, np.arange(12) - 7, np.asarray(M.default_positions(jnp.asarray(mask))))
  w = jnp.asarray(rng.normal(size=(3, 12, cfg.vocab_size)), jnp.float32)

  def loss(model, p, read_from):
    h, _ = model.apply({'params': p}, toks, pos, mask, segments=segs, read_from=read_from, method='trunk')
    n = h.shape[1]
    logits = model.apply({'params': p}, h, method='logits')
    return jnp.sum(logits * w[:, -n:] * mask[:, -n:, None]), logits

  for read_from in (None, 3):
    (l1, x1), g1 = jax.jit(jax.value_and_grad(lambda p: loss(one, p, read_from), has_aux=True))(params)
    (l4, x4), g4 = jax.jit(jax.value_and_grad(lambda p: loss(four, p, read_from), has_aux=True))(params)
    real = np.asarray(mask[:, -x1.shape[1]:], bool)
    np.testing.assert_allclose(np.asarray(x4)[real], np.asarray(x1)[real], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(l4, l1, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), g4, g1)


def test_every_parameter_has_logical_axis_names():
  for cfg in STYLES.values():
    boxed = jax.eval_shape(M.Transformer(cfg).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    leaves = jax.tree.leaves(boxed['params'], is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves
    for leaf in leaves:
      assert isinstance(leaf, nn.LogicallyPartitioned), leaf
      assert len(leaf.names) == leaf.value.ndim
      assert set(leaf.names) <= {None, 'vocab', 'embed', 'mlp', 'heads', 'kv'}


def test_bf16_compute_with_f32_params():
  cfg = STYLES['llama'].replace(dtype='bfloat16')
  model = M.Transformer(cfg)
  tokens = jnp.arange(8)[None] % cfg.vocab_size
  params = jax.jit(lambda k: nn.meta.unbox(model.init(k, tokens)))(jax.random.key(0))['params']
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  jaxpr = str(jax.make_jaxpr(lambda p: model.apply({'params': p}, tokens))(params))
  assert 'bf16' in jaxpr  # the matmuls run in bfloat16
  out = jax.jit(lambda p: model.apply({'params': p}, tokens))(params)
  assert out['logits'].dtype == jnp.float32
  ref = jax.jit(lambda p: M.Transformer(cfg.replace(dtype='float32')).apply({'params': p}, tokens))(params)
  np.testing.assert_allclose(out['logits'], ref['logits'], atol=0.05)


@pytest.mark.parametrize('remat', ['full', 'dots'])
def test_remat_gives_same_gradients(remat):
  cfg = STYLES['gpt2']
  tokens = jnp.arange(16).reshape(2, 8) % cfg.vocab_size

  @jax.jit
  def grads(key):
    params = nn.meta.unbox(M.Transformer(cfg).init(key, tokens))['params']
    loss = lambda p, c: jnp.mean(M.Transformer(c).apply({'params': p}, tokens)['logits'] ** 2)  # noqa: E731
    return jax.grad(loss)(params, cfg), jax.grad(loss)(params, cfg.replace(remat=remat))

  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), *grads(jax.random.key(0)))


def test_dropout_is_residual_and_keyed():
  cfg = STYLES['gpt2'].replace(dropout=0.5)
  model = M.Transformer(cfg)
  tokens = jnp.arange(8)[None]
  params = jax.jit(lambda k: nn.meta.unbox(model.init(k, tokens)))(jax.random.key(0))['params']
  run = jax.jit(lambda k, train: model.apply({'params': params}, tokens, train=train, rngs={'dropout': k})['logits'],
                static_argnums=1)
  np.testing.assert_array_equal(run(jax.random.key(1), True), run(jax.random.key(1), True))
  assert not np.allclose(run(jax.random.key(1), True), run(jax.random.key(2), True))
  np.testing.assert_array_equal(run(jax.random.key(1), False), run(jax.random.key(2), False))


def _closed_form_params(cfg):
  D, F, V, L = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.n_layer
  Hkv, Dh = cfg.kv_heads, cfg.head_dim
  attn = D * (cfg.n_head + 2 * Hkv) * Dh + cfg.n_head * Dh * D
  if cfg.style == 'gpt2':
    block = attn + (cfg.n_head + 2 * Hkv) * Dh + D + 2 * D * F + F + D + 4 * D
    return L * block + V * D + cfg.max_len * D + 2 * D
  block = attn + 3 * D * F + 2 * D
  return L * block + V * D + D + (0 if cfg.tied else D * V)


@pytest.mark.parametrize('cfg', [
    M.ModelConfig(vocab_size=50257, d_model=2048, n_layer=24, n_head=16, d_ff=8192, max_len=2048),   # 1.3B
    M.ModelConfig(vocab_size=50257, d_model=4096, n_layer=32, n_head=32, d_ff=16384, max_len=2048),  # 6.7B
    M.ModelConfig(vocab_size=32000, d_model=4096, n_layer=32, n_head=32, n_kv_head=8, d_ff=11008,
                  style='llama'),
], ids=['gpt2-1.3b', 'gpt2-6.7b', 'llama-7b-gqa'])
def test_full_size_shapes(cfg):
  """Full-size models build abstractly (eval_shape, nothing allocated) with the closed-form count."""
  tokens = jax.ShapeDtypeStruct((2, 16), jnp.int32)
  boxed = jax.eval_shape(M.Transformer(cfg).init, jax.random.key(0), tokens)
  assert M.count_params(nn.meta.unbox(boxed)) == _closed_form_params(cfg)
  out = jax.eval_shape(lambda v, t: M.Transformer(cfg).apply(nn.meta.unbox(v), t), boxed, tokens)
  assert out['logits'].shape == (2, 16, cfg.vocab_size)


def test_model_config_rejects_unknown_keys():
  with pytest.raises(ValueError, match='d_modle'):
    M.ModelConfig.from_dict({'d_modle': 3})
  with pytest.raises(ValueError, match='n_kv_head'):
    M.ModelConfig(d_model=32, n_head=4, n_kv_head=3)


def test_softmax_values_and_gradient_equal_autodiff():
  """The attention softmax's closed-form gradient equals JAX's autodiff of the plain softmax,
  rows with masked (-1e30) logits included; masked entries get probability and gradient 0."""
  rng = np.random.default_rng(8)
  x = rng.normal(size=(3, 4, 7)).astype(np.float32) * 3
  x[0, 1, 4:] = -1e30
  x, w = jnp.asarray(x), jnp.asarray(rng.normal(size=(3, 4, 7)), jnp.float32)

  def plain(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)
  np.testing.assert_allclose(M.softmax(x), plain(np.asarray(x, np.float64)), rtol=1e-5, atol=1e-7)
  assert float(M.softmax(x)[0, 1, 4:].max()) == 0.0
  ours = jax.grad(lambda x: jnp.sum(M.softmax(x) ** 2 * w))(x)
  ref = jax.grad(lambda x: jnp.sum(jax.nn.softmax(x) ** 2 * w))(x)
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(ours[0, 1, 4:]).max()) == 0.0


@pytest.mark.parametrize('lead', [(2, 5), (3, M.FEW_ROWS // 3 + 1)])  # the few-rows form, the plain einsum
def test_tied_logits_gradient_equals_autodiff(lead):
  """The tied head's values and hand-written gradient equal the plain einsum's and JAX's gradient
  of it, for few rows (the embedding-on-the-left product) and many."""
  rng = np.random.default_rng(6)
  h = jnp.asarray(rng.normal(size=lead + (8,)), jnp.float32)
  emb = jnp.asarray(rng.normal(size=(11, 8)), jnp.float32)
  w = jnp.asarray(rng.normal(size=lead + (11,)), jnp.float32)
  np.testing.assert_allclose(jax.jit(M.tied_logits)(h, emb), np.einsum('btd,vd->btv', h, emb), rtol=1e-5, atol=1e-5)
  plain = lambda h, e: jnp.sum(jnp.einsum('btd,vd->btv', h, e) ** 2 * w)  # noqa: E731
  custom = lambda h, e: jnp.sum(M.tied_logits(h, e) ** 2 * w)            # noqa: E731
  np.testing.assert_allclose(custom(h, emb), plain(h, emb), rtol=1e-6)
  for a, b in zip(jax.grad(custom, (0, 1))(h, emb), jax.grad(plain, (0, 1))(h, emb)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('x_shape,w_shape,n_in', [
    ((2, 5, 8), (8, 3, 4), 1),      # K = 8 <= M = 12: the input is transposed
    ((2, 5, 8), (8, 2), 1),         # K = 8 > M = 2: the output gradient is transposed
    ((2, 5, 4, 3), (4, 3, 6), 2),   # two contracted axes (the attention output projection)
])
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_dense_values_and_gradients_equal_einsum(x_shape, w_shape, n_in, dtype):
  """`dense` (custom weight gradient) gives the einsum's values and JAX's gradients of the einsum."""
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.normal(size=x_shape), dtype)
  w = jnp.asarray(rng.normal(size=w_shape), dtype)
  letters = 'abcdefgh'
  xs = letters[:len(x_shape)]
  ws = xs[len(x_shape) - n_in:] + letters[len(x_shape):len(x_shape) + len(w_shape) - n_in]
  spec = f'{xs},{ws}->{xs[:len(x_shape) - n_in]}{ws[n_in:]}'
  c = jnp.asarray(rng.normal(size=jnp.einsum(spec, x, w).shape), jnp.float32)
  plain = lambda x, w: jnp.sum(jnp.einsum(spec, x, w).astype(jnp.float32) ** 2 * c)  # noqa: E731
  custom = lambda x, w: jnp.sum(M.dense(x, w, n_in).astype(jnp.float32) ** 2 * c)  # noqa: E731
  # bf16: one rounding of the output (2^-8 relative) on values whose f32 sums may be ordered differently
  tol = (lambda r: dict(rtol=1e-5, atol=1e-5)) if dtype == jnp.float32 else (
      lambda r: dict(rtol=2 ** -7, atol=2 ** -7 * float(jnp.abs(r.astype(jnp.float32)).max())))
  ref = jnp.einsum(spec, x, w)
  assert M.dense(x, w, n_in).dtype == dtype
  np.testing.assert_allclose(M.dense(x, w, n_in).astype(jnp.float32), ref.astype(jnp.float32),
                             **tol(ref))
  for a, b in zip(jax.grad(custom, (0, 1))(x, w), jax.grad(plain, (0, 1))(x, w)):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_allclose(a.astype(jnp.float32), b.astype(jnp.float32), **tol(b))
