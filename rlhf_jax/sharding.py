"""Device mesh, the one logical-axis rules table, and sharded creation of state and batches.

Every parameter and key activation is named with logical axes (see model.py); `RULES` maps them
to the mesh axes `data`, `fsdp`, `tensor`. Flax applies the rules in order and never uses a mesh
axis twice in one array, so an activation [batch, length, embed] shards batch over (data, fsdp)
and leaves embed whole, while a parameter [embed, mlp] shards embed over fsdp (ZeRO-3 style) and
mlp over tensor (Megatron style).
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')

RULES: tuple[tuple[str, Any], ...] = (
    ('batch', BATCH_AXES),
    ('length', None),
    ('embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('kv', None),
    ('vocab', 'tensor'),
)


def mesh_shape(data: int = -1, fsdp: int = 1, tensor: int = 1, n_devices: int | None = None) -> tuple[int, int, int]:
  """Resolve one -1 in (data, fsdp, tensor) to the devices left over; check the product."""
  n = jax.device_count() if n_devices is None else n_devices
  shape = [data, fsdp, tensor]
  if shape.count(-1) > 1:
    raise ValueError(f'mesh: at most one of mesh.data/fsdp/tensor may be -1, got {tuple(shape)}')
  known = math.prod(s for s in shape if s != -1)
  if any(s == 0 or s < -1 for s in shape) or n % known:
    raise ValueError(f'mesh (data, fsdp, tensor)={tuple(shape)} does not fit {n} devices')
  shape = [n // known if s == -1 else s for s in shape]
  if math.prod(shape) != n:
    raise ValueError(f'mesh (data, fsdp, tensor)={tuple(shape)} uses {math.prod(shape)} devices, '
                     f'but {n} are present; set one of mesh.data/fsdp/tensor to -1')
  return tuple(shape)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh. Axes are Auto (GSPMD propagates shardings from the named
  parameters and constraints), chosen deliberately over JAX's Explicit default: the train steps
  are written once for every mesh and let the partitioner place intermediates."""
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(data, fsdp, tensor, len(devices))
  return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def logical_to_sharding(logical_specs, mesh: Mesh, rules=RULES):
  """Logical PartitionSpecs (tree) -> NamedShardings (tree)."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def abstract_and_shardings(init_fn: Callable, mesh: Mesh, *args, rules=RULES):
  """Shapes (unboxed) and NamedShardings of what `init_fn(*args)` returns, without computing it."""
  boxed = jax.eval_shape(init_fn, *args)
  shardings = logical_to_sharding(nn.get_partition_spec(boxed), mesh, rules)
  return nn.meta.unbox(boxed), shardings


def init_sharded(init_fn: Callable, mesh: Mesh, *args, rules=RULES):
  """Run `init_fn(*args)` (e.g. `model.init`) under jit with out_shardings, so every parameter
  is created directly on its shards, never whole on one host. Returns (unboxed tree, shardings)."""
  _, shardings = abstract_and_shardings(init_fn, mesh, *args, rules=rules)
  with rules_context(mesh, rules):
    tree = jax.jit(lambda *a: nn.meta.unbox(init_fn(*a)), out_shardings=shardings)(*args)
  return tree, shardings


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Leading (batch) dimension over (data, fsdp); the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch(global_batch: int, mesh: Mesh, key: str = 'batch_size') -> None:
  """A batch must split evenly over the batch axes (and over processes)."""
  n = mesh.shape['data'] * mesh.shape['fsdp']
  if global_batch % n:
    raise ValueError(f'{key}={global_batch} is not divisible by mesh data*fsdp={n} '
                     f'(mesh {dict(mesh.shape)})')
  if global_batch % jax.process_count():
    raise ValueError(f'{key}={global_batch} is not divisible by the {jax.process_count()} processes')


def shard_batch(batch, mesh: Mesh):
  """Host-local numpy arrays (this process's rows) -> global jax.Arrays sharded over the batch
  axes. Every process passes only its own rows; the global batch is their concatenation."""
  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)
  return jax.tree.map(put, batch)


@contextlib.contextmanager
def rules_context(mesh: Mesh, rules=RULES):
  """Context (outside jit) in which the model's logical activation constraints resolve against
  `mesh`: for calling `model.apply` eagerly or jitting by hand, e.g. in a notebook."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield mesh


def under_rules(fn: Callable, mesh: Mesh, rules=RULES) -> Callable:
  """`fn` with the rules and the (abstract) mesh in force while it is traced, so that
  `jax.jit(under_rules(fn, mesh), ...)` applies the activation shardings wherever it is called."""
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
      return fn(*args, **kwargs)
  return wrapped
