"""Jittable sampling with a KV cache: one prefill, then a decode loop inside jit (lax.scan).

Prompts are left-padded to a common length P, so the last prompt slot holds every row's last real
token and decoding writes all rows at the same cache slot P + i. Shapes are static: a finished row
keeps stepping, emitting `pad_id` with mask 0.

Returned log-probs are those of the *tempered, untruncated* policy, log softmax(logits / T), at
the sampled token: the quantity PPO's scoring pass recomputes. With `vocab_size` (a tokenizer smaller
than the model's padded vocabulary) the softmax runs over the real ids only; scoring must slice the
logits the same way. Top-k / top-p only restrict which
tokens can be drawn; they are not folded into the returned log-probs.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from rlhf_jax import model as model_lib
from rlhf_jax import sharding


@dataclasses.dataclass(frozen=True)
class SampleConfig:
  max_new_tokens: int
  temperature: float = 1.0   # 0 = greedy
  top_k: int = 0             # 0 = off
  top_p: float = 1.0         # 1 = off
  eos_id: int | None = None  # None = never stop early
  pad_id: int = 0
  vocab_size: int | None = None  # the tokenizer's: ids >= this (model padding) are never drawn


def _filter(scaled, top_k, top_p):
  """Logits with tokens outside the top-k / nucleus set to -inf. scaled [B, V]."""
  if top_k and top_k < scaled.shape[-1]:
    kth = jax.lax.top_k(scaled, top_k)[0][:, -1:]                            # [B, 1]
    scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
  if top_p < 1.0:
    probs = jax.nn.softmax(scaled, axis=-1)
    desc = -jnp.sort(-probs, axis=-1)                                         # [B, V]
    # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass strictly
    # before it is < top_p (the most likely token always stays).
    keep = (jnp.cumsum(desc, axis=-1) - desc) < top_p
    threshold = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)  # [B, 1]
    scaled = jnp.where(probs < threshold, -jnp.inf, scaled)
  return scaled


def inverse_cdf(weights, u, block: int = 128):
  """The index i with cdf[i-1] <= u < cdf[i] of unnormalised weights [B, V] >= 0, for u [B] in
  [0, total). Two levels (block sums, then one block) so that no cumulative sum runs over the
  whole vocabulary: XLA on CPU lowers cumsum to a reduce-window whose cost grows with its length.
  """
  B, V = weights.shape
  nb = -(-V // block)
  blocks = jnp.pad(weights, ((0, 0), (0, nb * block - V))).reshape(B, nb, block)  # [B, nb, bs]
  sums = blocks.sum(-1)                                                             # [B, nb]
  csum = jnp.cumsum(sums, -1)
  j = jnp.minimum(jnp.sum(csum <= u[:, None], -1), nb - 1)                          # block [B]
  before = jnp.take_along_axis(csum - sums, j[:, None], -1)[:, 0]                   # mass before it
  inner = jnp.take_along_axis(blocks, j[:, None, None], 1)[:, 0]                    # [B, bs]
  i = jnp.sum(jnp.cumsum(inner, -1) <= (u - before)[:, None], -1)
  # Rounding can push u - before just outside the block's range: clamp to its first/last
  # positive weight, so a zero-probability token is never drawn.
  pos = inner > 0
  first, last = jnp.argmax(pos, -1), block - 1 - jnp.argmax(pos[:, ::-1], -1)
  return (j * block + jnp.clip(i, first, last)).astype(jnp.int32)


def sample_logits(logits, u, cfg: SampleConfig):
  """Draw one token per row from logits [B, V], given uniforms u [B] in [0, 1). Returns
  (tokens [B], logprobs [B]).

  Draws by inverting the CDF with one uniform per row: exact, and far cheaper on CPU than a
  Gumbel draw over the whole vocabulary. The caller draws u (all steps' at once, outside the
  decode loop, so that no random-number kernel runs per step).
  """
  logits = logits.astype(jnp.float32)
  if cfg.vocab_size is not None:
    logits = logits[:, :cfg.vocab_size]                                       # [B, V_real]
  if cfg.temperature == 0:
    tokens = jnp.argmax(logits, axis=-1)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return tokens, jnp.take_along_axis(logp, tokens[:, None], -1)[:, 0]
  scaled = logits / cfg.temperature
  m = jnp.max(scaled, axis=-1, keepdims=True)                                # [B, 1]
  e = jnp.exp(scaled - m)                                                     # [B, V]
  total = jnp.sum(e, axis=-1)                                                 # [B]
  log_z = jnp.log(total)
  filtered = cfg.top_k or cfg.top_p < 1.0
  if filtered:
    e = jnp.exp(_filter(scaled, cfg.top_k, cfg.top_p) - m)
    total = jnp.sum(e, axis=-1)
  tokens = inverse_cdf(e, u * total)                                                  # [B]
  logprobs = jnp.take_along_axis(scaled, tokens[:, None], -1)[:, 0] - m[:, 0] - log_z
  return tokens, logprobs


def generate(params, prompts, prompt_mask, key, *, model: model_lib.Transformer, cfg: SampleConfig):
  """Sample `cfg.max_new_tokens` tokens after left-padded prompts.

  prompts, prompt_mask: [B, P] (mask 1 = real token; each row needs at least one). Returns
  {'tokens', 'logprobs', 'mask'}, each [B, N]: mask 1 marks real response tokens, up to and
  including the first EOS; later positions hold pad_id and logprob 0.
  """
  B, P = prompts.shape
  N = cfg.max_new_tokens
  if model.cfg.style == 'gpt2' and P + N > model.cfg.max_len:
    raise ValueError(f'prompt length {P} + max_new_tokens {N} exceeds model.max_len {model.cfg.max_len}')
  apply = functools.partial(model.apply, {'params': params})
  prompt_mask = prompt_mask.astype(jnp.int32)
  # Prefill: a plain forward over the prompts that returns their keys/values in a cache of P + N
  # slots, so it attends over P slots, not P + N.
  # Only the last prompt slot is read: the last block runs its queries and MLP there alone, and
  # logits [B, P, V] are never materialised.
  h, cache = apply(prompts, model_lib.default_positions(prompt_mask), prompt_mask, cache_length=P + N,
                   read_at=jnp.full((B,), P - 1), method='trunk')
  uniforms = jax.random.uniform(key, (N, B))                                  # [N, B]
  tok, logp = sample_logits(apply(h, method='logits'), uniforms[0], cfg)
  done = jnp.zeros((B,), bool) if cfg.eos_id is None else tok == cfg.eos_id
  pos = jnp.sum(prompt_mask, axis=-1)                                         # [B]

  def step(carry, u):
    cache, tok, real, pos, done = carry
    h, cache = apply(tok[:, None], pos[:, None], real[:, None].astype(jnp.int32), cache=cache,
                     method='trunk')
    new, logp = sample_logits(apply(h[:, 0], method='logits'), u, cfg)
    live = ~done
    new = jnp.where(live, new, cfg.pad_id)
    if cfg.eos_id is not None:
      done = done | (new == cfg.eos_id)
    return (cache, new, live, pos + 1, done), (new, jnp.where(live, logp, 0.0), live)

  carry = (cache, tok, jnp.ones((B,), bool), pos, done)
  _, (toks, logps, live) = jax.lax.scan(step, carry, uniforms[1:])
  return {
      'tokens': jnp.concatenate([tok[:, None], toks.T], axis=1).astype(jnp.int32),        # [B, N]
      'logprobs': jnp.concatenate([logp[:, None], logps.T], axis=1),                        # [B, N]
      'mask': jnp.concatenate([jnp.ones((B, 1), jnp.int32), live.T.astype(jnp.int32)], axis=1),
  }


def make_generate(model: model_lib.Transformer, cfg: SampleConfig, mesh=None):
  """jit(generate) with the model and sampling settings bound. With a mesh, the model's logical
  activation shardings resolve against it (give params and prompts placed on it: prompts sharded
  over the batch axes, e.g. with `sharding.shard_batch`)."""
  fn = functools.partial(generate, model=model, cfg=cfg)
  if mesh is not None:
    fn = sharding.under_rules(fn, mesh)
  return jax.jit(fn)
