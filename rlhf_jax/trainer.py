"""Training loops: restore or initialise, jit, step, log, evaluate, checkpoint.

A loop owns the host side only (data iterator, metrics, checkpoints, signals); every update is a
pure jitted step from `rlhf_jax.steps`. Killing a run and starting it again with the same workdir
continues from the last checkpoint with the same numbers as an uninterrupted run: the state holds
params, optimizer, step and RNG, and the checkpoint's JSON holds the data-iterator position.
"""
from __future__ import annotations

import logging
import os
import signal
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from rlhf_jax import checkpoint, metrics, optim, sharding, steps, tokenizers
from rlhf_jax import model as model_lib
from rlhf_jax import state as state_lib
from rlhf_jax.data import datasets, pipeline

log = logging.getLogger('rlhf_jax')


class Preempted(Exception):
  """Raised after a SIGTERM: the state was saved; rerun the same command to continue."""


class _SigtermFlag:
  """Turns SIGTERM into a flag the loop checks between steps (save, then exit cleanly)."""

  def __init__(self):
    self.set = False
    self._old = None

  def __enter__(self):
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. a notebook worker): no handler
      self._old = None
    return self

  def _handle(self, *_):
    self.set = True

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def build_model(c: ml_collections.ConfigDict) -> model_lib.Transformer:
  return model_lib.Transformer(model_lib.ModelConfig.from_dict(c.model.to_dict()))


def check_finite(state, skip: bool):
  """Stop with a clear error at the first step whose loss or gradient was not finite (that step's
  update was not applied), or, if `train.skip_nonfinite`, log it and go on."""
  bad = int(jax.device_get(state.bad_step))
  if bad < 0:
    return state
  if not skip:
    raise FloatingPointError(f'non-finite loss or gradient at step {bad} (its update was not applied; '
                             'set train.skip_nonfinite=True to skip such steps)')
  log.warning('skipped the update of step %d: non-finite loss or gradient', bad)
  return state.replace(bad_step=jnp.full_like(state.bad_step, -1))


def _params_from(path: str, abstract_params, shardings):
  """Parameters of another run's checkpoint (a previous stage) onto this run's shardings."""
  ckpt = checkpoint.Checkpointer(path, max_to_keep=None)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_params, shardings)
  return ckpt.restore_params(target)


def train_sft(c: ml_collections.ConfigDict, workdir: str, *, stop_after: int | None = None) -> dict:
  """Supervised fine-tuning (InstructGPT §3.5): next-token loss on response tokens only, optionally
  with pretraining text mixed into the batches. Returns the final evaluation metrics.

  stop_after: end the loop after this many steps of this call (a checkpoint is written), as a
  preemption would; used by tests of exact resume.
  """
  mesh = sharding.make_mesh(**c.mesh.to_dict())
  sharding.check_batch(c.train.batch_size, mesh, 'train.batch_size')
  tok = tokenizers.from_config(c.tokenizer.to_dict())
  model = build_model(c)
  data = datasets.sft_records(c)
  seq_len = c.data.seq_len
  for name, recs in data.items():
    n = pipeline.truncation_count(tok, recs, seq_len) if recs else 0
    if n:
      log.warning('%s: %d of %d records are longer than data.seq_len=%d and were truncated', name, n, len(recs), seq_len)
  per_epoch = max(len(data['train']) // c.train.batch_size, 1)
  total = c.train.steps or c.train.epochs * per_epoch
  tx = optim.make(c.optim.to_dict(), total)
  example = jnp.zeros((1, seq_len), jnp.int32)
  init_params = lambda key: model.init(key, example)['params']  # noqa: E731
  abstract, shardings = state_lib.abstract(init_params, tx, mesh, c.seed)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)

  sources = [data['train']] + ([data['pretrain_train']] if c.data.pretrain_frac > 0 else [])
  weights = [1 - c.data.pretrain_frac, c.data.pretrain_frac] if len(sources) > 1 else None
  train_iter = iter(pipeline.train_batches(tok, sources, seq_len=seq_len, global_batch=c.train.batch_size,
                                           seed=c.seed, weights=weights, pack=c.data.pack))
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'), max_to_keep=c.train.keep_checkpoints)
  if ckpt.latest_step() is not None:
    state, extra = ckpt.restore(target)
    train_iter.set_state(extra['data'])
    log.info('restored step %d from %s', int(state.step), ckpt.directory)
  else:
    state, _ = state_lib.create(init_params, tx, mesh, c.seed)
    if c.init.checkpoint:
      state = state.replace(params=_params_from(c.init.checkpoint, abstract.params, shardings.params))
      log.info('initialised params from %s', c.init.checkpoint)

  step_fn = steps.compile_step(steps.sft_step, mesh, shardings, pipeline.FIELDS, model=model, tx=tx)
  evaluate = _sft_evaluator(c, model, tok, mesh, data)
  writer = metrics.Writer(workdir, stage=c.get('stage', 'sft'))
  start = int(state.step)
  pending, last_eval = [], {}
  if start == 0 and c.train.eval_every:  # the untrained (or initial) model's figures, at step 0
    writer.write(0, evaluate(state.params))
  bar = tqdm.tqdm(total=total, initial=start, desc='sft', disable=jax.process_index() != 0, dynamic_ncols=True)
  with _SigtermFlag() as sigterm:
    step = start
    while step < total:
      state, m = step_fn(state, sharding.shard_batch(next(train_iter), mesh))
      step += 1
      pending.append(m)
      bar.update(1)
      done = step == total
      stop = sigterm.set or (stop_after is not None and step - start >= stop_after)
      if step % c.train.log_every == 0 or done or stop:
        state = check_finite(state, c.train.skip_nonfinite)
        logged = metrics.fetch(pending)
        pending = []
        logged['sft/lr'] = float(optim.schedule({**optim.DEFAULTS, **c.optim.to_dict()}, total)(step - 1))
        writer.write(step, logged)
        bar.set_postfix(loss=f"{logged['sft/loss']:.3f}")
      if (c.train.eval_every and step % c.train.eval_every == 0) or done:
        last_eval = evaluate(state.params)
        writer.write(step, last_eval)
      if step % c.train.checkpoint_every == 0 or done or stop:
        ckpt.save(step, state, {'data': train_iter.get_state(), 'stage': 'sft'}, wait=done or stop)
      if stop and not done:
        bar.close()
        writer.close()
        ckpt.wait()
        if sigterm.set:
          raise Preempted(f'SIGTERM at step {step}: saved to {ckpt.directory}; rerun to continue')
        return {'step': step, **last_eval}
  bar.close()
  writer.close()
  ckpt.wait()
  return {'step': step, **last_eval}


def _sft_evaluator(c, model, tok, mesh, data) -> Callable[[object], dict]:
  """Validation loss on demonstrations and on pretraining text, and on the embedded task the gold
  labeler's mean score of greedy samples on validation prompts."""
  eval_step = jax.jit(sharding.under_rules(lambda p, b: steps.sft_eval(p, b, model=model), mesh))
  gold = datasets.gold_sampler(c, model, tok, mesh)

  def loss_on(params, records):
    tot, n = 0.0, 0.0
    for b in pipeline.eval_batches(tok, records, seq_len=c.data.seq_len, global_batch=c.train.eval_batch_size):
      out = jax.device_get(eval_step(params, sharding.shard_batch(b, mesh)))
      tot, n = tot + float(out['nll_sum']), n + float(out['tokens'])
    return tot / max(n, 1.0)

  def evaluate(params):
    out = {}
    if data.get('valid'):
      out['eval/sft_loss'] = loss_on(params, data['valid'])
    if data.get('pretrain_valid'):
      out['eval/pretrain_loss'] = loss_on(params, data['pretrain_valid'])
    if gold is not None:
      out['eval/gold_score'] = float(np.mean(gold(params)))
    return out
  return evaluate
