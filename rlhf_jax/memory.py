"""Will it fit? Per-device memory of one stage's config at full size, estimated on any machine.

python -m rlhf_jax.memory --config=experiments/ppo.py:size=6b,target=v4-64
python -m rlhf_jax.memory --config=experiments/ppo.py:size=175b,target=v5p-256 --reward_size=6b
python -m rlhf_jax.memory --config=experiments/instructgpt.py:size=1.3b,target=v4-64   # every stage

Counted per device, in bytes:
  * the train state (parameters and optimizer state; PPO: policy and value network, and the EMA
    of the policy) and the frozen models (PPO: the reference policy and the reward model). Shapes
    come from `jax.eval_shape` of the init functions the trainer uses; each array's shard from its
    logical axis names (resolved by `sharding.RULES`) and the mesh's axis sizes, on an
    AbstractMesh: no device is touched and nothing is allocated, so a 175B model on 256 devices
    is estimated on a laptop;
  * gradients, one per trainable parameter, sharded like it;
  * activations kept for the backward pass of one train step (`activation_bytes`), with and
    without rematerialisation;
  * PPO: the rollout's KV cache (`kv_cache_bytes`).

total = state + frozen models + max(gradients + activations, KV cache): the update and the rollout
are separate jitted functions, so their transients are never alive together. The activations in
the total are those of the config's `model.remat`. Not counted: XLA's temporaries and buffer
fragmentation, the forward-only scoring pass, the batch itself and the runtime's reserve; leave
10-20 % headroom.

The RM's and the value network's shape is the RM checkpoint's at run time, which the config does
not name: the estimate assumes the policy's shape, or `reward_model` (`--reward_size=6b`:
InstructGPT's 6B RM and value for every policy size), else the config's `reward.size` (ppo.py's
`rm_size=6b`), else the policy's. For a main-job config (experiments/instructgpt.py) every
training stage is estimated.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import AbstractMesh, AxisType

from rlhf_jax import optim, ppo, sharding, trainer
from rlhf_jax import model as model_lib
from rlhf_jax import state as state_lib

GiB = 2 ** 30
RM_K = 9   # InstructGPT's largest K: the responses per prompt when `data.k_max` is 0 (the data's)

LABELS = {
    'params': 'parameters',
    'opt_state': 'optimizer state',
    'grads': 'gradients (and accumulators)',
    'ema': 'EMA of the policy',
    'reference': 'reference policy (frozen)',
    'reward_model': 'reward model (frozen)',
    'activations_none': 'activations, no remat',
    'activations_dots': 'activations, remat dots',
    'activations_full': 'activations, full remat',
    'kv_cache': 'KV cache of the rollout',
}


# ----------------------------------------------------------------------------
# Shapes and shards, without devices.


def abstract_mesh(axes: Mapping[str, int]) -> AbstractMesh:
  """A (data, fsdp, tensor) mesh of these sizes with no devices behind it (Auto axes, as
  `sharding.make_mesh`)."""
  return AbstractMesh(tuple(axes[a] for a in sharding.AXES), sharding.AXES,
                      axis_types=(AxisType.Auto,) * len(sharding.AXES))


def shard_shape(shape, spec, axes: Mapping[str, int]) -> tuple[int, ...]:
  """The largest shard of an array of `shape` laid out by PartitionSpec `spec` over mesh axes of
  sizes `axes`: each dimension divided (rounded up, as JAX pads an uneven split) by the product of
  the mesh axes it is sharded over."""
  out = []
  for i, dim in enumerate(shape):
    entry = spec[i] if i < len(spec) else None
    names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    out.append(-(-dim // math.prod(axes[a] for a in names)))
  return tuple(out)


def tree_bytes(abstract, specs, axes: Mapping[str, int]) -> int:
  """Bytes on the fullest device of a tree of ShapeDtypeStructs laid out by a tree of
  PartitionSpecs over mesh axes of sizes `axes`."""
  def one(x, spec):
    return math.prod(shard_shape(x.shape, spec, axes)) * np.dtype(x.dtype).itemsize
  return sum(jax.tree.leaves(jax.tree.map(one, abstract, specs)))


# The rules map logical axis names to mesh axis names whatever the axes' sizes, so the mesh-axis
# PartitionSpecs resolved on a one-device mesh hold for every mesh; only the shard shapes differ.
_UNIT = dict.fromkeys(sharding.AXES, 1)


@functools.lru_cache(maxsize=64)
def abstract_state(init_key: tuple, seed: int):
  """(ShapeDtypeStructs, mesh-axis PartitionSpecs) of the state an init function returns, by the
  trainer's own route (`state.abstract` or `sharding.abstract_and_shardings`: `jax.eval_shape` and
  the logical axis names resolved by `sharding.RULES`). `init_key` describes the init and is
  hashable, so that a shape is traced once however many meshes it is then laid out on."""
  abstract, shardings = _abstract_and_shardings(*init_key, seed=seed, mesh=abstract_mesh(_UNIT))
  return abstract, jax.tree.map(lambda s: s.spec, shardings)


def _params_init(cfg: model_lib.ModelConfig, example_len: int):
  """`model.init(key, tokens)['params']`: the trainer's init of one network's parameters."""
  model = model_lib.Transformer(cfg)
  return lambda key: model.init(key, jnp.zeros((1, example_len), jnp.int32))['params']


def _abstract_and_shardings(kind: str, *args, seed: int, mesh):
  """The stages' inits, as the trainer builds them (trainer.train_sft, train_reward, train_ppo)."""
  if kind == 'params':             # a frozen model's parameters: as trainer._abstract_params
    cfg, = args
    init = _params_init(cfg, 8)
    return sharding.abstract_and_shardings(lambda k: init(jax.random.key(k)), mesh, seed)
  if kind == 'state':              # SFT and RM: a TrainState with optim.make(config.optim)
    cfg, example_len, optim_c, total = args
    return state_lib.abstract(_params_init(cfg, example_len), optim.make(dict(optim_c), total), mesh, seed)
  policy, value, optim_c, value_optim_c, ppo_cfg, total = args   # PPO: ppo.make_init
  tx = ppo.make_tx(optim.make(dict(optim_c), total),
                   None if value is None else optim.make(dict(value_optim_c), total))
  init = ppo.make_init(_params_init(policy, 8), None if value is None else _params_init(value, 8), tx, ppo_cfg)
  return sharding.abstract_and_shardings(init, mesh, seed)


# ----------------------------------------------------------------------------
# Activations and the KV cache, from shapes.


def _ceil(a: int, b: int) -> int:
  return -(-a // b)


def layer_bytes_per_token(cfg: model_lib.ModelConfig, seq_len: int, tensor: int, remat: str = 'none') -> int:
  """Bytes one Transformer block keeps per token for its backward pass, on one device.

  No remat: Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
  Models", §4.1 and eq. 2: s·b·h·(10 + 24/t + 5·a·s/(h·t)) bytes per layer with 16-bit activations
  and tensor parallelism t), itemised for this model with p = bytes of `model.dtype`:
    replicated over tensor: both norms' inputs 2·D·p, the QKV and MLP matmul inputs 2·D·p, and the
      two residual-dropout masks 2·D bytes when dropout > 0 (the 10 of eq. 2 when p = 2);
    split over tensor: Q, K, V and the attention output (2·H + 2·Hkv)·Dh·p, the MLP hidden
      2·F·p for gpt2 (the GELU's input and output) or 3·F·p for llama (gate, up, product)
      (the 24 of eq. 2 for gpt2 with F = 4·D and p = 2);
    the attention probabilities H·S' per token, kept in float32 (this model's softmax) plus their
      copy in `model.dtype` that feeds the value matmul when p < 4 (eq. 2 has 5·a·s: 16-bit
      softmax output, dropout mask and dropout output; this model has no attention dropout). S' is
      the mean number of keys a query's block attends to (`model.attention_blocks`): S for one
      block, 5·S/8 for four.
  Full remat (`nothing_saveable`): the block's input only, D·p (eq. 2's "2sbh" when p = 2).
  'dots' (`dots_with_no_batch_dims_saveable`): the input and the outputs of the four weight
  matmuls: QKV (H + 2·Hkv)·Dh·p and the MLP's first F·p (2·F·p for llama) split over tensor, the
  attention output projection and the MLP's output D·p each, replicated.
  """
  p = jnp.dtype(cfg.dtype).itemsize
  D, Dh = cfg.d_model, cfg.head_dim
  kv = _ceil(cfg.kv_heads, tensor)                         # KV heads on one device
  heads = kv * (cfg.n_head // cfg.kv_heads)                # query heads on one device
  F = _ceil(cfg.d_ff, tensor)
  gpt2 = cfg.style == 'gpt2'
  if remat == 'full':
    return D * p
  if remat == 'dots':
    return p * (D + (heads + 2 * kv) * Dh + (1 if gpt2 else 2) * F + 2 * D)
  replicated = 4 * D * p + (2 * D if cfg.dropout > 0 else 0)
  split = p * ((2 * heads + 2 * kv) * Dh + (2 if gpt2 else 3) * F)
  blocks = model_lib.query_blocks(seq_len, cfg.attention_blocks)
  keys = -(-sum((b - a) * b for a, b in blocks) // seq_len)   # S': mean keys per query, rounded up
  scores = heads * keys * (4 + (p if p < 4 else 0))
  return replicated + split + scores


def activation_bytes(cfg: model_lib.ModelConfig, rows: int, seq_len: int, *, batch_shards: int, tensor: int,
                     remat: str = 'none', logits_len: int = 0) -> int:
  """Activations one device keeps between the forward and the backward pass of `rows` sequences
  of `seq_len` tokens (split over `batch_shards` = data x fsdp devices): n_layer blocks (see
  `layer_bytes_per_token`; with remat, plus one block's full set, recomputed during its own
  backward), and the float32 logits [rows, logits_len, V] of the loss, V split over tensor (once:
  the loss's log-softmax may keep another array of that size)."""
  tokens = _ceil(rows, batch_shards) * seq_len
  full = layer_bytes_per_token(cfg, seq_len, tensor) * tokens
  blocks = cfg.n_layer * full
  if remat != 'none':
    blocks = cfg.n_layer * layer_bytes_per_token(cfg, seq_len, tensor, remat) * tokens + full
  logits = _ceil(rows, batch_shards) * logits_len * _ceil(cfg.vocab_size, tensor) * 4
  return blocks + logits


def kv_cache_bytes(cfg: model_lib.ModelConfig, rows: int, length: int, *, batch_shards: int, tensor: int) -> int:
  """The sampler's cache: per layer K and V [B, Hkv, S, Dh] in `model.dtype`, sharded as the
  model constrains them (batch over data x fsdp, KV heads over tensor)."""
  p = jnp.dtype(cfg.dtype).itemsize
  rows, kv = _ceil(rows, batch_shards), _ceil(cfg.kv_heads, tensor)
  return rows * kv * length * cfg.head_dim * 2 * cfg.n_layer * p


# ----------------------------------------------------------------------------
# The estimate.


def models(c: ml_collections.ConfigDict, reward_model: Mapping[str, Any] | None = None) -> dict:
  """The networks of a stage, as the trainer builds them: role -> ModelConfig (None if absent).
  reward_model: ModelConfig fields of the PPO reward model and value network (e.g. a size of
  `experiments.common.SIZES`); default: the policy's shape."""
  policy = trainer.build_model(c).cfg
  if c.stage == 'sft':
    return {'policy': policy}
  if c.stage == 'rm':
    return {'reward': trainer.rm_model(c).cfg}
  cfg = ppo.PPOConfig.from_dict(c.ppo.to_dict())
  gold = c.reward.source == 'gold'
  if reward_model is None and c.reward.get('size'):   # the config's note of the RM's size (InstructGPT: 6b)
    from experiments import common
    reward_model = common.SIZES[c.reward.size]
  shape = {**c.model.to_dict(), **(dict(reward_model or {}) if not gold else {})}
  rm = trainer.rm_model(ml_collections.ConfigDict({'model': shape})).cfg   # gold: the value has the policy's trunk
  shared = cfg.value_model == 'shared'
  return {'policy': policy.replace(scalar_head=True) if shared else policy, 'reference': policy,
          'value': None if shared else rm, 'reward': None if gold else rm}


def _train_passes(c, roles) -> list[list[tuple[model_lib.ModelConfig, int, int, int]]]:
  """(model, rows, sequence length, logits length) of each forward pass whose activations one train
  step keeps for its backward pass, in groups: the passes of a group are alive together, the groups
  one after another (PPO-ptx with ptx_microbatches > 1: the PPO minibatch, then each pretraining
  chunk)."""
  if c.stage == 'sft':
    return [[(roles['policy'], c.train.batch_size, c.data.seq_len, c.data.seq_len)]]
  if c.stage == 'rm':   # one row per response: K of them per prompt; the scalar head, no logits
    k = 2 if c.rm.mode == 'flat' else (c.data.k_max or RM_K)
    return [[(roles['reward'], c.train.batch_size * k, c.data.seq_len, 0)]]
  mb = c.train.batch_size // c.ppo.minibatches     # one PPO minibatch: policy logits over the response
  T, N = c.data.prompt_len + c.data.gen_len, c.data.gen_len
  passes = [(roles['policy'], mb, T, N)]
  if roles['value'] is not None:
    passes.append((roles['value'], mb, T, 0))
  if not c.ppo.ptx_coef:
    return [passes]
  chunks = c.ppo.get('ptx_microbatches', 1)   # PPO-ptx: the pretraining rows of the same minibatch
  ptx = (roles['policy'], c.ppo.ptx_ratio * mb // chunks, c.data.ptx_seq_len, c.data.ptx_seq_len)
  return [passes + [ptx]] if chunks == 1 else [passes, [ptx]]


def _items(d: Mapping) -> tuple:
  return tuple(sorted(d.items()))


def _state_key(c, roles) -> tuple:
  total = max(int(c.train.steps), 1)
  if c.stage in ('sft', 'rm'):
    role = 'policy' if c.stage == 'sft' else 'reward'
    return ('state', roles[role], int(c.data.seq_len), _items(c.optim.to_dict()), total)
  return ('ppo', roles['policy'], roles['value'], _items(c.optim.to_dict()),
          _items(c.value_optim.to_dict()), ppo.PPOConfig.from_dict(c.ppo.to_dict()), total)


def _device_memory() -> int | None:
  """This machine's first device's memory, where the backend reports it (not on CPU)."""
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get('bytes_limit')


def estimate(c: ml_collections.ConfigDict, *, n_devices: int | None = None, memory_gib: float | None = None,
             reward_model: Mapping[str, Any] | None = None) -> dict:
  """Per-device bytes of one stage (`config.stage` sft, rm or ppo) on its mesh.

  Devices: `n_devices`, else the config's target's (`config.target.devices`), else this machine's.
  Memory per device: `memory_gib`, else the target's, else what this machine's device reports.
  Returns {'stage', 'target', 'devices', 'mesh' {data, fsdp, tensor}, 'models' {role: parameter
  count}, 'items' {key of LABELS: bytes}, 'counted' (the items the total adds up), 'remat', 'dtype',
  'total', 'memory' (bytes or None), 'fits' (or None)}.
  """
  if c.stage not in ('sft', 'rm', 'ppo'):
    raise ValueError(f'config.stage={c.stage!r}: the estimate is of one stage; give experiments/sft.py, rm.py '
                     'or ppo.py')
  target = c.get('target') or ml_collections.ConfigDict(dict(name='', devices=0, memory_gib=0.0))
  n = n_devices or target.devices or jax.device_count()
  axes = dict(zip(sharding.AXES, sharding.mesh_shape(**c.mesh.to_dict(), n_devices=n)))
  mesh = abstract_mesh(axes)
  batch_shards, tensor = axes['data'] * axes['fsdp'], axes['tensor']
  roles = models(c, reward_model)

  state, specs = abstract_state(_state_key(c, roles), int(c.seed))
  items = {'params': tree_bytes(state.params, specs.params, mesh.shape),
           'opt_state': tree_bytes(state.opt_state, specs.opt_state, mesh.shape)}
  items['grads'] = items['params']
  trees = {'policy' if c.stage == 'sft' else 'reward': state.params}   # role -> parameter shapes
  if c.stage == 'ppo':
    trees = {k: state.params[k] for k in ('policy', 'value') if k in state.params}
    if getattr(state, 'ema', None) is not None:
      items['ema'] = tree_bytes(state.ema, specs.ema, mesh.shape)
    for role, key, twin in (('reference', 'reference', 'policy'), ('reward', 'reward_model', 'value')):
      if roles[role] is None:
        continue
      if roles[role] == roles.get(twin) and twin in state.params:
        # The same network as one of the state's (the same init, the same axis names): its shapes.
        abstract, spec = state.params[twin], specs.params[twin]
      else:
        abstract, spec = abstract_state(('params', roles[role]), 0)
      items[key], trees[role] = tree_bytes(abstract, spec, mesh.shape), abstract
    if c.ppo.ptx_coef and c.ppo.get('ptx_microbatches', 1) > 1:   # the pretraining gradient's accumulator
      items['grads'] += tree_bytes(state.params['policy'], specs.params['policy'], mesh.shape)

  remat = c.model.remat
  passes = _train_passes(c, roles)
  for mode in ('none', 'dots', 'full') if remat == 'dots' else ('none', 'full'):
    items[f'activations_{mode}'] = max(sum(
        activation_bytes(m, rows, T, batch_shards=batch_shards, tensor=tensor, remat=mode, logits_len=lt)
        for m, rows, T, lt in group) for group in passes)
  if c.stage == 'ppo':
    items['kv_cache'] = kv_cache_bytes(roles['policy'], c.train.batch_size, c.data.prompt_len + c.data.gen_len,
                                       batch_shards=batch_shards, tensor=tensor)

  counted = [k for k in ('params', 'opt_state', 'ema', 'reference', 'reward_model') if k in items]
  step = ['grads', f'activations_{remat}']                 # the update's transients, or the rollout's
  counted += step if sum(items[k] for k in step) >= items.get('kv_cache', 0) else ['kv_cache']
  total = sum(items[k] for k in counted)
  memory = (memory_gib or target.memory_gib) * GiB if (memory_gib or target.memory_gib) else _device_memory()
  counts = {role: model_lib.count_params(trees[role]) for role in roles if role in trees}
  return {'stage': c.stage, 'target': target.name, 'devices': n, 'mesh': axes, 'models': counts, 'items': items,
          'counted': counted, 'remat': remat, 'dtype': c.model.dtype, 'total': total, 'memory': memory,
          'fits': None if memory is None else total <= memory}


def _count(n: int) -> str:
  return f'{n / 1e9:.2f}B' if n >= 1e8 else f'{n / 1e6:.2f}M'


def table(est: dict) -> str:
  """The estimate as a plain-text table, one line per item, GiB per device."""
  m = est['mesh']
  models_line = ', '.join(f'{role} {_count(n)}' for role, n in est['models'].items())
  lines = [f"stage {est['stage']}" + (f" on {est['target']}" if est['target'] else '')
           + f": {est['devices']} devices, mesh data={m['data']} fsdp={m['fsdp']} tensor={m['tensor']}; "
           f"compute {est['dtype']}, remat {est['remat']!r}",
           f'models (parameters): {models_line}',
           f"{'item':<30} {'GiB/device':>10}  in total"]
  for k, v in est['items'].items():
    lines.append(f'{LABELS[k]:<30} {v / GiB:>10.2f}  {"*" if k in est["counted"] else ""}')
  lines.append(f"{'total':<30} {est['total'] / GiB:>10.2f}")
  lines.append('(state + frozen models + max(gradients + activations, KV cache); XLA temporaries not counted)'
               if 'kv_cache' in est['items'] else '(state + gradients + activations; XLA temporaries not counted)')
  if est['memory'] is None:
    lines.append('fits: unknown (no device memory: give a target= in the config or --memory_gib)')
  else:
    pct = 100 * est['total'] / est['memory']
    verdict = 'yes' if est['fits'] else 'NO'
    lines.append(f"fits in {est['memory'] / GiB:.1f} GiB per device: {verdict} ({pct:.0f} %)")
  return '\n'.join(lines)


def main(argv):
  del argv
  from absl import flags
  f = flags.FLAGS
  reward_model = None
  if f.reward_size:
    from experiments import common   # the command runs from the repository root, as rlhf_jax.main does
    if f.reward_size not in common.SIZES:
      raise ValueError(f'--reward_size={f.reward_size!r}; valid: {sorted(common.SIZES)}')
    reward_model = common.SIZES[f.reward_size]
  for name, c, rm in stages(f.config, reward_model):
    if name:
      print(f'\n== {name}')
    print(table(estimate(c, n_devices=f.devices, memory_gib=f.memory_gib, reward_model=rm)))


def stages(c: ml_collections.ConfigDict, reward_model: Mapping[str, Any] | None = None):
  """(name, stage config, reward model shape) of each training stage of a main-job config, or
  ('', c, reward_model) for one stage's config."""
  if c.stage != 'recipe':
    return [('', c, reward_model)]
  from rlhf_jax import recipe
  names = [s.strip() for s in c.stages.split(',') if s.strip() in recipe.INPUTS and s.strip() in c]
  return [(n, c[n], reward_model) for n in sorted(names, key=recipe.ORDER.index)]


if __name__ == '__main__':
  from absl import app, flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file('config', None, 'experiment config file[:arg]', lock_config=True)
  flags.DEFINE_integer('devices', None, "number of devices (default: the config's target's, else this machine's)")
  flags.DEFINE_float('memory_gib', None, "memory per device in GiB (default: the target's, else this machine's)")
  flags.DEFINE_string('reward_size', '', "PPO: the reward model's and value network's size (a size of "
                      "experiments/common.py; default: the policy's); InstructGPT: 6b")
  flags.mark_flags_as_required(['config'])
  app.run(main)
