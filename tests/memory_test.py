"""The memory estimate: exact state bytes against really created sharded states, every scale config
estimated without allocating, the activation formula by hand, and the command line."""
import collections
import pathlib
import subprocess
import sys
import time

import jax
import jax.numpy as jnp

from experiments import common
from experiments import ppo as ppo_config
from experiments import rm as rm_config
from experiments import sft as sft_config
from rlhf_jax import memory, optim, ppo, sharding, trainer
from rlhf_jax import model as model_lib
from rlhf_jax import state as state_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def device_bytes(tree) -> int:
  """Bytes on the fullest device: per device, the sum of the tree's shards there."""
  per = collections.Counter()
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      per[shard.device] += shard.data.nbytes
  return max(per.values())


def _on_2x2(c):
  c.mesh.update(data=-1, fsdp=2, tensor=2)   # (2, 2, 2) on the 8 simulated devices
  return c


def test_sft_state_bytes_equal_the_created_state():
  c = _on_2x2(sft_config.get_config('smoke'))
  est = memory.estimate(c, n_devices=8)
  assert est['mesh'] == {'data': 2, 'fsdp': 2, 'tensor': 2}
  mesh = sharding.make_mesh(**c.mesh.to_dict())
  model = trainer.build_model(c)
  example = jnp.zeros((1, c.data.seq_len), jnp.int32)
  state, _ = state_lib.create(lambda k: model.init(k, example)['params'], optim.make(c.optim.to_dict(), 6),
                              mesh, c.seed)
  assert est['items']['params'] == device_bytes(state.params) == est['items']['grads']
  assert est['items']['opt_state'] == device_bytes(state.opt_state)
  # Sharded for real: a device holds about a quarter of the parameters (fsdp x tensor = 4).
  assert est['items']['params'] < model_lib.count_params(state.params) * 4 / 3


def test_ppo_state_bytes_equal_the_created_state():
  c = _on_2x2(ppo_config.get_config('smoke'))
  est = memory.estimate(c, n_devices=8)
  mesh = sharding.make_mesh(**c.mesh.to_dict())
  cfg = ppo.PPOConfig.from_dict(c.ppo.to_dict())
  policy, value = trainer.build_model(c), trainer.rm_model(c)   # as trainer.ppo_models builds them
  tx = ppo.make_tx(optim.make(c.optim.to_dict(), 8), optim.make(c.value_optim.to_dict(), 8))
  example = jnp.zeros((1, 8), jnp.int32)
  init = ppo.make_init(lambda k: policy.init(k, example)['params'], lambda k: value.init(k, example)['params'],
                       tx, cfg)
  state, _ = sharding.init_sharded(init, mesh, c.seed)
  items = est['items']
  assert items['params'] == device_bytes(state.params) == items['grads']
  assert items['opt_state'] == device_bytes(state.opt_state)
  assert items['ema'] == device_bytes(state.ema)
  ref, _ = sharding.init_sharded(lambda k: policy.init(jax.random.key(k), example)['params'], mesh, 0)
  assert items['reference'] == device_bytes(ref)
  rm, _ = sharding.init_sharded(lambda k: value.init(jax.random.key(k), example)['params'], mesh, 0)
  assert items['reward_model'] == device_bytes(rm)


def test_ppo_reward_model_size_apart_from_the_policy():
  c = ppo_config.get_config('size=1.3b,target=v4-64')
  same = memory.estimate(c)
  six = memory.estimate(c, reward_model=common.SIZES['6b'])
  assert same['models']['value'] == same['models']['reward'] < 2e9
  assert six['models']['value'] == six['models']['reward'] > 6e9
  assert six['models']['policy'] == same['models']['policy']
  assert six['items']['reward_model'] > 4 * same['items']['reward_model']
  assert six['items']['reference'] == same['items']['reference']
  gold_config = ppo_config.get_config('size=1.3b,target=v4-64,gold=True')
  gold = memory.estimate(gold_config, reward_model=common.SIZES['6b'])
  assert 'reward_model' not in gold['items'] and 'reward' not in gold['models']   # the labeler is the reward
  assert gold['models']['value'] == same['models']['value']   # the value network: the policy's trunk


STAGES = {'sft': sft_config, 'rm': rm_config, 'ppo': ppo_config}
TARGETS = ('v4-8', 'v4-64', 'v5p-256', 'v5litepod-256', 'gpu-8xh100', 'gpu-64xh100', 'gpu-256xh100')


def test_every_scale_config_is_estimated_without_allocating():
  live = len(jax.live_arrays())
  start = time.time()
  ests = {}
  for stage, mod in STAGES.items():
    for size in ('1.3b', '6b', '175b'):
      for target in TARGETS:
        try:
          c = mod.get_config(f'size={size},target={target}')
        except ValueError as e:   # InstructGPT's 175B SFT batch of 8 does not split 16 or 32 ways
          assert (stage, size) == ('sft', '175b') and 'train.batch_size=8 is not divisible' in str(e), e
          continue
        n = common.TARGETS[target]['devices']
        assert memory.abstract_mesh(c.mesh).size == n
        est = ests[stage, size, target] = memory.estimate(c)
        assert est['devices'] == n and est['memory'] == common.TARGETS[target]['memory_gib'] * memory.GiB
        assert 0 < est['items']['params'] < est['total']
  assert len(jax.live_arrays()) == live       # nothing was allocated
  assert time.time() - start < 120            # shapes only: nothing of 175B is computed or compiled
  assert len(ests) >= 55
  assert ests['sft', '1.3b', 'v4-64']['fits']
  assert not ests['ppo', '175b', 'v4-8']['fits']
  assert not ests['ppo', '175b', 'gpu-8xh100']['fits']
  # More devices, less of the same state on each.
  assert ests['ppo', '6b', 'v5p-256']['items']['params'] < ests['ppo', '6b', 'v4-64']['items']['params']


def test_parameter_bytes_at_full_size_by_hand():
  """1.3B SFT on v4-64, mesh (8, 4, 1): every parameter with an embed axis is split 4 ways over
  fsdp; the QKV and MLP biases (axes heads/kv and mlp, on the size-1 tensor axis) are whole on
  every device."""
  c = sft_config.get_config('size=1.3b,target=v4-64')
  est = memory.estimate(c)
  n, L, D, F = est['models']['policy'], 24, 2048, 8192
  whole = L * (3 * D + F)                           # qkv_bias [Hkv, 3, Dh] and wi_bias [F] per layer
  assert est['items']['params'] == 4 * (n - whole) // 4 + 4 * whole
  # Adam's two moments of the same shapes, and two int32 step counters (Adam's and the schedule's).
  assert est['items']['opt_state'] == 2 * est['items']['params'] + 2 * 4


def test_ptx_accumulation_trades_activations_for_a_gradient_accumulator():
  """PPO-ptx at full size: with the pretraining rows in k chunks, the step keeps the larger of the
  PPO minibatch's and one chunk's activations (not their sum), plus one more policy-sized gradient."""
  c = ppo_config.get_config('size=1.3b,ptx=True,target=gpu-8xh100')
  k = c.ppo.ptx_microbatches
  assert k == c.ppo.ptx_ratio == 8
  est = memory.estimate(c)
  with c.unlocked():
    c.ppo.ptx_microbatches = 1
  one = memory.estimate(c)
  cfg = model_lib.ModelConfig.from_dict(c.model.to_dict())
  mb, shards = c.train.batch_size // c.ppo.minibatches, 8
  act = lambda rows, T, lt: memory.activation_bytes(cfg, rows, T, batch_shards=shards, tensor=1,  # noqa: E731
                                                    remat='full', logits_len=lt)
  T, N, S = c.data.prompt_len + c.data.gen_len, c.data.gen_len, c.data.ptx_seq_len
  ppo_passes = act(mb, T, N) + memory.activation_bytes(memory.models(c)['value'], mb, T, batch_shards=shards,
                                                       tensor=1, remat='full', logits_len=0)
  assert one['items']['activations_full'] == ppo_passes + act(c.ppo.ptx_ratio * mb, S, S)
  assert est['items']['activations_full'] == max(ppo_passes, act(c.ppo.ptx_ratio * mb // k, S, S))
  assert est['items']['grads'] > one['items']['grads'] == one['items']['params']
  assert est['fits'] and est['total'] < one['total'] / 3   # 71 GiB a GPU in one pass (of 80), 21 GiB in 8 chunks


def test_main_job_stages_with_instructgpts_6b_rm():
  """The 1.3B main job on a v4-64: every training stage is estimated; PPO's RM and value network are
  the recipe's 6B (ppo.py's rm_size, `reward.size`), and the PPO mesh is laid out for them."""
  from experiments import instructgpt
  c = instructgpt.get_config('size=1.3b,target=v4-64')
  names = [n for n, _, _ in memory.stages(c)]
  assert names == ['sft', 'sft_mix', 'sft_rm', 'rm', 'ppo', 'ppo_ptx']
  est = {n: memory.estimate(sub, reward_model=rm) for n, sub, rm in memory.stages(c)}
  six, one = common.SIZES['6b'], common.SIZES['1.3b']
  sixes = [est['ppo']['models']['value'], est['rm']['models']['reward'], est['sft_rm']['models']['policy']]
  assert max(sixes) - min(sixes) < 1e-5 * max(sixes)        # the same trunk (heads of d_model weights apart)
  assert est['ppo']['models']['policy'] == est['sft']['models']['policy'] < est['ppo']['models']['value']
  assert est['ppo']['mesh'] == dict(common.mesh_for('6b', 'v4-64')) != dict(common.mesh_for('1.3b', 'v4-64'))
  assert all(e['fits'] for e in est.values())
  assert (six['d_model'], one['d_model']) == (4096, 2048)


def test_activations_by_hand():
  """One small shape, by hand, against Korthikanti et al. 2022 eq. 2 (with tensor parallelism t):
  s·b·h·(10 + 24/t) + (6 instead of 5)·a·s²·b/t bytes per layer for 16-bit activations, gpt2 MLP
  (F = 4h) and residual dropout; this model keeps float32 softmax outputs (4 bytes) and their bf16
  copy (2) and has no attention dropout (the paper's 5 = 2 + 1 + 2)."""
  cfg = model_lib.ModelConfig(vocab_size=16, d_model=8, n_layer=2, n_head=2, d_ff=32, max_len=8, dropout=0.1,
                              dtype='bfloat16')
  rows, s, shards, t = 4, 6, 2, 2      # 4 rows over 2 batch shards: b = 2 per device
  b, h, a = rows // shards, 8, 2
  # Per token and layer: replicated 2 norm inputs + QKV input + MLP input, 2 bytes each per
  # element: 4·8·2 = 64, masks 2·8 = 16; split over t = 2: Q, K, V, attention output 4·8·2 / 2 = 32,
  # GELU input and output 2·32·2 / 2 = 64; scores 1 head · 6 keys · (4 + 2) = 36. Sum 212.
  assert memory.layer_bytes_per_token(cfg, s, t) == 64 + 16 + 32 + 64 + 36 == 212
  per_layer = s * b * h * (10 + 24 // t) + 6 * a * s * s * b // t
  assert per_layer == 212 * b * s
  logits = b * s * (16 // t) * 4                      # f32 [b, s, V / t]
  got = memory.activation_bytes(cfg, rows, s, batch_shards=shards, tensor=t, logits_len=s)
  assert got == 2 * per_layer + logits == 2 * 2544 + 384
  # Full remat: each layer's input (2·s·b·h bytes, the paper's figure) plus one layer recomputed.
  full = memory.activation_bytes(cfg, rows, s, batch_shards=shards, tensor=t, remat='full', logits_len=s)
  assert full == 2 * (2 * s * b * h) + per_layer + logits == 3312
  # Causal query blocks: at s = 256, four blocks of 64 queries attend to 64, 128, 192 and 256 keys,
  # 160 on average; one block to all 256. Only the scores term (heads · keys · 6 bytes) changes.
  four, one = memory.layer_bytes_per_token(cfg, 256, t), memory.layer_bytes_per_token(cfg.replace(attention_blocks=1), 256, t)
  assert one - four == 1 * (256 - 160) * 6
  # KV cache: 4 rows over 2 shards, 2 KV heads over t = 2, 10 slots, head dim 4, K and V, 2 layers, bf16.
  assert memory.kv_cache_bytes(cfg, 4, 10, batch_shards=2, tensor=2) == 2 * 1 * 10 * 4 * 2 * 2 * 2


def test_shard_shape_rounds_up_uneven_splits():
  axes = {'data': 2, 'fsdp': 4, 'tensor': 3}
  P = jax.sharding.PartitionSpec
  assert memory.shard_shape((10, 7, 5), P('fsdp', ('data', 'tensor')), axes) == (3, 2, 5)
  assert memory.shard_shape((), P(), axes) == ()


def test_command_line_prints_the_table():
  out = subprocess.run([sys.executable, '-m', 'rlhf_jax.memory', '--memory_gib=16',
                        '--config=experiments/sft.py:size=1.3b,target=v4-64'],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert out.returncode == 0, out.stderr
  text = out.stdout
  for line in ('stage sft on v4-64: 32 devices, mesh data=8 fsdp=4 tensor=1', 'parameters', 'optimizer state',
               'gradients', 'activations, no remat', 'activations, full remat', 'total', 'fits in 16.0 GiB'):
    assert line in text, text
