"""Training loops: restore or initialise, jit, step, log, evaluate, checkpoint.

A loop owns the host side only (data iterator, metrics, checkpoints, signals); every update is a
pure jitted step from `rlhf_jax.steps`. Killing a run and starting it again with the same workdir
continues from the last checkpoint with the same numbers as an uninterrupted run: the state holds
params, optimizer, step and RNG, and the checkpoint's JSON holds the data-iterator position.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import signal
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from jax.experimental import multihost_utils

from rlhf_jax import checkpoint, fs, metrics, optim, ppo, reward, sharding, steps, tokenizers
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


def _target(abstract, shardings):
  """Shapes with their target shardings: what a restore places each array onto."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def _abstract_params(model, mesh):
  """(shapes, shardings) of `model`'s params on `mesh`, nothing allocated."""
  example = jnp.zeros((1, 8), jnp.int32)
  return sharding.abstract_and_shardings(lambda k: model.init(jax.random.key(k), example)['params'], mesh, 0)


def _params_from(path: str, abstract_params, shardings, fresh: tuple[str, ...] = ()):
  """Parameters of another run's checkpoint (a previous stage) onto this run's shardings.

  fresh: top-level parameters this model may lack in the checkpoint (the RM's new scalar head);
  they are left out of the result and keep their fresh initialisation. Any other missing parameter is
  an error; checkpoint parameters this model does not have (the SFT model's LM head) are ignored.
  """
  ckpt = checkpoint.Checkpointer(path, max_to_keep=None)
  stored = ckpt.param_names()
  missing = sorted(set(abstract_params) - stored - set(fresh))
  if missing:
    raise ValueError(f'init.checkpoint={path}: has no parameters {missing}: it is not a checkpoint of this '
                     f'model family (its parameters: {sorted(stored)})')
  keep = [k for k in abstract_params if k in stored]
  target = {k: _target(abstract_params[k], shardings[k]) for k in keep}
  restored = ckpt.restore_params(target)
  ignored = sorted(stored - set(abstract_params))
  if ignored:
    log.info('init.checkpoint: not used by this model: %s', ignored)
  return restored


def _restore_or_init(c, mesh, init_params, tx, ckpt, train_iter, fresh: tuple[str, ...] = ()):
  """(state, shardings): the latest checkpoint of this run (with the data iterator's position),
  else a new state, its params taken from `c.init.checkpoint` when one is given."""
  abstract, shardings = state_lib.abstract(init_params, tx, mesh, c.seed)
  if ckpt.latest_step() is not None:
    state, extra = ckpt.restore(_target(abstract, shardings))
    train_iter.set_state(extra['data'])
    log.info('restored step %d from %s', int(state.step), ckpt.directory)
    return state, shardings
  state, shardings = state_lib.create(init_params, tx, mesh, c.seed)
  if c.init.checkpoint:
    restored = _params_from(c.init.checkpoint, abstract.params, shardings.params, fresh)
    state = state.replace(params={**state.params, **restored})
    log.info('initialised params from %s%s', c.init.checkpoint,
             f' (fresh: {sorted(set(fresh) - set(restored))})' if fresh else '')
  return state, shardings


def _loop(c, workdir: str, *, stage: str, state, step_fn, batches, mesh, ckpt, total: int, evaluate,
          stop_after: int | None, finalize: Callable[[object], dict] | None = None,
          eval_params: Callable[[object], object] = lambda state: state.params,
          lr: Callable[[int], float] | None = None) -> dict:
  """The loop every stage shares: step, log every `train.log_every`, evaluate every
  `train.eval_every` (and at step 0 and the end), checkpoint every `train.checkpoint_every`, and on
  SIGTERM save and raise Preempted. `finalize(state)` runs once after the last step and returns
  extra JSON saved with the final checkpoint (the RM's normalisation). `evaluate` gets
  `eval_params(state)` (PPO: the EMA of the policy); `lr(step)` is the logged learning rate
  (default: `config.optim`'s schedule over the loop's steps)."""
  writer = metrics.Writer(workdir, stage=stage)
  start = int(state.step)
  pending, last_eval, final = [], {}, {}
  if start == 0 and c.train.eval_every:  # the untrained (or initial) model's figures, at step 0
    writer.write(0, evaluate(eval_params(state)))
  bar = tqdm.tqdm(total=total, initial=start, desc=stage, disable=jax.process_index() != 0, dynamic_ncols=True)
  lr = lr or optim.schedule({**optim.DEFAULTS, **c.optim.to_dict()}, total)
  with _SigtermFlag() as sigterm:
    step = start
    while step < total:
      state, m = step_fn(state, sharding.shard_batch(next(batches), mesh))
      step += 1
      pending.append(m)
      bar.update(1)
      done = step == total
      stop = not done and (sigterm.set or (stop_after is not None and step - start >= stop_after))
      if step % c.train.log_every == 0 or done or stop:
        state = check_finite(state, c.train.skip_nonfinite)
        logged = metrics.fetch(pending)
        pending = []
        logged[f'{stage}/lr'] = float(lr(step - 1))
        writer.write(step, logged)
        bar.set_postfix(loss=f"{logged[f'{stage}/loss']:.3f}")
      if (c.train.eval_every and step % c.train.eval_every == 0) or done:
        last_eval = evaluate(eval_params(state))
        writer.write(step, last_eval)
      if done and finalize is not None:
        final = finalize(state)
        numbers = {f'{stage}/{k}': v for k, v in _scalars(final).items() if not k.startswith(('model/', 'config/'))}
        if numbers:
          writer.write(step, numbers)
      if step % c.train.checkpoint_every == 0 or done or stop:
        ckpt.save(step, state, {'data': batches.get_state(), 'stage': stage, **final}, wait=done or stop)
      if stop:
        break
  bar.close()
  writer.close()
  ckpt.wait()
  if step < total and sigterm.set:
    raise Preempted(f'SIGTERM at step {step}: saved to {ckpt.directory}; rerun to continue')
  return {'step': step, **last_eval, **final}


def _scalars(d: dict, prefix: str = '') -> dict:
  """The numbers of a nested dict, flattened to 'a/b' keys (for the metrics file)."""
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_scalars(v, f'{prefix}{k}/'))
    elif isinstance(v, (int, float)) and not isinstance(v, bool):
      out[f'{prefix}{k}'] = v
  return out


def sft_sources(pretrain_frac: float, data: dict) -> tuple[list, list[float] | None]:
  """(record lists, mixing weights) of an SFT run: demonstrations, with `data.pretrain_frac` of the
  rows pretraining text (the SFT + mix run), or pretraining text alone at 1 (the base model)."""
  frac = float(pretrain_frac)
  if not 0.0 <= frac <= 1.0:
    raise ValueError(f'data.pretrain_frac={frac} must lie in [0, 1]')
  if frac > 0 and not data['pretrain_train']:
    raise ValueError(f'data.pretrain_frac={frac} needs pretraining text: set data.pretrain_source')
  sources = ([data['train']] if frac < 1 else []) + ([data['pretrain_train']] if frac > 0 else [])
  return sources, ([1 - frac, frac] if len(sources) > 1 else None)


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
  sources, weights = sft_sources(c.data.pretrain_frac, data)
  per_epoch = max(len(sources[0]) // c.train.batch_size, 1)
  total = c.train.steps or c.train.epochs * per_epoch
  tx = optim.make(c.optim.to_dict(), total)
  example = jnp.zeros((1, seq_len), jnp.int32)
  init_params = lambda key: model.init(key, example)['params']  # noqa: E731

  train_iter = iter(pipeline.train_batches(tok, sources, seq_len=seq_len, global_batch=c.train.batch_size,
                                           seed=c.seed, weights=weights, pack=c.data.pack))
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'), max_to_keep=c.train.keep_checkpoints)
  state, shardings = _restore_or_init(c, mesh, init_params, tx, ckpt, train_iter)
  step_fn = steps.compile_step(steps.sft_step, mesh, shardings, pipeline.FIELDS, model=model, tx=tx)
  evaluate = _sft_evaluator(c, model, tok, mesh, data)
  finalize = lambda state: {'model': dataclasses.asdict(model.cfg)}  # noqa: E731  (for load_policy)
  return _loop(c, workdir, stage=c.get('stage', 'sft'), state=state, step_fn=step_fn, batches=train_iter,
               mesh=mesh, ckpt=ckpt, total=total, evaluate=evaluate, stop_after=stop_after, finalize=finalize)


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


# ----------------------------------------------------------------------------
# Reward model.


def rm_model(c: ml_collections.ConfigDict) -> model_lib.Transformer:
  """The RM: the LM trunk with a scalar head instead of the unembedding."""
  return model_lib.Transformer(model_lib.ModelConfig.from_dict({**c.model.to_dict(), 'lm_head': False,
                                                                'scalar_head': True}))


def _rm_k_max(c, data) -> int:
  """`data.k_max`, or (0) the largest K of the data; 2 in the flat pairs mode."""
  if c.rm.mode == 'flat':
    return 2
  return c.data.k_max or max(len(r['responses']) for recs in data.values() for r in recs)


def train_reward(c: ml_collections.ConfigDict, workdir: str, *, stop_after: int | None = None) -> dict:
  """Reward model on K-way rankings (InstructGPT §3.5): all C(K, 2) pairs of a prompt are one batch
  element (`rm.mode='grouped'`), or each pair is its own shuffled example (`rm.mode='flat'`, the
  ablation). Initialised from the SFT checkpoint `init.checkpoint` with a fresh scalar head. After
  the last step the scores are normalised (`norm.mode`) and the constants saved with the final
  checkpoint. Returns the final evaluation metrics and the normalisation.
  """
  if c.rm.mode not in ('grouped', 'flat'):
    raise ValueError(f"rm.mode={c.rm.mode!r}; valid: 'grouped', 'flat'")
  if c.norm.mode not in reward.NORM_MODES:
    raise ValueError(f'norm.mode={c.norm.mode!r}; valid: {reward.NORM_MODES}')
  mesh = sharding.make_mesh(**c.mesh.to_dict())
  sharding.check_batch(c.train.batch_size, mesh, 'train.batch_size')
  tok = tokenizers.from_config(c.tokenizer.to_dict())
  model = rm_model(c)
  data = _with_policy_comparisons(c, datasets.rm_records(c), tok, mesh, workdir)
  k_max, seq_len = _rm_k_max(c, data), c.data.seq_len
  train = pipeline.pairs_of(data['train']) if c.rm.mode == 'flat' else data['train']
  for name, recs in data.items():
    n = pipeline.ranking_truncation_count(tok, recs, seq_len)
    if n:
      log.warning('%s: %d responses are longer than data.seq_len=%d with their prompt and were truncated',
                  name, n, seq_len)
  over = sum(len(r['responses']) > k_max for r in train)
  if over:
    log.warning('%d rankings have more than data.k_max=%d responses: a random %d of each are kept', over, k_max, k_max)
  per_epoch = max(len(train) // c.train.batch_size, 1)
  total = c.train.steps or c.train.epochs * per_epoch
  log.info('reward model: %d %s, K_max %d, %d steps', len(train),
           'pairs' if c.rm.mode == 'flat' else 'rankings', k_max, total)
  tx = optim.make(c.optim.to_dict(), total)
  example = jnp.zeros((1, seq_len), jnp.int32)
  init_params = lambda key: model.init(key, example)['params']  # noqa: E731
  train_iter, fields = _ranking_stream(c, tok, train, mesh, seq_len=seq_len, k_max=k_max, steps=total)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'), max_to_keep=c.train.keep_checkpoints)
  state, shardings = _restore_or_init(c, mesh, init_params, tx, ckpt, train_iter, fresh=('score_head',))
  step_fn = steps.compile_step(steps.reward_step, mesh, shardings, fields, model=model, tx=tx)
  scorer = RewardScorer(model, tok, mesh, seq_len=seq_len, batch_size=c.train.eval_batch_size)
  evaluate = _rm_evaluator(c, tok, scorer, data)
  finalize = lambda state: {'norm': fit_rm_normalization(c, scorer, state.params, tok, mesh).to_dict(),  # noqa: E731
                            'model': dataclasses.asdict(model.cfg)}
  return _loop(c, workdir, stage='rm', state=state, step_fn=step_fn, batches=train_iter, mesh=mesh, ckpt=ckpt,
               total=total, evaluate=evaluate, stop_after=stop_after, finalize=finalize)


def _ranking_stream(c, tok, train, mesh, *, seq_len: int, k_max: int, steps: int):
  """The RM's training iterator and its batch fields: padded rankings, or (`rm.pack_len` > 0)
  packed ones whose shape holds every one of the run's `steps` batches."""
  kw = dict(seq_len=seq_len, k_max=k_max, global_batch=c.train.batch_size, seed=c.seed)
  if not c.rm.pack_len:
    return iter(pipeline.ranking_batches(tok, train, **kw)), pipeline.RANKING_FIELDS
  if c.rm.pack_len < seq_len:
    raise ValueError(f'rm.pack_len={c.rm.pack_len} is shorter than data.seq_len={seq_len}')
  shape = pipeline.pack_shape_for(tok, train, **kw, steps=steps, row_len=c.rm.pack_len,
                                  multiple=mesh.shape['data'] * mesh.shape['fsdp'])
  shape = dataclasses.replace(shape, rows=c.rm.pack_rows or shape.rows, docs=c.rm.pack_docs or shape.docs)
  slots = c.train.batch_size * k_max * seq_len
  log.info('reward model: packed rows %d x %d tokens per process, up to %d responses each (%.0f %% of the '
           '%d unpacked slots)', shape.rows, shape.row_len, shape.docs,
           100 * shape.rows * jax.process_count() * shape.row_len / slots, slots)
  return iter(pipeline.packed_ranking_batches(tok, train, **kw, shape=shape)), pipeline.PACKED_RANKING_FIELDS


COMPARISON_SOURCES = ('candidates', 'policy', 'both')


def _with_policy_comparisons(c, data: dict, tok, mesh, workdir: str) -> dict:
  """`data.comparisons`: 'candidates' (the embedded task's candidate generator: demonstrator,
  mistakes, answers, junk), 'policy' (rankings of `data.n_policy` prompts' samples of the policy in
  `init.policy_checkpoint`, default `init.checkpoint`, as InstructGPT collects them) or 'both'. The
  policy is the one PPO will optimise; it differs from the RM's own start when the RM is larger
  (InstructGPT: a 6B RM for every policy size). Policy samples are drawn once and kept
  in the workdir, so a resumed run trains on the same comparisons. With policy comparisons the RM is
  also evaluated on rankings of the policy's samples to validation prompts ('policy_valid')."""
  src = c.data.get('comparisons', 'candidates')
  if src not in COMPARISON_SOURCES:
    raise ValueError(f'data.comparisons={src!r}; valid: {COMPARISON_SOURCES}')
  if src == 'candidates':
    return data
  if c.data.source != 'synthetic':
    raise ValueError(f"data.comparisons={src!r} needs the embedded task's labelers (data.source='synthetic')")
  policy_path = _policy_path(c)
  if not policy_path:
    raise ValueError(f'data.comparisons={src!r} samples the policy in init.policy_checkpoint (default: '
                     'init.checkpoint); both are empty')
  path = fs.join(workdir, 'policy_comparisons.json')
  if fs.exists(path):
    pc = json.loads(fs.read_text(path))
    if pc.get('policy', policy_path) != policy_path:   # files written before the key was kept: trusted
      raise ValueError(f"{path} holds samples of the policy in {pc['policy']}, but init.policy_checkpoint "
                       f'(or init.checkpoint) is now {policy_path}: restore the setting, or move the file '
                       'away to sample the new policy')
  else:
    from rlhf_jax.evals.lm import LM
    lm = LM(*_sampling_policy(c, policy_path, mesh), tok, mesh, batch_size=c.data.policy_batch)
    sample = lambda prompts, seed: lm.generate(  # noqa: E731
        prompts, max_new_tokens=c.eval.gen_len, prompt_len=c.eval.prompt_len,
        temperature=c.data.policy_temperature, seed=seed, desc='policy samples')
    pc = {split: datasets.policy_comparisons(c, sample, split, n)
          for split, n in (('train', c.data.n_policy), ('valid', c.data.n_policy_valid))}
    pc['policy'] = policy_path
    if jax.process_index() == 0:
      fs.write_text(path, json.dumps(pc))
  log.info('policy comparisons: %d train, %d validation groups', len(pc['train']['train']),
           len(pc['valid']['train']))
  out = dict(data, train=pc['train']['train'] + (data['train'] if src == 'both' else []))
  out['policy_valid'], out['policy_valid_heldout_labeler'] = pc['valid']['train'], pc['valid']['heldout_labeler']
  return out


class RewardScorer:
  """Raw RM scores of ranked groups, in record order, by one jitted function (any K_max)."""

  def __init__(self, model, tok, mesh, *, seq_len: int, batch_size: int):
    self.tok, self.mesh, self.seq_len = tok, mesh, seq_len
    self.batch_size = batch_size
    self._fn = jax.jit(sharding.under_rules(functools.partial(steps.reward_scores, model=model), mesh))

  def __call__(self, params, records, k_max: int | None = None) -> list[np.ndarray]:
    """One array per record: the scores of its responses (rank order, as given)."""
    k_max = k_max or max(len(r['responses']) for r in records)
    out = []
    for b in pipeline.ranking_eval_batches(self.tok, records, seq_len=self.seq_len, k_max=k_max,
                                           global_batch=self.batch_size):
      s = multihost_utils.process_allgather(self._fn(params, sharding.shard_batch(b, self.mesh)), tiled=True)
      out.extend(np.asarray(s, np.float64))
    return [s[:min(len(r['responses']), k_max)] for s, r in zip(out, records)]

  def texts(self, params, prompts: list[str], responses: list[str]) -> np.ndarray:
    """Raw scores of single responses to their prompts."""
    recs = [{'prompt': p, 'responses': [y]} for p, y in zip(prompts, responses)]
    return np.concatenate(self(params, recs, 1)) if recs else np.zeros(0)


LENGTH_EDGES = (0, 8, 16, 32, 64, 128, 256, 512, 1024)


def _rm_evaluator(c, tok, scorer: RewardScorer, data) -> Callable[[object], dict]:
  """Held-out pairwise accuracy and eq. 1 log loss; on the embedded task also accuracy against the
  held-out labeler's rankings of the same groups, agreement with the gold labeler on every pair it
  does not tie, accuracy on the held-out family; and the mean score by response length (tokens).
  With policy comparisons, the same figures on rankings of the policy's samples ('eval/policy/')."""
  sets = {'eval/': ('valid', 'valid_heldout_labeler')}
  if data.get('policy_valid'):
    sets['eval/policy/'] = ('policy_valid', 'policy_valid_heldout_labeler')

  def evaluate(params):
    out = {}
    for prefix, (name, hl_name) in sets.items():
      out.update(_ranking_metrics(scorer(params, data[name]), data[name], data.get(hl_name), tok, prefix))
    if data.get('heldout'):
      hs = scorer(params, data['heldout'])
      out['eval/heldout_family_accuracy'] = reward.pairwise_metrics(
          hs, [np.arange(len(s)) for s in hs])['accuracy']
    return out
  return evaluate


def _ranking_metrics(scores, valid, heldout_labeler, tok, prefix: str) -> dict:
  ranks = [np.arange(len(r['responses'])) for r in valid]
  out = {f'{prefix}{k}': v for k, v in reward.pairwise_metrics(scores, ranks).items()}
  flat = np.concatenate(scores)
  out[f'{prefix}score_mean'], out[f'{prefix}score_std'] = float(flat.mean()), float(flat.std())
  lengths = np.array([len(tok.encode(y)) for r in valid for y in r['responses']])
  bucket = np.searchsorted(LENGTH_EDGES, lengths, side='right') - 1
  for b in np.unique(bucket):
    hi = LENGTH_EDGES[b + 1] - 1 if b + 1 < len(LENGTH_EDGES) else 'inf'
    out[f'{prefix}score_by_length/{LENGTH_EDGES[b]}-{hi}'] = float(flat[bucket == b].mean())
  if 'raw_prompt' in valid[0]:
    from rlhf_jax.data import synthetic
    gold = [np.array([synthetic.gold_score(r['raw_prompt'], y) for y in r['responses']]) for r in valid]
    # The held-out labeler ranked the same responses: its ranks in the training labeler's order.
    hl_ranks = [np.array([h['responses'].index(y) for y in r['responses']]) for r, h in zip(valid, heldout_labeler)]
    out[f'{prefix}heldout_labeler_accuracy'] = reward.pairwise_metrics(scores, hl_ranks)['accuracy']
    # Gold "ranks": higher gold score is better; gold ties form no pair.
    out[f'{prefix}gold_agreement'] = reward.pairwise_metrics(scores, [-g for g in gold])['accuracy']
  return out


def _policy_path(c) -> str:
  """The policy whose samples the RM stage ranks: init.policy_checkpoint, default init.checkpoint."""
  return c.init.get('policy_checkpoint') or c.init.checkpoint


def _sampling_policy(c, path: str, mesh):
  """(model, params) of a policy the RM stage samples from. At `init.checkpoint` (the RM's own SFT
  start, any checkpoint of it) the model is this stage's `c.model`; any other path must be a finished
  SFT or PPO run, whose saved shape is used, so the policy may be smaller than the RM."""
  if path != c.init.checkpoint:
    return load_policy(path, mesh)
  policy = build_model(c)                  # the SFT policy's shape: c.model, with its LM head
  abstract, shardings = _abstract_params(policy, mesh)
  return policy, _params_from(path, abstract, shardings)


def fit_rm_normalization(c, scorer: RewardScorer, params, tok, mesh) -> reward.Normalization:
  """`norm.mode` 'demonstrations': a bias so that `norm.n` demonstrations score mean 0
  (InstructGPT); 'reference': gain and bias so that samples of the reference policy
  (`norm.policy_checkpoint`, default `init.policy_checkpoint`, then `init.checkpoint`) to `norm.n`
  prompts score mean 0, std 1."""
  mode, n = c.norm.mode, c.norm.n
  if mode == 'none':
    return reward.Normalization()
  if mode == 'demonstrations':
    demos = datasets.demonstrations(c, n)
    raw = scorer.texts(params, [d['prompt'] for d in demos], [d['response'] for d in demos])
  else:
    path = c.norm.policy_checkpoint or _policy_path(c)
    if not path:
      raise ValueError("norm.mode='reference' needs a policy: set norm.policy_checkpoint (or "
                       "init.policy_checkpoint, or init.checkpoint)")
    policy, pparams = _sampling_policy(c, path, mesh)
    prompts = datasets.normalization_prompts(c, n)
    ys = datasets.policy_samples(c, policy, pparams, tok, mesh, prompts, temperature=c.norm.temperature,
                                 seed=c.seed)
    raw = scorer.texts(params, prompts, ys)
  norm = reward.fit_normalization(raw, mode)
  log.info('reward normalisation (%s, %d scores): gain %.4g, bias %.4g', mode, norm.n, norm.gain, norm.bias)
  return norm


def _finished_run(path: str, kind: str, mesh):
  """(checkpointer, final JSON, model, mesh) of a finished run: the model's shape is read from the
  JSON its last checkpoint was saved with; `mesh` defaults to all devices on the data axis."""
  ckpt = checkpoint.Checkpointer(path, max_to_keep=None)
  extra = ckpt.read_extra()
  if 'model' not in extra:
    raise ValueError(f'{path}: the latest checkpoint has no model shape in its JSON; it is not a finished '
                     f'{kind} run (train it to the end first)')
  model = model_lib.Transformer(model_lib.ModelConfig.from_dict(extra['model']))
  return ckpt, extra, model, mesh or sharding.make_mesh()


def load_reward_model(path: str, mesh=None):
  """(model, params, normalization) of a finished RM run's checkpoints directory: the model's shape
  and the normalisation come from the final checkpoint's JSON, the params onto `mesh` (default: all
  devices on the data axis). Score with `normalization.apply(RewardScorer(...)(params, records))`."""
  ckpt, extra, model, mesh = _finished_run(path, 'reward-model', mesh)
  abstract, shardings = _abstract_params(model, mesh)
  params = _params_from(path, abstract, shardings)
  return model, params, reward.Normalization.from_dict(extra.get('norm'))


def load_policy(path: str, mesh=None, *, ema: bool = True):
  """(model, params) of a finished SFT or PPO run's checkpoints directory (the model's shape from
  the final checkpoint's JSON). For a PPO run: the EMA of the policy's weights (the weights PPO
  evaluates) when the run kept one and `ema`, else its last weights."""
  ckpt, extra, model, mesh = _finished_run(path, 'SFT or PPO', mesh)
  abstract, shardings = _abstract_params(model, mesh)
  target = _target(abstract, shardings)
  if extra.get('stage') != 'ppo':
    return model, ckpt.restore_params(target)
  if ema and extra.get('config', {}).get('ppo', {}).get('ema_decay', 0):
    return model, ckpt.restore_params(target, key='ema')
  return model, ckpt.restore_params({'policy': target})['policy']


# ----------------------------------------------------------------------------
# PPO.


def _fresh_copy(tree):
  """A copy in new buffers (the PPO state is donated every iteration; the reference and the EMA
  must not share its buffers)."""
  return jax.tree.map(lambda x: x + jnp.zeros((), x.dtype), tree)


def ppo_models(c, tok, mesh) -> tuple[ppo.Models, ppo.PPOConfig, object]:
  """(models, ppo config, RM params; the RM's normalisation is in `models`): the policy (c.model; with a zero-initialised
  scalar head in the 'shared' value mode), the reference (the policy's shape without a head), the
  frozen RM from `init.reward_checkpoint` and the value network (the RM's shape). With
  `reward.source='gold'` (the embedded task's gold labeler as the reward, an oracle run) there is
  no RM, and the value network has the policy's trunk with a scalar head."""
  cfg = ppo.PPOConfig.from_dict(c.ppo.to_dict())
  if c.reward.source not in ('rm', 'gold'):
    raise ValueError(f"reward.source={c.reward.source!r}; valid: 'rm', 'gold'")
  if c.reward.source == 'gold':
    if c.data.source != 'synthetic':
      raise ValueError("reward.source='gold' needs the embedded task (data.source='synthetic'): only it has a gold labeler")
    rm, rm_params, norm = None, None, reward.Normalization()
    value = rm_model(c)
  else:
    if not c.init.reward_checkpoint:
      raise ValueError('init.reward_checkpoint is empty: PPO needs a trained reward model (an RM run\'s '
                       "checkpoints/), or reward.source='gold' on the embedded task")
    rm, rm_params, norm = load_reward_model(c.init.reward_checkpoint, mesh)
    value = rm
  shared = cfg.value_model == 'shared'
  ref = build_model(c)
  policy = model_lib.Transformer(ref.cfg.replace(scalar_head=True)) if shared else ref
  stop_id = tok.eos_id if cfg.stop_token < 0 else cfg.stop_token
  models = ppo.Models(policy=policy, value=None if shared else value, reward=rm, reference=ref,
                      reward_gain=norm.gain, reward_bias=norm.bias, vocab_size=tok.vocab_size, stop_id=stop_id)
  return models, cfg, rm_params


def train_ppo(c: ml_collections.ConfigDict, workdir: str, *, stop_after: int | None = None) -> dict:
  """PPO (or PPO-ptx, `ppo.ptx_coef` > 0) on prompts of `data.source` (InstructGPT §3.5): the policy
  and its frozen reference from the SFT checkpoint `init.checkpoint`, the frozen RM (with its
  normalisation) and the value network from `init.reward_checkpoint` (or `init.value_checkpoint`).
  `train.steps` iterations of `train.batch_size` episodes; each is one rollout, one scoring pass and
  one update (all jitted). Evaluates the EMA of the policy's weights. Returns the final metrics."""
  if not c.init.checkpoint:
    raise ValueError('init.checkpoint is empty: PPO starts from an SFT run\'s checkpoints/')
  mesh = sharding.make_mesh(**c.mesh.to_dict())
  tok = tokenizers.from_config(c.tokenizer.to_dict())
  models, cfg, rm_params = ppo_models(c, tok, mesh)
  B, mbs = c.train.batch_size, cfg.minibatches
  sharding.check_batch(B, mesh, 'train.batch_size')
  if B % mbs:
    raise ValueError(f'train.batch_size={B} does not split into ppo.minibatches={mbs}')
  sharding.check_batch(B // mbs, mesh, 'train.batch_size / ppo.minibatches')
  total, per_iter = c.train.steps, cfg.epochs * mbs
  opt = lambda o: {**o.to_dict(), 'warmup_steps': c.train.warmup_iterations * per_iter}  # noqa: E731
  policy_tx = optim.make(opt(c.optim), total * per_iter)
  tx = ppo.make_tx(policy_tx, None if models.value is None else optim.make(opt(c.value_optim), total * per_iter))
  example = jnp.zeros((1, 8), jnp.int32)
  init_fn = ppo.make_init(lambda k: models.policy.init(k, example)['params'],
                          None if models.value is None else (lambda k: models.value.init(k, example)['params']),
                          tx, cfg)

  prompts, raw = datasets.ppo_prompts(c)
  log.info('PPO: %d prompts, %d episodes per iteration, %d iterations%s', len(prompts), B, total,
           f', PPO-ptx γ={cfg.ptx_coef} with {cfg.ptx_ratio}× pretraining rows' if cfg.ptx_coef else '')
  its = {'': iter(pipeline.prompt_batches(tok, prompts, prompt_len=c.data.prompt_len, global_batch=B, seed=c.seed))}
  pre = datasets.pretrain_records(c)
  if cfg.ptx_coef:
    if not pre['pretrain_train']:
      raise ValueError('ppo.ptx_coef > 0 needs pretraining text: set data.pretrain_source')
    rows = cfg.epochs * mbs * cfg.ptx_ratio * (B // mbs)
    its['ptx'] = iter(pipeline.train_batches(tok, [pre['pretrain_train']], seq_len=c.data.ptx_seq_len,
                                             global_batch=rows, seed=c.seed + 1))
  batches = pipeline.Zip(**its)

  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'), max_to_keep=c.train.keep_checkpoints)
  abstract, shardings = sharding.abstract_and_shardings(init_fn, mesh, c.seed)
  ref_abstract, ref_shardings = _abstract_params(models.reference, mesh)
  ref_params = _params_from(c.init.checkpoint, ref_abstract, ref_shardings)
  if ckpt.latest_step() is not None:
    state, extra = ckpt.restore(_target(abstract, shardings))
    batches.set_state(extra['data'])
    log.info('restored iteration %d from %s', int(state.step), ckpt.directory)
  else:
    state, shardings = sharding.init_sharded(init_fn, mesh, c.seed)
    fresh = ('score_head',) if models.value is None else ()
    policy = {**state.params['policy'], **_fresh_copy(ref_params)}
    if fresh:  # OAI-2019: the value head on the policy trunk starts at zero
      policy['score_head'] = jnp.zeros_like(state.params['policy']['score_head'])
    params = {'policy': policy}
    value_from = c.init.value_checkpoint or (c.init.checkpoint if models.reward is None else c.init.reward_checkpoint)
    if models.value is not None:   # from the RM (InstructGPT); with the gold reward, the SFT trunk + a fresh head
      restored = _params_from(value_from, abstract.params['value'], shardings.params['value'],
                              fresh=('score_head',) if models.reward is None else ())
      params['value'] = {**state.params['value'], **restored}
    state = state.replace(params=params, ema=_fresh_copy(policy))
    log.info('policy and reference from %s; value from %s', c.init.checkpoint,
             'a zero head on the policy' if fresh else value_from)

  under = lambda f: sharding.under_rules(f, mesh)  # noqa: E731
  sample_cfg = ppo.sample_config(cfg, models, max_new_tokens=c.data.gen_len, eos_id=tok.eos_id, pad_id=tok.pad_id)
  gen = jax.jit(under(functools.partial(ppo.rollout, models=models, sample_cfg=sample_cfg)))
  score = jax.jit(under(functools.partial(ppo.score, models=models, cfg=cfg)))
  upd = jax.jit(under(functools.partial(ppo.update, models=models, cfg=cfg, tx=tx)),
                out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)

  def step_fn(state, batch):
    sample = gen(state, batch)
    ext = None
    if models.reward is None:  # the gold labeler is the reward: scored on the host, then sharded
      kept, _ = ppo.truncate_at_stop(sample['tokens'], sample['mask'], models.stop_id, cfg.truncate_after)
      gold = _gold_of(tok, raw, sample['tokens'], kept, batch['index'])
      n, pid = len(gold) // jax.process_count(), jax.process_index()
      ext = sharding.shard_batch(gold[pid * n:(pid + 1) * n].astype(np.float32), mesh)
    rollouts, m = score(state, ref_params, rm_params, batch, sample, ext)
    state, mu = upd(state, rollouts, batch.get('ptx'))
    m.update(mu)
    if raw is not None:  # the gold labeler's score of this iteration's rollouts (read while the update runs)
      m['objective/gold_score'] = float(
          (gold if ext is not None else _gold_of(tok, raw, rollouts['response'], rollouts['response_mask'],
                                                 batch['index'])).mean())
    return state, m

  data = {'valid': datasets.demonstrations(c, c.data.n_valid) if c.data.source == 'synthetic' else [],
          'pretrain_valid': pre['pretrain_valid']}
  evaluate = _sft_evaluator(c, models.policy, tok, mesh, data)
  eval_params = (lambda s: s.ema) if cfg.ema_decay else (lambda s: s.params['policy'])
  lr = optim.schedule({**optim.DEFAULTS, **opt(c.optim)}, total * per_iter)
  finalize = lambda state: {'model': dataclasses.asdict(models.policy.cfg),  # noqa: E731
                            'config': {'ppo': dataclasses.asdict(cfg), 'reward': c.reward.to_dict()}}
  return _loop(c, workdir, stage='ppo', state=state, step_fn=step_fn, batches=batches, mesh=mesh, ckpt=ckpt,
               total=total, evaluate=evaluate, stop_after=stop_after, finalize=finalize, eval_params=eval_params,
               lr=lambda it: lr(it * per_iter))


def _gold_of(tok, raw_prompts, response, response_mask, index) -> np.ndarray:
  """Gold scores [B] of a batch of rollouts (host side; every process gathers the whole batch)."""
  from rlhf_jax.data import synthetic
  toks, mask, idx = (np.asarray(multihost_utils.process_allgather(x, tiled=True))
                     for x in (response, response_mask, index))
  scores = []
  for t, m, i in zip(toks, mask, idx):
    ids = [int(x) for x, k in zip(t, m) if k and x != tok.eos_id]
    scores.append(synthetic.gold_score(raw_prompts[i], tok.decode(ids)))
  return np.asarray(scores, np.float64)
