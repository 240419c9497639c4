#!/usr/bin/env python
"""rlhf_jax on the fixed benchmark workloads (WORKLOAD.md; numbers in workload.json).

Prints one JSON line per result on stdout (the first is ENV), progress on stderr:
    python bench/run.py [--workload GEN ...] [--tag run1] [--spec path/to/workload.json] [--host-devices N]

Workloads are the functions in WORKLOADS (name -> fn(ctx)); each prints its own result lines.
"""
from __future__ import annotations

import os

THREAD_VARS = ('OMP_NUM_THREADS', 'MKL_NUM_THREADS', 'OPENBLAS_NUM_THREADS')
for _v in THREAD_VARS:
  os.environ.setdefault(_v, '2')

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import numpy as np  # noqa: E402

from rlhf_jax import hostmem  # noqa: E402  (importing rlhf_jax before JAX starts sets up host memory reuse)

DEFAULT_SPEC = Path(__file__).resolve().parents[1].parent / 'shared/bench/workload.json'
IMPL = 'rlhf_jax'


def log(*msg):
  print('[bench]', *msg, file=sys.stderr, flush=True)


@dataclasses.dataclass
class Ctx:
  """What every workload needs: the parsed spec, its hash, the run tag and the MFU peak."""
  spec: dict
  spec_sha: str
  tag: str
  peak_gflops: float = float('nan')  # best single matmul rate of this run (NaN until PEAK runs)

  def emit(self, workload: str, metric: str, value: float, times=None, **extra):
    rec = {'impl': IMPL, 'tag': self.tag, 'workload': workload, 'metric': metric, 'value': _round(value)}
    if times:
      rec['median_s'] = round(statistics.median(times), 5)
      rec['times_s'] = [round(t, 5) for t in times]
    rec.update({k: _round(v) for k, v in extra.items()})
    print(json.dumps(rec), flush=True)

  def mfu(self, rate: float, flops_per_token: float) -> float:
    return rate * flops_per_token / (self.peak_gflops * 1e9)


def _round(v):
  return round(v, 4) if isinstance(v, float) else v


# ---------------------------------------------------------------------------------------------
# Model M and FLOP counts


def model_config(spec):
  from rlhf_jax.model import ModelConfig
  m = spec['model']
  if m['arch'] != 'gpt2' or m['activation'] != 'gelu_tanh' or not m['tied_embeddings']:
    raise ValueError(f'spec model {m} is not the gpt2 / tanh-GELU / tied model this harness builds')
  return ModelConfig(vocab_size=m['vocab'], d_model=m['d_model'], n_layer=m['n_layer'], n_head=m['n_head'],
                     d_ff=m['mlp_ratio'] * m['d_model'], max_len=m['n_ctx'], style='gpt2',
                     norm_eps=m['layer_norm_eps'], dropout=m['dropout'], init_std=m['init_std'],
                     dtype=spec['dtype'], param_dtype=spec['dtype'])


def non_embedding_params(spec) -> int:
  m = spec['model']
  d, n_layer = m['d_model'], m['n_layer']
  return n_layer * (12 * d * d + 13 * d) + 2 * d


def fwd_flops_per_token(spec, n_ctx: int, head: bool = False) -> int:
  """Kaplan et al. 2020: C_fwd = 2N + 2 n_layer n_ctx d_model; head adds the tied LM head 2 d V."""
  m = spec['model']
  return (2 * non_embedding_params(spec) + 2 * m['n_layer'] * n_ctx * m['d_model']
          + (2 * m['d_model'] * m['vocab'] if head else 0))


def init_params(model, seed: int):
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  tokens = jnp.zeros((1, 4), jnp.int32)
  return jax.jit(lambda k: nn.meta.unbox(model.init(k, tokens)))(jax.random.key(seed))['params']


def uniform_tokens(spec, rng: np.random.Generator, *shape):
  return rng.integers(0, spec['model']['vocab'], size=shape, dtype=np.int32)


# ---------------------------------------------------------------------------------------------
# Timing


def time_calls(fn: Callable[[int], Any], warmup: int, repeats: int):
  """Seconds of each of `repeats` timed calls fn(i), after `warmup` untimed ones; i counts all calls.
  fn(i) must block on its results. Returns (times, the last call's result)."""
  out = None
  for i in range(warmup):
    out = fn(i)
  times = []
  for i in range(warmup, warmup + repeats):
    t = time.perf_counter()
    out = fn(i)
    times.append(time.perf_counter() - t)
  return times, out


def compile_timed(jitted, *args):
  """Ahead-of-time compile `jitted` for `args`: (the compiled executable, seconds to lower + compile)."""
  t = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  return compiled, time.perf_counter() - t


# ---------------------------------------------------------------------------------------------
# Workloads


def run_peak(ctx: Ctx):
  import jax
  import jax.numpy as jnp
  c = ctx.spec['peak']
  n = c['matmul_n']
  flop = 2 * n ** 3
  rng = np.random.default_rng(0)
  a, b = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
  ja, jb = jax.device_put(a), jax.device_put(b)
  matmul = jax.jit(jnp.matmul)
  best = 0.0
  for name, fn in (('PEAK_NUMPY', lambda i: a @ b),
                   ('PEAK_JAX', lambda i: matmul(ja, jb).block_until_ready())):
    log(f'{name}: {c["warmup"]} warm-up + {c["repeats"]} repeats of a {n}x{n} matmul')
    ts, _ = time_calls(fn, c['warmup'], c['repeats'])
    best_rate = flop / min(ts) / 1e9
    ctx.emit(name, 'gflops', flop / statistics.median(ts) / 1e9, ts, n=n, best_gflops=best_rate)
    best = max(best, best_rate)
  ctx.peak_gflops = best


def _gen_setup(ctx: Ctx):
  """GEN's model, params, prompts, mask and per-call keys, on a data-parallel mesh over every
  device: on a CPU host, the --host-devices CPU devices (one per core by default). XLA's CPU
  runtime runs one operation at a time and its batched dots (the decode step's attention over the
  cache) on one thread, so two devices, each sampling half the batch, keep both cores busy where
  one device leaves one idle for much of a step. The train steps run on one device (see
  `_train_step_setup`). Returns (model, mesh, params, prompts, mask, keys)."""
  import jax
  import jax.numpy as jnp
  from rlhf_jax import sharding
  from rlhf_jax.model import Transformer
  g = ctx.spec['gen']
  model = Transformer(model_config(ctx.spec))
  mesh = sharding.make_mesh()
  sharding.check_batch(g['prompts'], mesh, 'gen.prompts')
  _, shardings = sharding.abstract_and_shardings(lambda k: model.init(k, jnp.zeros((1, 4), jnp.int32)),
                                                 mesh, jax.random.key(0))
  params = jax.device_put(init_params(model, ctx.spec['seeds']['policy']), shardings['params'])
  rng = np.random.default_rng(ctx.spec['seeds']['data'])
  ids = uniform_tokens(ctx.spec, rng, g['prompts'], g['prompt_len'])
  prompts, mask = sharding.shard_batch((ids, np.ones_like(ids)), mesh)
  base = jax.random.key(ctx.spec['seeds']['sample'])
  # Per-call keys are made ahead of time so that no key derivation sits inside a timed call.
  n_calls = g['warmup'] + max(g['repeats'], g['nocache_repeats'])
  keys = [jax.block_until_ready(jax.random.fold_in(base, i)) for i in range(n_calls)]
  return model, mesh, params, prompts, mask, keys


def _emit_gen(ctx: Ctx, name: str, ts, **extra):
  g = ctx.spec['gen']
  n_ctx = g['prompt_len'] + g['new_tokens']
  rate = g['prompts'] * g['new_tokens'] / statistics.median(ts)
  ctx.emit(name, 'new_tokens_per_s', rate, ts, mfu=ctx.mfu(rate, fwd_flops_per_token(ctx.spec, n_ctx)),
           mfu_with_head=ctx.mfu(rate, fwd_flops_per_token(ctx.spec, n_ctx, head=True)), **extra)


def _check_gen(out, g):
  shape = (g['prompts'], g['new_tokens'])
  if out['tokens'].shape != shape or int(out['mask'].sum()) != shape[0] * shape[1]:
    raise RuntimeError(f'generate returned {out["tokens"].shape}, {int(out["mask"].sum())} real tokens')


def run_gen(ctx: Ctx):
  import jax
  from rlhf_jax.sampling import SampleConfig, make_generate
  g = ctx.spec['gen']
  model, mesh, params, prompts, mask, keys = _gen_setup(ctx)
  scfg = SampleConfig(max_new_tokens=g['new_tokens'], temperature=g['temperature'], top_k=g['top_k'],
                      top_p=g['top_p'], eos_id=None)
  gen, compile_s = compile_timed(make_generate(model, scfg, mesh), params, prompts, mask, keys[0])
  log(f'GEN: compiled in {compile_s:.1f} s; {g["warmup"]} warm-up + {g["repeats"]} repeats, '
      f'{g["prompts"]} x ({g["prompt_len"]} + {g["new_tokens"]}) tokens, mesh {dict(mesh.shape)}')
  ts, out = time_calls(lambda i: jax.block_until_ready(gen(params, prompts, mask, keys[i])),
                       g['warmup'], g['repeats'])
  _check_gen(out, g)
  _emit_gen(ctx, 'GEN', ts, compile_s=compile_s)


def make_generate_nocache(model, scfg, prompt_len: int, mesh):
  """Sampling without a KV cache: every step runs the full forward over a fixed [B, P + N] buffer
  (slots past the current length hold placeholder tokens that the causal mask hides from earlier
  slots) and samples from the slot of the last real token."""
  import jax
  import jax.numpy as jnp
  from rlhf_jax.sampling import sample_logits
  N = scfg.max_new_tokens

  def generate(params, prompts, key):
    B = prompts.shape[0]
    buf = jnp.zeros((B, prompt_len + N), jnp.int32).at[:, :prompt_len].set(prompts)
    uniforms = jax.random.uniform(key, (N, B))

    def step(i, carry):
      buf, logps = carry
      h, _ = model.apply({'params': params}, buf, method='trunk')
      last = jax.lax.dynamic_index_in_dim(h, prompt_len - 1 + i, axis=1, keepdims=False)  # [B, D]
      tok, logp = sample_logits(model.apply({'params': params}, last, method='logits'), uniforms[i], scfg)
      buf = jax.lax.dynamic_update_index_in_dim(buf, tok.astype(jnp.int32), prompt_len + i, axis=1)
      return buf, logps.at[:, i].set(logp)

    buf, logps = jax.lax.fori_loop(0, N, step, (buf, jnp.zeros((B, N), jnp.float32)))
    return {'tokens': buf[:, prompt_len:], 'logprobs': logps, 'mask': jnp.ones((B, N), jnp.int32)}

  from rlhf_jax import sharding
  return jax.jit(sharding.under_rules(generate, mesh))


def run_gen_nocache(ctx: Ctx):
  import jax
  from rlhf_jax.sampling import SampleConfig
  g = ctx.spec['gen']
  model, mesh, params, prompts, _, keys = _gen_setup(ctx)
  scfg = SampleConfig(max_new_tokens=g['new_tokens'], temperature=g['temperature'], top_k=g['top_k'],
                      top_p=g['top_p'], eos_id=None)
  gen, compile_s = compile_timed(make_generate_nocache(model, scfg, g['prompt_len'], mesh),
                                 params, prompts, keys[0])
  log(f'GEN_NOCACHE: compiled in {compile_s:.1f} s; {g["nocache_repeats"]} repeats, no warm-up run')
  ts, out = time_calls(lambda i: jax.block_until_ready(gen(params, prompts, keys[i])),
                       0, g['nocache_repeats'])
  _check_gen(out, g)
  L = g['prompt_len'] + g['new_tokens']
  _emit_gen(ctx, 'GEN_NOCACHE', ts, compile_s=compile_s,
            note=f'each step runs a full {L}-token forward over a fixed [B, {L}] buffer '
                 f'(the peer recomputes {g["prompt_len"]}..{L - 1} tokens)')


def _train_step_setup(ctx: Ctx, model, seed_name: str):
  """A TrainState of `model` with the spec's AdamW on one device, and its mesh and shardings.

  One device, not GEN's data-parallel mesh: a train step's matmuls are large enough for XLA's
  threaded matmul to keep every core busy, and splitting the batch over two CPU devices added the
  gradient all-reduce (measured: SFT step 0.90x, RM step 1.02x the one-device speed)."""
  import jax
  import jax.numpy as jnp
  import optax
  from rlhf_jax import sharding
  from rlhf_jax import state as state_lib
  o = ctx.spec['optimizer']
  tx = optax.adamw(o['lr'], b1=o['betas'][0], b2=o['betas'][1], eps=o['eps'], weight_decay=o['weight_decay'])
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  tokens = jnp.zeros((1, 8), jnp.int32)
  state, shardings = state_lib.create(lambda k: model.init(k, tokens)['params'], tx, mesh, ctx.spec['seeds'][seed_name])
  return tx, mesh, state, shardings


def _time_steps(name: str, c, step, state, batch):
  """Compile `step` (timed apart), then the spec's warm-up and timed repeats, state threaded
  through (it is donated). Returns (per-step times, compile seconds)."""
  import jax
  t = time.perf_counter()
  step = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t
  holder = [state]

  def run():
    holder[0], m = step(holder[0], batch)
    return jax.block_until_ready(m)

  log(f'{name}: compiled in {compile_s:.1f} s; {c["warmup"]} warm-up + {c["repeats"]}x{c["steps_per_repeat"]} steps')
  for _ in range(c['warmup']):
    run()
  times = []
  for _ in range(c['repeats']):
    t0 = time.perf_counter()
    for _ in range(c['steps_per_repeat']):
      run()
    times.append((time.perf_counter() - t0) / c['steps_per_repeat'])
  return times, compile_s


def sft_step(ctx: Ctx):
  """(jitted step, state, batch) of the SFT workload: the project's own `steps.sft_step` (loss on
  every next token, as the spec asks: a loss mask of ones), AdamW from the spec, state donated."""
  from rlhf_jax import sharding, steps
  from rlhf_jax.model import Transformer
  c = ctx.spec['sft']
  model = Transformer(model_config(ctx.spec))
  tx, mesh, state, shardings = _train_step_setup(ctx, model, 'policy')
  ids = uniform_tokens(ctx.spec, np.random.default_rng(ctx.spec['seeds']['data']), c['batch'], c['seq'])
  ones = np.ones_like(ids)
  batch = sharding.shard_batch({'tokens': ids, 'positions': np.broadcast_to(np.arange(c['seq']), ids.shape).copy(),
                                'mask': ones, 'loss_mask': ones}, mesh)
  return steps.compile_step(steps.sft_step, mesh, shardings, tuple(batch), model=model, tx=tx), state, batch


def run_sft(ctx: Ctx):
  """The SFT workload (`sft_step`)."""
  c = ctx.spec['sft']
  step, state, batch = sft_step(ctx)
  times, compile_s = _time_steps('SFT', c, step, state, batch)
  rate = c['batch'] * c['seq'] / statistics.median(times)
  ctx.emit('SFT', 'tokens_per_s', rate, times, mfu=ctx.mfu(rate, 3 * fwd_flops_per_token(ctx.spec, c['seq'])),
           mfu_with_head=ctx.mfu(rate, 3 * fwd_flops_per_token(ctx.spec, c['seq'], head=True)), compile_s=compile_s)


def rm_step(ctx: Ctx):
  """(jitted step, state, batch) of the RM workload: the project's own `steps.reward_step` on 8
  prompts x K = 4 responses as one grouped batch [8, 4, 128] (rank r = response r), the score read at
  the last token, eq. 1 over all 48 pairs (with K equal for every prompt, eq. 1 is the spec's plain
  mean over pairs)."""
  import dataclasses
  from rlhf_jax import sharding, steps
  from rlhf_jax.data import pipeline
  from rlhf_jax.model import Transformer
  c = ctx.spec['rm']
  p, k, seq = c['prompts'], c['k'], c['seq']
  model = Transformer(dataclasses.replace(model_config(ctx.spec), lm_head=False, scalar_head=True))
  tx, mesh, state, shardings = _train_step_setup(ctx, model, 'reward')
  ids = uniform_tokens(ctx.spec, np.random.default_rng(ctx.spec['seeds']['data']), p * k, seq).reshape(p, k, seq)
  batch = sharding.shard_batch({
      'tokens': ids, 'mask': np.ones_like(ids), 'positions': np.broadcast_to(np.arange(seq), ids.shape).copy(),
      'read_at': np.full((p, k), seq - 1, np.int32), 'ranks': np.broadcast_to(np.arange(k, dtype=np.int32), (p, k)).copy(),
      'valid': np.ones((p, k), np.int32)}, mesh)
  return steps.compile_step(steps.reward_step, mesh, shardings, pipeline.RANKING_FIELDS, model=model, tx=tx), state, batch


def run_rm(ctx: Ctx):
  """The RM workload (`rm_step`)."""
  c = ctx.spec['rm']
  p, k = c['prompts'], c['k']
  step, state, batch = rm_step(ctx)
  times, compile_s = _time_steps('RM', c, step, state, batch)
  pairs = p * k * (k - 1) // 2
  ctx.emit('RM', 'comparisons_per_s', pairs / statistics.median(times), times, compile_s=compile_s)


def _ppo_setup(ctx: Ctx):
  """The project's PPO pieces for the spec's PPO workload, built the way `trainer.train_ppo` builds
  them: (models, cfg, tx, mesh, state, shardings, ref_params, rm_params, batch, sample_cfg)."""
  import dataclasses
  import jax
  import jax.numpy as jnp
  import optax
  from rlhf_jax import ppo, sharding
  from rlhf_jax.model import Transformer
  s, g, c, o = ctx.spec, ctx.spec['gen'], ctx.spec['ppo'], ctx.spec['optimizer']
  if c['minibatches'] * c['minibatch_size'] != g['prompts']:
    raise ValueError(f'spec ppo: {c["minibatches"]} minibatches of {c["minibatch_size"]} != {g["prompts"]} rollouts')
  policy = Transformer(model_config(s))
  rm = Transformer(dataclasses.replace(model_config(s), lm_head=False, scalar_head=True))
  # No EOS: the spec samples exactly new_tokens tokens, so the stop id is one no token can take.
  models = ppo.Models(policy=policy, value=rm, reward=rm, reference=policy, vocab_size=None, stop_id=-1)
  cfg = ppo.PPOConfig(beta=c['kl_coef'], adaptive_kl=False, kl_estimator='k1', gamma=c['gamma'], lam=c['lam'],
                      clip=c['cliprange'], value_clip=c['cliprange_value'], vf_coef=c['vf_coef'], ent_coef=0.0,
                      epochs=c['epochs'], minibatches=c['minibatches'], whiten_rewards=False,
                      whiten_advantages=True, temperature=g['temperature'], recompute_logprobs=False,
                      ema_decay=0.0)
  adamw = optax.adamw(o['lr'], b1=o['betas'][0], b2=o['betas'][1], eps=o['eps'], weight_decay=o['weight_decay'])
  tx = ppo.make_tx(adamw, adamw)
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  example = jnp.zeros((1, 8), jnp.int32)
  init_fn = ppo.make_init(lambda k: policy.init(k, example)['params'], lambda k: rm.init(k, example)['params'],
                          tx, cfg)
  state, shardings = sharding.init_sharded(init_fn, mesh, s['seeds']['sample'])
  # Policy M (seed policy) and R (seed reward); the state is donated every iteration, so the
  # reference, the RM and the (unused) EMA each get buffers of their own.
  fresh = lambda tree: jax.tree.map(lambda x: x + jnp.zeros((), x.dtype), tree)  # noqa: E731
  put = lambda tree, sh: jax.device_put(tree, sh)  # noqa: E731
  policy_params = put(init_params(policy, s['seeds']['policy']), shardings.params['policy'])
  rm_params = init_params(rm, s['seeds']['reward'])
  state = state.replace(params={'policy': policy_params,
                                'value': put(fresh(rm_params), shardings.params['value'])},
                        ema=fresh(policy_params))
  ref_params = fresh(policy_params)
  prompts = uniform_tokens(s, np.random.default_rng(s['seeds']['data']), g['prompts'], g['prompt_len'])
  batch = sharding.shard_batch({'prompt_ids': prompts, 'prompt_mask': np.ones_like(prompts)}, mesh)
  sample_cfg = ppo.sample_config(cfg, models, max_new_tokens=g['new_tokens'], eos_id=None, pad_id=0)
  return models, cfg, tx, mesh, state, shardings, ref_params, rm_params, batch, sample_cfg


def run_ppo(ctx: Ctx):
  """The PPO workload through the project's own `ppo.rollout`, `ppo.score` and `ppo.update`,
  jitted as `trainer.train_ppo` jits them (the update donates the state; all 4 epochs x 4
  minibatches = 16 AdamW steps run in one scan). One iteration = rollout, scoring (with rewards,
  GAE and whitening), update; each phase blocks on its results and is timed on its own.

  With the default `ppo.recompute_logprobs=False` the rollout's log-probs are reused (as TRL does),
  so scoring runs 3 forwards (reference, value, reward), not the spec's 4; the sampler's log-probs
  equal a fresh forward's (tests/sampling_test.py::test_logprobs_match_recomputed_logprobs_at_temperature).
  The EMA of the policy is off (`ema_decay=0`, the spec has none): it is then only carried in the
  state, never updated."""
  import functools
  import jax
  from rlhf_jax import ppo, sharding
  g, c = ctx.spec['gen'], ctx.spec['ppo']
  models, cfg, tx, mesh, state, shardings, ref_params, rm_params, batch, sample_cfg = _ppo_setup(ctx)
  under = lambda f: sharding.under_rules(f, mesh)  # noqa: E731
  gen = jax.jit(under(functools.partial(ppo.rollout, models=models, sample_cfg=sample_cfg)))
  score = jax.jit(under(functools.partial(ppo.score, models=models, cfg=cfg)))
  upd = jax.jit(under(functools.partial(ppo.update, models=models, cfg=cfg, tx=tx)),
                out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)

  compile_s = {}
  gen, compile_s['gen'] = compile_timed(gen, state, batch)
  sample = gen.out_info
  score, compile_s['score'] = compile_timed(score, state, ref_params, rm_params, batch, sample)
  upd, compile_s['update'] = compile_timed(upd, state, score.out_info[0])
  log(f'PPO: compiled in {sum(compile_s.values()):.1f} s ('
      + ', '.join(f'{k} {v:.1f} s' for k, v in compile_s.items()) + f'); {c["warmup"]} warm-up + '
      f'{c["repeats"]} iterations of {g["prompts"]} x ({g["prompt_len"]} + {g["new_tokens"]}) tokens, '
      f'{cfg.epochs * cfg.minibatches} optimizer steps each')

  holder, phases = [state], []

  def iteration(i):
    t0 = time.perf_counter()
    sample = jax.block_until_ready(gen(holder[0], batch))
    t1 = time.perf_counter()
    rollouts, m = jax.block_until_ready(score(holder[0], ref_params, rm_params, batch, sample))
    t2 = time.perf_counter()
    holder[0], mu = jax.block_until_ready(upd(holder[0], rollouts))
    t3 = time.perf_counter()
    phases.append((t1 - t0, t2 - t1, t3 - t2))
    return sample, {**m, **mu}

  times, (sample, metrics) = time_calls(iteration, c['warmup'], c['repeats'])
  _check_gen(sample, g)
  if int(holder[0].step) != c['warmup'] + c['repeats'] or int(holder[0].bad_step) >= 0:
    raise RuntimeError(f'PPO state after {len(phases)} iterations: step {int(holder[0].step)}, '
                       f'bad_step {int(holder[0].bad_step)}')
  gen_s, score_s, train_s = (sum(p[k] for p in phases[c['warmup']:]) for k in range(3))
  tot = gen_s + score_s + train_s
  log('PPO: last iteration ' + ', '.join(f'{k}={float(metrics[k]):.4g}' for k in
                                         ('objective/kl', 'ppo/policy_loss', 'ppo/value_loss', 'ppo/approx_kl')))
  ctx.emit('PPO', 's_per_iter', statistics.median(times), times, gen_share=gen_s / tot, score_share=score_s / tot,
           train_share=train_s / tot, optimizer_steps=cfg.epochs * cfg.minibatches,
           compile_s=sum(compile_s.values()), **{f'compile_{k}_s': v for k, v in compile_s.items()})


WORKLOADS: dict[str, Callable[[Ctx], None]] = {
    'PEAK': run_peak,
    'SFT': run_sft,
    'RM': run_rm,
    'GEN': run_gen,
    'GEN_NOCACHE': run_gen_nocache,
    'PPO': run_ppo,
}


# ---------------------------------------------------------------------------------------------
# ENV and main


def cpu_name() -> str:
  try:
    first = open('/proc/cpuinfo').read().split('\n\n')[0]
  except OSError:
    return platform.processor() or 'unknown'
  info = {k.strip(): v.strip() for k, v in (ln.split(':', 1) for ln in first.splitlines() if ':' in ln)}
  return f"{info.get('model name')} (family {info.get('cpu family')}, model {info.get('model')})"


def env_record(ctx: Ctx):
  import flax
  import jax
  import jaxlib
  devices = jax.devices()
  ctx.emit('ENV', 'info', 0.0,
           date=datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
           cpu=cpu_name(), nproc=os.cpu_count(), threads=ctx.spec['threads'],
           threads_note=('XLA CPU default thread pool (one thread per available core); '
                         + ', '.join(f'{v}={os.environ.get(v)}' for v in THREAD_VARS) + ' for numpy'),
           affinity_cpus=len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else None,
           python=platform.python_version(), jax=jax.__version__, jaxlib=jaxlib.__version__,
           flax=flax.__version__, numpy=np.__version__, backend=jax.default_backend(),
           devices=f'{len(devices)} x {devices[0].device_kind}', host_devices=jax.config.jax_num_cpu_devices,
           xla_flags=os.environ.get('XLA_FLAGS', ''),
           host_malloc_retain=hostmem.applied, spec_sha=ctx.spec_sha)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--workload', nargs='+', action='extend', default=None, metavar='NAME',
                 help=f'workloads to run (default: all): {", ".join(WORKLOADS)}')
  p.add_argument('--tag', default='')
  p.add_argument('--spec', type=Path, default=DEFAULT_SPEC)
  p.add_argument('--host-devices', type=int, default=None, metavar='N',
                 help="CPU devices JAX makes of this host (default: the spec's threads, one device per "
                      'core); GEN runs data-parallel over them, the train steps on the first')
  args = p.parse_args(argv)
  names = [n.upper() for n in (args.workload or list(WORKLOADS))]
  unknown = [n for n in names if n not in WORKLOADS]
  if unknown:
    p.error(f'unknown workload(s) {unknown}; valid: {", ".join(WORKLOADS)}')
  args.workload = [n for n in WORKLOADS if n in names]  # table order: PEAK (the MFU peak) first
  return args


def main(argv=None):
  args = parse_args(argv)
  raw = args.spec.read_bytes()
  ctx = Ctx(spec=json.loads(raw), spec_sha=hashlib.sha256(raw).hexdigest()[:12], tag=args.tag)
  import jax
  # Before any JAX operation: the CPU backend's device count is fixed when it starts.
  jax.config.update('jax_num_cpu_devices', args.host_devices or ctx.spec['threads'])
  env_record(ctx)
  if 'PEAK' not in args.workload:
    log('PEAK not run: MFU fields will be NaN')
  for name in args.workload:
    t = time.perf_counter()
    WORKLOADS[name](ctx)
    log(f'{name} done in {time.perf_counter() - t:.1f} s')


if __name__ == '__main__':
  main()
