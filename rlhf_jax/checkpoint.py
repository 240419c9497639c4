"""Orbax checkpoints: the train state (sharded arrays) plus a JSON record (data-iterator position,
and whatever else the loop needs to continue exactly).

Every process calls save/restore together; Orbax writes each array's shards from the processes
that hold them and finalises a step atomically, so a partially written checkpoint is never taken
as the latest. Restoring takes the abstract state with the *target* shardings, so a checkpoint
restores onto any mesh shape.
"""
from __future__ import annotations

from typing import Any

import jax
import orbax.checkpoint as ocp

from rlhf_jax import fs


class Checkpointer:
  def __init__(self, directory: str, max_to_keep: int | None = 3):
    self.directory = fs.absolute(directory)
    # Handlers registered up front, so a fresh manager can read a checkpoint's metadata and
    # restore part of a state (params only) as well as all of it.
    self._mngr = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        item_handlers={'state': ocp.PyTreeCheckpointHandler(), 'extra': ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def save(self, step: int, state, extra: dict[str, Any], *, wait: bool = False) -> None:
    """Save asynchronously (training continues while arrays are written); `wait` blocks."""
    self._mngr.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state),
                                                  extra=ocp.args.JsonSave(extra)), force=True)
    if wait:
      self._mngr.wait_until_finished()

  def restore(self, abstract_state, step: int | None = None):
    """(state, extra) of `step` (default: the latest) onto the shardings of `abstract_state`
    (a tree of jax.ShapeDtypeStruct with sharding). A checkpoint of another model shape fails
    naming the first parameter that differs."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no checkpoint in {self.directory}')
    self._check_shapes(step, abstract_state)
    out = self._mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item=abstract_state, restore_args=_restore_args(abstract_state)),
        extra=ocp.args.JsonRestore()))
    return out['state'], out['extra']

  def restore_params(self, abstract_params, step: int | None = None, key: str = 'params'):
    """Only the `params` of a saved train state (e.g. the SFT model that initialises the RM), or
    another top-level entry (`key='ema'`: PPO's averaged policy), onto the shardings of
    `abstract_params`."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no checkpoint in {self.directory}')
    self._check_shapes(step, {key: abstract_params})
    out = self._mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item={key: abstract_params}, restore_args={key: _restore_args(abstract_params)},
        partial_restore=True)))
    return out['state'][key]

  def state_keys(self, step: int | None = None) -> set[str]:
    """The top-level entries of the saved state ('params', 'opt_state', 'ema', ...)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no checkpoint in {self.directory}')
    return set(self._mngr.item_metadata(step)['state'].tree)

  def param_names(self, step: int | None = None) -> set[str]:
    """The top-level names of the saved params (modules and parameters of the model)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no checkpoint in {self.directory}')
    return set(self._mngr.item_metadata(step)['state'].tree['params'])

  def read_extra(self, step: int | None = None) -> dict[str, Any]:
    """The JSON saved with `step` (default: the latest)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no checkpoint in {self.directory}')
    return self._mngr.restore(step, args=ocp.args.Composite(extra=ocp.args.JsonRestore()))['extra']

  def _check_shapes(self, step: int, abstract_state) -> None:
    stored = self._mngr.item_metadata(step)['state'].tree
    want = jax.tree_util.tree_flatten_with_path(abstract_state)[0]
    for path, leaf in want:
      node = stored
      try:
        for k in path:
          node = node[getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', None)))]
      except (KeyError, IndexError, TypeError):
        raise ValueError(f'checkpoint {self.directory}/{step} has no entry '
                         f'{jax.tree_util.keystr(path)}: it was saved from a different model or state') from None
      if tuple(node.shape) != tuple(leaf.shape):
        raise ValueError(f'checkpoint {self.directory}/{step}: {jax.tree_util.keystr(path)} has shape '
                         f'{tuple(node.shape)}, the config builds {tuple(leaf.shape)} '
                         '(a checkpoint of a different model shape)')

  def read_state(self, step: int | None = None):
    """The saved state as stored (host arrays, nested dicts), for inspection and tests."""
    step = self.latest_step() if step is None else step
    return self._mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore()))['state']

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.close()


def _restore_args(abstract_tree):
  return jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape, dtype=a.dtype),
                      abstract_tree)
