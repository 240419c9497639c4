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

from rlhf_jax import losses, sharding
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


def compile_step(step_fn, mesh, state_shardings, batch_keys, **statics):
  """jit(step) with statics bound, state donated, the batch sharded over (data, fsdp) and metrics
  replicated. The model's activation constraints resolve against `mesh`."""
  fn = sharding.under_rules(functools.partial(step_fn, **statics), mesh)
  batch_sh = {k: sharding.batch_sharding(mesh) for k in batch_keys}
  return jax.jit(fn, in_shardings=(state_shardings, batch_sh),
                 out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0)
