"""Shared pieces of experiment configs: model sizes, the `:arg` parser, the smoke override.

A config file's `get_config(arg)` receives what follows the colon in
`--config=experiments/sft.py:tiny` (or `size=1.3b,smoke=True`), parsed by `parse_arg`. A full-size
config laid out for a machine: `size=6b,target=v4-64` (the table `TARGETS`, the mesh `mesh_for`).
"""
from __future__ import annotations

import math

import ml_collections

# InstructGPT policies are GPT-3 shapes (Brown et al. 2020, Table 2.1) with the GPT-2 BPE
# vocabulary and a 2048-token context. 'tiny' and 'smoke' are the CPU sizes of the embedded task
# (byte tokenizer: 259 ids, padded to 320 so the vocabulary shards over tensor <= 64).
SIZES = {
    'smoke': dict(d_model=32, n_layer=2, n_head=2, d_ff=64, vocab_size=320, max_len=128),
    'tiny': dict(d_model=128, n_layer=4, n_head=4, d_ff=512, vocab_size=320, max_len=128),
    '1.3b': dict(d_model=2048, n_layer=24, n_head=16, d_ff=8192, vocab_size=50304, max_len=2048),
    '6b': dict(d_model=4096, n_layer=32, n_head=32, d_ff=16384, vocab_size=50304, max_len=2048),
    '175b': dict(d_model=12288, n_layer=96, n_head=96, d_ff=49152, vocab_size=50304, max_len=2048),
}
CPU_SIZES = ('smoke', 'tiny')


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """'smoke' -> smoke=True (a bare boolean field); 'tiny' -> size=tiny (a bare value is the size);
  'size=1.3b,mix=True' -> fields. Unknown fields fail by name."""
  out = dict(defaults)
  for part in filter(None, (arg or '').split(',')):
    if '=' not in part:
      if isinstance(out.get(part), bool):
        key, value = part, 'true'
      elif 'size' in out:
        key, value = 'size', part
      else:
        raise ValueError(f'config arg {part!r}: not a boolean field and this config has no size')
    else:
      key, value = part.split('=', 1)
    if key not in out:
      raise ValueError(f'unknown config arg {key!r}; valid: {sorted(out)}')
    default = out[key]
    out[key] = (value.lower() in ('1', 'true', 'yes')) if isinstance(default, bool) else type(default)(value)
  if 'size' in out and out['size'] not in SIZES:
    raise ValueError(f"unknown size {out['size']!r}; valid: {sorted(SIZES)}")
  return ml_collections.ConfigDict(out)


def model(size: str, **overrides) -> ml_collections.ConfigDict:
  """Every ModelConfig field, so that command-line overrides of any of them work."""
  from rlhf_jax.model import ModelConfig
  import dataclasses
  fields = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
  fields.update(style='gpt2', n_kv_head=0, tie_embeddings=True, **SIZES[size])
  if size not in CPU_SIZES:
    # Accelerators: bf16 compute on f32 parameters, and layers recomputed in the backward pass. Without
    # remat the activations of 6B PPO take 65 GiB a chip on a v4-64 (`python -m rlhf_jax.memory`).
    fields.update(dtype='bfloat16', remat='full')
  fields.update(overrides)
  return ml_collections.ConfigDict(fields)


def tokenizer(data: str) -> ml_collections.ConfigDict:
  """The embedded task's byte tokenizer, or GPT-2 BPE (from ../shared/data) for real data."""
  if data == 'synthetic':
    return ml_collections.ConfigDict(dict(kind='byte'))
  return ml_collections.ConfigDict(dict(kind='gpt2_bpe', encoder_json='../shared/data/tokenizers/gpt2/encoder.json',
                                        vocab_bpe='../shared/data/tokenizers/gpt2/vocab.bpe'))


def mesh(data: int = -1, fsdp: int = 1, tensor: int = 1) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor))


# ----------------------------------------------------------------------------
# Scale targets: the machines the full-size configs are laid out for (`target=` in a config arg).
#
# A JAX device is a TPU chip (v4 and v5p chips have two TensorCores that JAX drives as one device,
# so a v4-64 or v5p-256 slice, named by TensorCores, has 32 or 128 devices; v5e names count chips)
# or one GPU. `per_host`: devices per TPU VM host or per GPU node. `memory_gib`: HBM per device.
# The fast domain, where collectives on every layer are cheap, is the whole slice on TPU (ICI
# connects every chip of a slice) and one node on GPU (NVLink; nodes talk over InfiniBand).
TARGETS = {
    'v4-8': dict(kind='tpu', devices=4, per_host=4, memory_gib=32.0),        # 1 host
    'v4-64': dict(kind='tpu', devices=32, per_host=4, memory_gib=32.0),      # 8 hosts
    'v4-256': dict(kind='tpu', devices=128, per_host=4, memory_gib=32.0),    # 32 hosts
    'v5p-128': dict(kind='tpu', devices=64, per_host=4, memory_gib=95.0),    # 16 hosts
    'v5p-256': dict(kind='tpu', devices=128, per_host=4, memory_gib=95.0),   # 32 hosts
    'v5litepod-256': dict(kind='tpu', devices=256, per_host=4, memory_gib=16.0),  # v5e; 64 hosts
    'gpu-8xh100': dict(kind='gpu', devices=8, per_host=8, memory_gib=80.0),     # 1 node
    'gpu-64xh100': dict(kind='gpu', devices=64, per_host=8, memory_gib=80.0),   # 8 nodes
    'gpu-256xh100': dict(kind='gpu', devices=256, per_host=8, memory_gib=80.0),  # 32 nodes
}
MAX_TENSOR = 8   # the widest tensor axis: one GPU node, or a 2x2x2 cube of TPU chips on ICI


def mesh_for(size: str, target: str, batch: int | None = None) -> ml_collections.ConfigDict:
  """The (data, fsdp, tensor) mesh of a model size on a target, all devices used.

  Parameters, gradients and Adam's moments (16 bytes per parameter in f32) are sharded over fsdp
  (ZeRO-3: one all-gather of the weights per layer forward and backward, one reduce-scatter of
  the gradients), so fsdp belongs where bandwidth is high; data parallelism costs one gradient
  all-reduce per step and spans the slow links. Tensor parallelism (Megatron) splits every
  matmul and all-reduces activations twice per layer, so it stays inside a node or a host.

  * smoke, tiny: data parallel on every device (the model is a few MB).
  * 1.3b (21 GB of f32 state): fsdp over one host's devices (4 TPU chips, 8 GPUs), data across
    hosts: the weight gathers stay on a host's links, only the gradient all-reduce crosses hosts.
  * 6b (96 GB of state, more than a host of 32 GiB TPUs holds with activations): TPU: fsdp over
    the whole slice (all ICI). GPU: fsdp over a node (12 GB a GPU), data across nodes.
  * 175b (2.8 TB of state, layers of 12288 x 49152): tensor 4 on TPU (one host's chips) or 8 on
    GPU (one node), which also shrinks each device's activations, and fsdp over the rest.

  batch: what every sharded batch of the config divides (the gcd of its batch sizes). A batch is
  split over data x fsdp, so while it does not divide that product, the tensor axis doubles (up
  to MAX_TENSOR), taking devices from data first (so fsdp stays within a host), then from fsdp.
  If no such mesh exists, the rule's mesh is returned and `use_target` names the batch keys.
  """
  if target not in TARGETS:
    raise ValueError(f'unknown target {target!r}; valid: {sorted(TARGETS)}')
  if size not in SIZES:
    raise ValueError(f'unknown size {size!r}; valid: {sorted(SIZES)}')
  t = TARGETS[target]
  n, host, gpu = t['devices'], t['per_host'], t['kind'] == 'gpu'
  if size in CPU_SIZES:
    data, fsdp, tensor = n, 1, 1
  elif size == '1.3b':
    data, fsdp, tensor = n // host, host, 1
  elif size == '6b':
    data, fsdp, tensor = (n // host, host, 1) if gpu else (1, n, 1)
  else:
    tensor = host                 # the host's or node's devices
    data, fsdp = 1, n // tensor
  preferred = mesh(data, fsdp, tensor)
  while batch and batch % (data * fsdp) and tensor < MAX_TENSOR and (data * fsdp) % 2 == 0:
    tensor *= 2
    if data % 2 == 0:
      data //= 2
    else:
      fsdp //= 2
  return preferred if batch and batch % (data * fsdp) else mesh(data, fsdp, tensor)


def target(name: str = '') -> ml_collections.ConfigDict:
  """The record `config.target` of the machine a config was laid out for ('' = any machine: the
  mesh is `mesh()` and the device count is what JAX finds). The memory estimate reads it."""
  if not name:
    return ml_collections.ConfigDict(dict(name='', kind='', devices=0, per_host=0, memory_gib=0.0))
  if name not in TARGETS:
    raise ValueError(f'unknown target {name!r}; valid: {sorted(TARGETS)}')
  return ml_collections.ConfigDict(dict(name=name, **TARGETS[name]))


def use_target(c: ml_collections.ConfigDict, size: str, name: str, batches: dict[str, int]) -> None:
  """Set `c.target` and, for a named target, `c.mesh = mesh_for(size, name)`. Nothing else is
  changed: if a batch of `batches` (config key -> global batch) does not split over the mesh's
  data x fsdp, this raises naming the keys, rather than changing a batch size behind your back."""
  c.target = target(name)
  if not name:
    return
  c.mesh = mesh_for(size, name, math.gcd(*batches.values()))
  shards = c.mesh.data * c.mesh.fsdp
  bad = {k: v for k, v in batches.items() if v % shards}
  if bad:
    raise ValueError(
        f'target={name}: size={size} gets the mesh (data, fsdp, tensor)=({c.mesh.data}, {c.mesh.fsdp}, '
        f'{c.mesh.tensor}), which splits every batch {shards} ways, but '
        + ', '.join(f'{k}={v}' for k, v in bad.items())
        + f' {"is" if len(bad) == 1 else "are"} not divisible by {shards}. Use a target with fewer devices, '
        'or set config.mesh yourself (without target=) together with larger batches.')
