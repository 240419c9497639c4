"""Decoder-only Transformer LM with an optional scalar head, in Flax Linen.

One module covers the policy, the reference, the reward model and the value model:
  * style 'gpt2': LayerNorm, learned positions, tanh-GELU MLP, tied embeddings, biases;
  * style 'llama': RMSNorm, rotary positions, SwiGLU MLP, grouped-query attention, untied head,
    no biases.

Every call takes tokens, a padding mask and position ids, so a left- or right-padded batch gives
the same outputs at its real tokens as the unpadded sequences do. Attention is expressed over
cache *slots*: without a cache slot t holds token t; with a cache (sampling) new tokens are written
at `cache['index']` and attend to every earlier real slot. Parameters and key activations carry
logical axis names (`batch`, `length`, `embed`, `mlp`, `heads`, `kv`, `vocab`), mapped to mesh
axes by `rlhf_jax.sharding.RULES`.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
_NEG = -1e30  # masked attention logit; finite so a row with no visible key stays finite


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and numerics of one Transformer. Hashable, so it can be a static jit argument."""
  vocab_size: int = 8192
  d_model: int = 256
  n_layer: int = 4
  n_head: int = 4
  n_kv_head: int | None = None   # None: = n_head (multi-head); fewer: grouped-query attention
  d_ff: int = 1024
  max_len: int = 256             # learned positions (gpt2); rotary positions have no limit
  style: str = 'gpt2'            # 'gpt2' | 'llama'
  tie_embeddings: bool | None = None  # None: tied for gpt2, untied for llama
  norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  dropout: float = 0.0           # residual and embedding dropout (InstructGPT SFT: 0.2)
  dtype: str = 'float32'         # compute dtype ('bfloat16' on accelerators)
  param_dtype: str = 'float32'
  remat: str = 'none'            # 'none' | 'full' | 'dots' (keep matmul outputs, recompute the rest)
  init_std: float = 0.02
  lm_head: bool = True           # logits over the vocabulary
  scalar_head: bool = False      # one scalar per position (reward / value models)
  # Causal self-attention over T queries runs as up to this many query blocks (of at least
  # MIN_QUERY_BLOCK), each attending only to the keys up to its end: the masked upper triangle
  # is mostly never computed (4 blocks: 62.5 % of the full T x T logits). 1 = one T x T block.
  attention_blocks: int = 4

  def __post_init__(self):
    if self.style not in ('gpt2', 'llama'):
      raise ValueError(f"model.style must be 'gpt2' or 'llama', got {self.style!r}")
    if self.d_model % self.n_head:
      raise ValueError(f'model.d_model={self.d_model} is not divisible by model.n_head={self.n_head}')
    if self.n_head % self.kv_heads:
      raise ValueError(f'model.n_head={self.n_head} is not divisible by model.n_kv_head={self.n_kv_head}')
    if self.remat not in ('none', 'full', 'dots'):
      raise ValueError(f"model.remat must be 'none', 'full' or 'dots', got {self.remat!r}")
    if self.style == 'llama' and (self.d_model // self.n_head) % 2:
      raise ValueError('rotary positions need an even head dimension (model.d_model / model.n_head)')
    if self.attention_blocks < 1:
      raise ValueError(f'model.attention_blocks must be >= 1, got {self.attention_blocks}')
    if not (self.lm_head or self.scalar_head):
      raise ValueError('model.lm_head and model.scalar_head are both False: the model has no output')

  @property
  def kv_heads(self) -> int:
    return self.n_kv_head or self.n_head

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_head

  @property
  def tied(self) -> bool:
    return self.style == 'gpt2' if self.tie_embeddings is None else self.tie_embeddings

  @property
  def use_bias(self) -> bool:
    return self.style == 'gpt2'

  @classmethod
  def from_dict(cls, d) -> 'ModelConfig':
    """From a mapping (e.g. an ml_collections `config.model`); unknown keys fail by name."""
    d = dict(d)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f'unknown model config key(s) {unknown}; valid keys: {sorted(known)}')
    return cls(**d)

  def replace(self, **kw) -> 'ModelConfig':
    return dataclasses.replace(self, **kw)


def _param(module, name, names, shape, init, dtype):
  return module.param(name, nn.with_logical_partitioning(init, names), shape, dtype)


def _constrain(x, names):
  return nn.with_logical_constraint(x, names)


class Norm(nn.Module):
  """LayerNorm (gpt2) or RMSNorm (llama), computed in float32."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    pdt = jnp.dtype(cfg.param_dtype)
    scale = _param(self, 'scale', ('embed',), (cfg.d_model,), nn.initializers.ones, pdt)
    x32 = x.astype(jnp.float32)
    if cfg.style == 'gpt2':
      bias = _param(self, 'bias', ('embed',), (cfg.d_model,), nn.initializers.zeros, pdt)
      mean = x32.mean(-1, keepdims=True)
      var = jnp.square(x32 - mean).mean(-1, keepdims=True)
      y = (x32 - mean) * jax.lax.rsqrt(var + cfg.norm_eps) * scale + bias
    else:
      y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + cfg.norm_eps) * scale
    return y.astype(cfg.dtype)


def rotary(x, positions, theta):
  """Rotary embedding (rotate-half convention) of x [B, T, ..., Dh] at positions [B, T]."""
  half = x.shape[-1] // 2
  freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)            # [Dh/2]
  angles = positions.astype(jnp.float32)[..., None] * freqs                # [B, T, Dh/2]
  angles = angles.reshape(angles.shape[:2] + (1,) * (x.ndim - 3) + (half,))
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


def read_rows(a, read_at=None, read_from=None):
  """a [B, T, ...] at the positions a last block reads: [B, 1, ...] at read_at [B] (one position per
  row), [B, J, ...] at read_at [B, J] (J per row: packed rows), [B, T - read_from, ...] from the
  static int read_from on, or all of a."""
  if read_at is not None:
    at = read_at.reshape(read_at.shape[:1] + (-1,))                           # [B, J]
    return jnp.take_along_axis(a, at.reshape(at.shape + (1,) * (a.ndim - 2)), axis=1)
  return a if read_from is None else a[:, read_from:]


def _contract(x, w, n_in: int):
  """x [..., *I] times w [*I, *O] over the I axes -> [..., *O] (one einsum)."""
  a = 'abcdefghijklmnopqrstuvwxyz'
  xs, ws = a[:x.ndim], a[x.ndim - n_in:x.ndim + w.ndim - n_in]
  return jnp.einsum(f'{xs},{ws}->{xs[:x.ndim - n_in]}{ws[n_in:]}', x, w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def dense(x, w, n_in: int = 1):
  """x [..., *I] times w [*I, *O] over the I axes (the last n_in of x, the first n_in of w) -> [..., *O].

  The einsum, with a hand-written gradient. Autodiff of the einsum lets XLA's CPU backend
  transpose the output gradient before the weight-gradient matmul. For the MLP's first layer that
  gradient is [tokens, d_ff], 4x the size of the input; for the QKV projection it is 3x. Here the
  weight gradient is one 2-D matmul over all tokens, and whichever of the input and the output
  gradient is smaller is the one transposed: on an Intel Xeon host the SFT benchmark step runs
  1.08-1.10x and the RM step 1.16-1.19x faster (`bench/ab_dense.py`). The backward pass merges the I axes and the O axes of w; a
  sharded axis must lead its group, as the model's do, for that reshape to stay free under GSPMD.
  """
  return _contract(x, w, n_in)


def _dense_fwd(x, w, n_in):
  return _contract(x, w, n_in), (x, w)


def _dense_bwd(n_in, res, g):
  x, w = res
  k = math.prod(w.shape[:n_in])
  x2, w2 = x.reshape(-1, k), w.reshape(k, -1)                       # [N, K], [K, M]
  g2 = g.astype(x.dtype).reshape(x2.shape[0], w2.shape[1])          # [N, M]
  dw = x2.T @ g2 if x2.shape[1] <= g2.shape[1] else (g2.T @ x2).T
  return (g2 @ w2.T).reshape(x.shape), dw.reshape(w.shape).astype(w.dtype)


dense.defvjp(_dense_fwd, _dense_bwd)


# Query blocks of causal self-attention are at least this long (see ModelConfig.attention_blocks).
MIN_QUERY_BLOCK = 64


def query_blocks(T: int, n_max: int) -> list[tuple[int, int]]:
  """[start, end) of at most n_max near-equal query blocks of at least MIN_QUERY_BLOCK, covering 0 .. T."""
  n = max(1, min(n_max, T // MIN_QUERY_BLOCK))
  return [(T * i // n, T * (i + 1) // n) for i in range(n)]


def _attend(q, k, v, bias):
  """softmax(q k^T + bias) v: q [B, T, Hkv, G, Dh] (scaled), k and v [B, Hkv, S, Dh], bias
  [B, T, S] -> [B, T, Hkv, G, Dh]; logits and softmax in float32."""
  logits = jnp.einsum('bthgk,bhsk->bhgts', q, k, preferred_element_type=jnp.float32)  # [B, Hkv, G, T, S]
  probs = softmax(logits + bias[:, None, None]).astype(v.dtype)
  return jnp.einsum('bhgts,bhsk->bthgk', probs, v)


class Attention(nn.Module):
  """Causal self-attention with grouped-query heads and an optional KV cache."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, positions, key_mask, query_slots, cache, read_at=None, segments=None, read_from=None):
    """Returns the output [B, T, D] and this layer's K/V [B, Hkv, S, Dh]: the updated cache, or
    without a cache the T new tokens' keys and values. With read_at [B], queries (and so the
    output, [B, 1, D]) are computed only at that position of each row; with read_from (a static
    int) only at positions read_from .. T - 1 (output [B, T - read_from, D]); keys/values at all."""
    cfg = self.cfg
    dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    D, H, Hkv, Dh = cfg.d_model, cfg.n_head, cfg.kv_heads, cfg.head_dim
    G = H // Hkv
    init = nn.initializers.normal(cfg.init_std)
    # One projection for Q, K and V: for each KV head, its G query heads then K then V. One
    # matmul for MHA and GQA alike, and sharding the KV-head axis keeps each group on one shard.
    w = _param(self, 'qkv', ('embed', 'heads', None, 'kv'), (D, Hkv, G + 2, Dh), init, pdt)
    qkv = dense(x, w.astype(dt))                                           # [B, T, Hkv, G+2, Dh]
    if cfg.use_bias:
      qkv += _param(self, 'qkv_bias', ('heads', None, 'kv'), (Hkv, G + 2, Dh),
                    nn.initializers.zeros, pdt).astype(dt)
    q, k, v = qkv[:, :, :, :G], qkv[:, :, :, G], qkv[:, :, :, G + 1]       # [B,T,Hkv,G,Dh], [B,T,Hkv,Dh]
    if cfg.style == 'llama':
      q, k = rotary(q, positions, cfg.rope_theta), rotary(k, positions, cfg.rope_theta)
    # K and V live as [B, Hkv, S, Dh], the layout the attention dots read: a decode step then
    # reads the cache in place instead of copying it into a transposed layout every step.
    k = _constrain(jnp.swapaxes(k, 1, 2), ('batch', 'heads', 'length', 'kv'))  # [B, Hkv, T, Dh]
    v = _constrain(jnp.swapaxes(v, 1, 2), ('batch', 'heads', 'length', 'kv'))
    if cache is not None:  # write the new keys/values at the cache index, attend to all slots
      start = (0, 0, cache['index'], 0)
      k = jax.lax.dynamic_update_slice(cache['k'], k.astype(cache['k'].dtype), start)  # [B, Hkv, S, Dh]
      v = jax.lax.dynamic_update_slice(cache['v'], v.astype(cache['v'].dtype), start)
    kv = {'k': k, 'v': v}
    k, v = k.astype(dt), v.astype(dt)
    q, query_slots = read_rows(q, read_at, read_from), read_rows(query_slots, read_at, read_from)
    S = k.shape[2]
    visible = (jnp.arange(S) <= query_slots[..., None]) & key_mask[:, None, :].astype(bool)  # [B, T, S]
    if segments is not None:  # packed rows: a token sees only its own document
      visible &= read_rows(segments, read_at, read_from)[:, :, None] == segments[:, None, :]
    # An additive mask rather than a select: its gradient needs no copy of the mask broadcast to
    # the logits' shape (masked probabilities are exactly 0, so their gradient is too).
    bias = jnp.where(visible, 0.0, _NEG)
    # The 1/sqrt(Dh) scale goes on q (half the size of the logits when T = S).
    q = q * jnp.asarray(Dh ** -0.5, q.dtype)
    # Query block [a, b) attends to keys 0 .. first + b - 1. Without a cache or read_at the layout is
    # causal (query i sits at slot first + i), so blocks skip most of the masked keys; otherwise one
    # block sees all S slots (full-extent slices cost nothing).
    T_q = q.shape[1]
    if cache is None and read_at is None:
      first, blocks = read_from or 0, query_blocks(T_q, cfg.attention_blocks)
    else:
      first, blocks = S - T_q, [(0, T_q)]
    out = jnp.concatenate([_attend(q[:, a:b], k[:, :, :first + b], v[:, :, :first + b], bias[:, a:b, :first + b])
                           for a, b in blocks], axis=1).reshape(q.shape[:2] + (H, Dh))   # [B, T, H, Dh]
    out = _constrain(out, ('batch', 'length', 'heads', 'kv'))
    wo_init = nn.initializers.normal(cfg.init_std / (2 * cfg.n_layer) ** 0.5)
    wo = _param(self, 'out', ('heads', 'kv', 'embed'), (H, Dh, D), wo_init, pdt)
    y = dense(out, wo.astype(dt), 2)                                       # [B, T, D]
    if cfg.use_bias:
      y += _param(self, 'out_bias', ('embed',), (D,), nn.initializers.zeros, pdt).astype(dt)
    return y, kv


class Mlp(nn.Module):
  """tanh-GELU MLP (gpt2) or SwiGLU (llama)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    D, F = cfg.d_model, cfg.d_ff
    init = nn.initializers.normal(cfg.init_std)
    if cfg.style == 'gpt2':
      wi = _param(self, 'wi', ('embed', 'mlp'), (D, F), init, pdt)
      h = dense(x, wi.astype(dt)) + _param(self, 'wi_bias', ('mlp',), (F,), nn.initializers.zeros, pdt).astype(dt)
      h = jax.nn.gelu(h, approximate=True)                                 # [B, T, F]
    else:
      wi = _param(self, 'wi', ('embed', None, 'mlp'), (D, 2, F), init, pdt)
      # An einsum, not `dense`: the sharded F axis does not lead the [2, F] output axes.
      gu = jnp.einsum('btd,dcf->btcf', x, wi.astype(dt))                   # [B, T, 2, F]
      h = jax.nn.silu(gu[:, :, 0]) * gu[:, :, 1]                           # [B, T, F]
    h = _constrain(h, ('batch', 'length', 'mlp'))
    wo_init = nn.initializers.normal(cfg.init_std / (2 * cfg.n_layer) ** 0.5)
    y = dense(h, _param(self, 'wo', ('mlp', 'embed'), (F, D), wo_init, pdt).astype(dt))  # [B, T, D]
    if cfg.use_bias:
      y += _param(self, 'wo_bias', ('embed',), (D,), nn.initializers.zeros, pdt).astype(dt)
    return y


class Block(nn.Module):
  """Pre-norm residual block: x += Attn(Norm(x)); x += Mlp(Norm(x)), with residual dropout."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, positions, key_mask, query_slots, cache, train, read_at=None, segments=None,
               read_from=None):
    drop = nn.Dropout(self.cfg.dropout, deterministic=not train)
    a, kv = Attention(self.cfg, name='attn')(Norm(self.cfg, name='norm1')(x), positions, key_mask,
                                             query_slots, cache, read_at, segments, read_from)
    x = read_rows(x, read_at, read_from)  # the residual stream continues only at the read positions
    x = _constrain(x + drop(a), ('batch', 'length', 'embed'))
    x = x + drop(Mlp(self.cfg, name='mlp')(Norm(self.cfg, name='norm2')(x)))
    return _constrain(x, ('batch', 'length', 'embed')), kv


# Up to this many rows (a decode step's batch), the tied head multiplies with the embedding on the left.
FEW_ROWS = 256


@jax.custom_vjp
def tied_logits(h, embedding):
  """h [..., D] @ embedding [V, D]^T -> float32 logits [..., V].

  Same values as the einsum; the custom gradient computes d(embedding) as (h^T @ dlogits)^T, so
  the transpose falls on the [D, V] result instead of on the [N, V] logit gradient (134 MB per
  step of the SFT benchmark, copied by XLA's CPU backend before the weight-gradient matmul).

  For at most FEW_ROWS rows (sampling) the product is computed as embedding @ h^T, the embedding
  as the left operand in the layout it is stored in, then transposed back ([V, n], small). XLA's
  CPU matmul otherwise repacks the whole [V, D] embedding as a right operand on every call: for a
  decode step of 16-32 rows that copy costs more than the arithmetic (the benchmark's GEN runs
  1.035x faster). Optimization barriers keep XLA from folding the transposes back into one dot.
  """
  rows = math.prod(h.shape[:-1])
  if rows > FEW_ROWS:
    return jnp.einsum('...d,vd->...v', h, embedding, preferred_element_type=jnp.float32)
  barrier = jax.lax.optimization_barrier
  h_t = barrier(h.reshape(rows, h.shape[-1]).T)                                        # [D, n]
  out = barrier(jnp.einsum('vd,dn->vn', embedding, h_t, preferred_element_type=jnp.float32))
  return out.T.reshape(h.shape[:-1] + embedding.shape[:1])


def _tied_logits_fwd(h, embedding):
  return tied_logits(h, embedding), (h, embedding)


def _tied_logits_bwd(res, g):
  h, embedding = res
  g = g.astype(h.dtype)
  dh = jnp.einsum('...v,vd->...d', g, embedding)
  d_emb = jnp.einsum('nd,nv->dv', h.reshape(-1, h.shape[-1]), g.reshape(-1, g.shape[-1])).T
  return dh, d_emb.astype(embedding.dtype)


tied_logits.defvjp(_tied_logits_fwd, _tied_logits_bwd)


@jax.custom_jvp
def softmax(x):
  """Softmax over the last axis, differentiated in closed form: dy = y * (dx - sum(y * dx)).

  Autodiff of the max / exp / sum / divide (what `jax.nn.softmax` differentiates by default) keeps
  the exponentials and the sums as well and runs a longer element-wise chain over the [B, H, T, S]
  attention weights; on XLA's CPU backend the SFT and RM benchmark steps run 1.06x faster with this
  (as a JVP rule; the same formula as a VJP rule gained 1.02x).
  """
  # Never differentiated (the rule below gives the tangent), so the max needs no stop_gradient.
  e = jnp.exp(x - jnp.max(x, axis=-1, keepdims=True))
  return e / jnp.sum(e, axis=-1, keepdims=True)


@softmax.defjvp
def _softmax_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  y = softmax(x)
  return y, y * (dx - jnp.sum(y * dx, axis=-1, keepdims=True))


def default_positions(mask):
  """Position ids of a padded batch: the count of real tokens before each one (0 on padding)."""
  return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


class Transformer(nn.Module):
  """The LM. `__call__` is the full forward; `trunk`, `logits` and `score` let callers read heads
  only where they need them (the last prompt position when sampling, the last real token of a
  reward model)."""
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    pdt = jnp.dtype(cfg.param_dtype)
    init = nn.initializers.normal(cfg.init_std)
    self.embedding = _param(self, 'embedding', ('vocab', 'embed'), (cfg.vocab_size, cfg.d_model), init, pdt)
    if cfg.style == 'gpt2':
      self.pos_embedding = _param(self, 'pos_embedding', (None, 'embed'), (cfg.max_len, cfg.d_model),
                                  nn.initializers.normal(0.01), pdt)
    block = Block
    if cfg.remat != 'none':
      policy = (jax.checkpoint_policies.dots_with_no_batch_dims_saveable if cfg.remat == 'dots'
                else jax.checkpoint_policies.nothing_saveable)
      block = nn.remat(Block, policy=policy, static_argnums=(6,))  # arg 6 (counting self) = train
    self.blocks = [block(cfg, name=f'block_{i}') for i in range(cfg.n_layer)]
    self.final_norm = Norm(cfg)
    if cfg.lm_head and not cfg.tied:
      self.lm_head = _param(self, 'lm_head', ('embed', 'vocab'), (cfg.d_model, cfg.vocab_size), init, pdt)
    if cfg.scalar_head:
      self.score_head = _param(self, 'score_head', ('embed',), (cfg.d_model,),
                               nn.initializers.normal(1 / (cfg.d_model + 1) ** 0.5), pdt)
    self.dropout = nn.Dropout(cfg.dropout)

  def trunk(self, tokens, positions=None, mask=None, *, segments=None, cache=None, cache_length=None,
            read_at=None, read_from=None, train=False):
    """Final-norm hidden states h [B, T, D] and a cache (None unless asked for).

    tokens, positions, mask: [B, T]. mask 1 marks a real token; positions default to the count of
    real tokens before each token. segments [B, T] (optional, packed rows): document ids; a token
    attends only within its own document (give positions restarting at 0 per document). With a cache (see `init_cache`) the T tokens go to slots
    cache['index'] .. cache['index'] + T - 1 and attend to every earlier slot. Without one, the
    tokens attend only to each other; `cache_length` then returns a cache of that many slots
    holding them (a prefill that never attends over the empty slots).

    read_at [B] (optional): return h [B, D] at that position of each row only (read_at [B, J]: h
    [B, J, D] at J positions of each row, such as the ends of a packed row's documents). The last block then
    computes its queries, attention output and MLP there alone (its keys and values still cover
    every token): the cheap way to read a sampler's last prompt position or a reward model's last
    real token. read_from (a static int; not with read_at): return h [B, T - read_from, D] at
    positions read_from .. T - 1 only, the same way (a policy's response positions).
    """
    cfg = self.cfg
    if read_at is not None and read_from is not None:
      raise ValueError('trunk: give read_at or read_from, not both')
    B, T = tokens.shape
    mask = jnp.ones((B, T), jnp.int32) if mask is None else mask.astype(jnp.int32)
    positions = default_positions(mask) if positions is None else positions
    x = jnp.take(self.embedding, tokens, axis=0).astype(cfg.dtype)          # [B, T, D]
    if cfg.style == 'gpt2':
      x += jnp.take(self.pos_embedding, positions, axis=0).astype(cfg.dtype)
    x = _constrain(self.dropout(x, deterministic=not train), ('batch', 'length', 'embed'))
    if cache is None:
      key_mask, slots, layer_caches = mask, jnp.broadcast_to(jnp.arange(T), (B, T)), [None] * cfg.n_layer
    else:
      idx = cache['index']
      key_mask = jax.lax.dynamic_update_slice(cache['mask'], mask, (0, idx))  # [B, S]
      slots = jnp.broadcast_to(idx + jnp.arange(T), (B, T))
      layer_caches = [dict(layer, index=idx) for layer in cache['layers']]
    kvs = []
    for i, (block, layer_cache) in enumerate(zip(self.blocks, layer_caches)):
      last = i == cfg.n_layer - 1
      x, kv = block(x, positions, key_mask, slots, layer_cache, train, read_at if last else None, segments,
                    read_from if last else None)
      kvs.append(kv)
    h = self.final_norm(x)
    if read_at is not None and read_at.ndim == 1:
      h = h[:, 0]                                                                # [B, D]
    if cache is not None:
      return h, {'index': cache['index'] + T, 'mask': key_mask, 'layers': kvs}
    if cache_length is not None:
      pad = lambda a: jnp.pad(a, [(0, 0)] * 2 + [(0, cache_length - T), (0, 0)])  # noqa: E731
      return h, {'index': jnp.array(T, jnp.int32), 'mask': jnp.pad(mask, ((0, 0), (0, cache_length - T))),
                 'layers': [jax.tree.map(pad, kv) for kv in kvs]}
    return h, None

  def logits(self, h):
    """Float32 logits [..., V] from hidden states [..., D]."""
    dt = self.cfg.dtype
    if self.cfg.tied:
      out = tied_logits(h, self.embedding.astype(dt))
    else:
      out = jnp.einsum('...d,dv->...v', h, self.lm_head.astype(dt), preferred_element_type=jnp.float32)
    return _constrain(out, ('batch', 'length', 'vocab')) if out.ndim == 3 else out

  def score(self, h):
    """Float32 scalar per position [...] from hidden states [..., D] (reward / value head)."""
    return jnp.einsum('...d,d->...', h.astype(jnp.float32), self.score_head.astype(jnp.float32))

  def score_at(self, tokens, positions, mask, read_at, *, segments=None, train=False):
    """Float32 scalars [B] read at position read_at [B] of each row (a reward model's last real
    token), or [B, J] at read_at [B, J] (packed rows, with their `segments`); the last block runs
    only there (see `trunk`)."""
    h, _ = self.trunk(tokens, positions, mask, segments=segments, read_at=read_at, train=train)
    return self.score(h)

  def __call__(self, tokens, positions=None, mask=None, *, segments=None, train=False):
    """Full forward: {'logits': [B, T, V]} and/or {'scores': [B, T]}, as the config asks."""
    h, _ = self.trunk(tokens, positions, mask, segments=segments, train=train)
    out = {}
    if self.cfg.lm_head:
      out['logits'] = self.logits(h)
    if self.cfg.scalar_head:
      out['scores'] = self.score(h)
    return out


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype: Any = None) -> dict:
  """An empty KV cache of `length` slots: per layer K and V [B, Hkv, S, Dh], the real-slot mask
  [B, S] and the next write index."""
  dtype = jnp.dtype(dtype or cfg.dtype)
  shape = (batch, cfg.kv_heads, length, cfg.head_dim)
  layer = lambda: {'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype)}  # noqa: E731
  return {'index': jnp.zeros((), jnp.int32), 'mask': jnp.zeros((batch, length), jnp.int32),
          'layers': [layer() for _ in range(cfg.n_layer)]}


def count_params(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))
