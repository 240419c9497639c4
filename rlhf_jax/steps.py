"""Train steps: pure functions `step(state, batch, *, statics) -> (state, metrics)`.

No I/O and no logging here. Bind the statics with `functools.partial`, then jit with shardings and
`donate_argnums=0` (see `compile_step`). Metrics are scalars, fetched by the loop once per log
interval.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from rlhf_jax import losses, reward, sharding
from rlhf_jax import state as state_lib


def sft_step(state: state_lib.TrainState, batch, *, model, tx):
  """One SFT update: next-token loss on response tokens only (batch['loss_mask']).

  batch: tokens, positions, mask (1 = real token), loss_mask, segments (packed documents), all
  [B, T]. Dropout keys come from fold_in(state.rng, state.step).
  """
  def loss_fn(params):
    logits = model.apply({'params': params}, batch['tokens'], batch['positions'], batch['mask'],
                         segments=batch.get('segments'), train=True,
                         rngs={'dropout': state.key()})['logits']                 # [B, T, V]
    return losses.sft_loss(logits, batch['tokens'], batch['loss_mask'])

  (loss, n_tokens), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grad_norm = optax.global_norm(grads)
  new = state_lib.guarded_update(state, grads, tx, jnp.isfinite(loss) & jnp.isfinite(grad_norm))
  return new, {'sft/loss': loss, 'sft/tokens': n_tokens, 'sft/grad_norm': grad_norm}


def sft_eval(params, batch, *, model):
  """Summed next-token loss and token count over the loss mask (for a validation mean)."""
  logits = model.apply({'params': params}, batch['tokens'], batch['positions'], batch['mask'],
                       segments=batch.get('segments'))['logits']
  targets, m = losses.next_token_targets(batch['tokens'], batch['loss_mask'])
  logp = losses.token_logprobs(logits, targets)
  return {'nll_sum': -(logp * m).sum(), 'tokens': m.sum()}


def _flat_responses(batch):
  """[B, K, ...] -> [B·K, ...]: every response of every prompt is one row of the model's batch."""
  return {k: v.reshape(-1, *v.shape[2:]) for k, v in batch.items()}


def reward_scores(params, batch, *, model, train=False, rngs=None):
  """Raw rewards [B, K]: the scalar head at each response's last real token (batch['read_at']).
  The model runs once per response (B·K rows), never once per pair. A packed batch
  (`pipeline.pack_rankings`: the responses share rows, batch['slot'] [B, K] says where each one's
  score is) runs its rows once instead."""
  if 'slot' in batch:
    r = model.apply({'params': params}, batch['tokens'], batch['positions'], batch['mask'], batch['read_at'],
                    segments=batch['segments'], train=train, rngs=rngs, method=model.score_at)  # [R, J]
    return r.reshape(-1)[batch['slot']]
  B, K = batch['read_at'].shape
  f = _flat_responses({k: batch[k] for k in ('tokens', 'positions', 'mask', 'read_at')})
  r = model.apply({'params': params}, f['tokens'], f['positions'], f['mask'], f['read_at'], train=train,
                  rngs=rngs, method=model.score_at)
  return r.reshape(B, K)


def reward_step(state: state_lib.TrainState, batch, *, model, tx):
  """One reward-model update on K-way rankings (InstructGPT eq. 1, `reward.ranking_loss`).

  batch: tokens, positions, mask [B, K, T]; read_at, ranks, valid [B, K] (see
  `pipeline.encode_ranking`), or packed (`pipeline.pack_rankings`). In the flat "shuffled pairs"
  ablation K = 2 and each element is one pair.
  """
  def loss_fn(params):
    r = reward_scores(params, batch, model=model, train=True, rngs={'dropout': state.key()})
    loss, m = reward.ranking_loss(r, batch['ranks'], batch['valid'])
    valid = batch['valid'].astype(jnp.float32)
    m['score_mean'] = (r * valid).sum() / jnp.maximum(valid.sum(), 1.0)
    return loss, m

  (loss, m), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grad_norm = optax.global_norm(grads)
  new = state_lib.guarded_update(state, grads, tx, jnp.isfinite(loss) & jnp.isfinite(grad_norm))
  return new, {'rm/loss': loss, 'rm/grad_norm': grad_norm, **{f'rm/{k}': v for k, v in m.items()}}


def compile_step(step_fn, mesh, state_shardings, batch_keys, **statics):
  """jit(step) with statics bound, state donated, the batch sharded over (data, fsdp) and metrics
  replicated. The model's activation constraints resolve against `mesh`. batch_keys: the batch's
  keys (all [B, T]), or a dict key -> number of dimensions."""
  fn = sharding.under_rules(functools.partial(step_fn, **statics), mesh)
  ndims = batch_keys if isinstance(batch_keys, dict) else dict.fromkeys(batch_keys, 2)
  batch_sh = {k: sharding.batch_sharding(mesh, n) for k, n in ndims.items()}
  return jax.jit(fn, in_shardings=(state_shardings, batch_sh),
                 out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0)
