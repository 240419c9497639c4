"""Every experiment config parses at every size, every sweep point builds, and typos fail."""
import importlib
import pathlib
import subprocess
import sys

import pytest

from experiments import common
from rlhf_jax import ppo, recipe
from rlhf_jax.model import ModelConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]
FILES = sorted(p.stem for p in (ROOT / 'experiments').glob('*.py') if p.stem not in ('__init__', 'common'))


@pytest.mark.parametrize('name', FILES)
def test_every_config_parses_and_every_sweep_point_builds(name):
  mod = importlib.import_module(f'experiments.{name}')
  extra = {'ppo': ['ptx', 'oai', 'size=6b,ptx=True,oai=True', 'size=175b,ptx=True,target=v5p-256']}.get(name, [])
  placed = (('1.3b', 'v4-64'), ('6b', 'gpu-64xh100'), ('175b', 'gpu-64xh100'))
  targets = [f'size={s},target={t}' for s, t in placed]
  for arg in ['smoke'] + [f'size={s}' for s in common.SIZES] + extra + targets:
    c = mod.get_config(arg)
    for sub in [c[s] for s in recipe.INPUTS if s in c] if c.stage == 'recipe' else [c]:   # a recipe nests stages
      ModelConfig.from_dict(sub.model.to_dict())
      if sub.stage == 'ppo':
        ppo.PPOConfig.from_dict(sub.ppo.to_dict())
    c.lock()
    for point in getattr(mod, 'get_sweep', lambda: [])():
      d = c.copy_and_resolve_references()
      for key, value in point.items():
        node = d
        *parents, leaf = key.split('.')
        for p in parents:
          node = node[p]
        node[leaf] = value                                  # a typo in a sweep key raises here


def test_target_sets_the_mesh_and_nothing_else():
  from experiments import ppo as ppo_config, rm as rm_config, sft as sft_config
  for mod in (sft_config, rm_config, ppo_config):
    plain, placed = mod.get_config('size=6b'), mod.get_config('size=6b,target=v4-64')
    assert plain.mesh.to_dict() == common.mesh().to_dict() and plain.target.name == ''
    assert placed.mesh.to_dict() == dict(data=1, fsdp=32, tensor=1)
    assert placed.target.to_dict() == dict(name='v4-64', kind='tpu', devices=32, per_host=4, memory_gib=32.0)
    a, b = plain.to_dict(), placed.to_dict()
    assert {k for k in a if a[k] != b[k]} == {'mesh', 'target'}


def test_mesh_for_keeps_fsdp_in_the_fast_domain():
  m = lambda size, target, batch=None: tuple(common.mesh_for(size, target, batch).values())  # noqa: E731
  assert m('1.3b', 'v4-64') == (8, 4, 1)            # fsdp over a host's 4 chips, data across hosts
  assert m('1.3b', 'gpu-64xh100') == (8, 8, 1)      # fsdp over a node's 8 GPUs (NVLink)
  assert m('6b', 'v5p-256') == (1, 128, 1)          # fsdp over the whole slice (ICI)
  assert m('175b', 'v5p-256') == (1, 32, 4)         # tensor over a host's chips
  assert m('175b', 'gpu-256xh100') == (1, 32, 8)    # tensor over a node
  assert m('6b', 'v5p-256', batch=64) == (1, 64, 2)   # a batch of 64 splits at most 64 ways
  assert m('175b', 'gpu-256xh100', batch=8) == (1, 32, 8)   # no mesh splits it 8 ways: the rule's mesh
  for name, t in common.TARGETS.items():
    for size in ('1.3b', '6b', '175b'):
      mesh = common.mesh_for(size, name)
      assert mesh.data * mesh.fsdp * mesh.tensor == t['devices']
  with pytest.raises(ValueError, match='unknown target'):
    common.mesh_for('6b', 'v9-8')


def test_ppo_mesh_holds_the_larger_of_policy_and_rm():
  """A 1.3B policy with InstructGPT's 6B RM and value network: the mesh is the 6B one, and the RM's
  size is noted in reward.size."""
  from experiments import ppo as ppo_config
  c = ppo_config.get_config('size=1.3b,rm_size=6b,target=v4-64')
  assert c.reward.size == '6b' and dict(c.mesh) == dict(common.mesh_for('6b', 'v4-64'))
  assert dict(ppo_config.get_config('size=1.3b,target=v4-64').mesh) == dict(common.mesh_for('1.3b', 'v4-64'))
  assert dict(ppo_config.get_config('size=175b,rm_size=6b,target=v5p-256').mesh) == dict(
      common.mesh_for('175b', 'v5p-256'))


def test_target_whose_batch_does_not_split_fails_naming_the_keys():
  from experiments import ppo as ppo_config, sft as sft_config
  with pytest.raises(ValueError, match=r'target=v5p-256: .* train.batch_size=8 is not divisible by 32'):
    sft_config.get_config('size=175b,target=v5p-256')
  keys = 'train.batch_size=16, train.batch_size / ppo.minibatches=8, train.eval_batch_size=16'
  with pytest.raises(ValueError, match=f'{keys} are not divisible by 256'):
    ppo_config.get_config('smoke,target=v5litepod-256')
  with pytest.raises(ValueError, match='unknown target'):
    sft_config.get_config('size=6b,target=tpu')


def test_arg_parsing():
  a = common.parse_arg('smoke', size='tiny', smoke=False)
  assert a.smoke and a.size == 'tiny'
  assert common.parse_arg('size=6b,smoke=true', size='tiny', smoke=False).size == '6b'
  with pytest.raises(ValueError, match='colour'):
    common.parse_arg('colour=red', size='tiny', smoke=False)
  with pytest.raises(ValueError, match='unknown size'):
    common.parse_arg('size=2b', size='tiny', smoke=False)


def test_unknown_config_key_fails_naming_it(tmp_path):
  out = subprocess.run([sys.executable, '-m', 'rlhf_jax.main', f'--config={ROOT}/experiments/sft.py:smoke',
                        '--config.optim.lrr=0.1', f'--workdir={tmp_path}'], capture_output=True, text=True,
                       cwd=tmp_path, timeout=120)
  assert out.returncode != 0
  assert 'lrr' in out.stderr
