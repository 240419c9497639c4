"""The train state: one pytree with everything an update needs, created directly sharded.

The PRNG key is stored as raw key data (uint32) so checkpoints hold plain arrays; steps derive
their keys with `fold_in(key, step)`, never by rebuilding a key from the seed.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from rlhf_jax import sharding


@flax.struct.dataclass
class TrainState:
  step: jax.Array          # int32 scalar: updates applied so far
  params: Any
  opt_state: Any
  rng: jax.Array           # uint32 key data; the key for step s is fold_in(key, s)
  bad_step: jax.Array      # int32 scalar: first step whose loss or gradient was not finite, or -1

  def key(self, *salt: int) -> jax.Array:
    """The key of this step (salted, for independent streams within one step)."""
    key = jax.random.fold_in(jax.random.wrap_key_data(self.rng), self.step)
    for s in salt:
      key = jax.random.fold_in(key, s)
    return key


def _init(init_params: Callable[[jax.Array], Any], tx: optax.GradientTransformation):
  def init(seed):
    key = jax.random.key(seed)
    params = init_params(jax.random.fold_in(key, 0))  # boxed: optax's state inherits the axis names
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.key_data(jax.random.fold_in(key, 1)),
                      bad_step=jnp.full((), -1, jnp.int32))
  return init


def create(init_params: Callable[[jax.Array], Any], tx: optax.GradientTransformation, mesh, seed: int):
  """(state, shardings): params from `init_params(key)` (boxed, with logical axis names), and the
  optimizer state, both created on their shards by one jitted init."""
  return sharding.init_sharded(_init(init_params, tx), mesh, seed)


def abstract(init_params: Callable[[jax.Array], Any], tx: optax.GradientTransformation, mesh, seed: int = 0):
  """(shapes, shardings) of `create`'s state without allocating it: for restoring a checkpoint
  onto a mesh, and for memory estimates at full size."""
  return sharding.abstract_and_shardings(_init(init_params, tx), mesh, seed)


def apply_if_finite(params, opt_state, grads, tx, finite):
  """(params, opt_state) after one optimizer step if `finite`, else unchanged."""
  updates, new_opt_state = tx.update(grads, opt_state, params)
  new_params = optax.apply_updates(params, updates)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
  return keep(new_params, params), keep(new_opt_state, opt_state)


def guarded_update(state: TrainState, grads, tx, finite) -> TrainState:
  """Apply one optimizer step if `finite`; otherwise keep params and optimizer state unchanged
  and record the step in `bad_step` (the loop stops, or skips if configured). Never lets a NaN
  into the parameters."""
  params, opt_state = apply_if_finite(state.params, state.opt_state, grads, tx, finite)
  bad = jnp.where(finite | (state.bad_step >= 0), state.bad_step, state.step)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state, bad_step=bad)
