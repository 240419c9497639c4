"""PPO and PPO-ptx against a trained reward model (InstructGPT §3.5, App. C.3; Ziegler et al. 2019).

The policy and its frozen KL reference start from an SFT checkpoint (`init.checkpoint`; InstructGPT
uses the "SFT + 10 % pretraining mix" run), the RM and the value network from an RM checkpoint
(`init.reward_checkpoint`). Sizes: smoke (tests), tiny (the embedded task on 2 CPU cores), 1.3b, 6b,
175b (InstructGPT's policies; its PPO settings: 512 episodes per iteration in minibatches of 64,
one epoch, β = 0.02, constant LR after 10 warm-up iterations, value LR 9e-6, EMA 0.992).
`:ptx=True` is PPO-ptx (γ = 27.8 on 8× as many pretraining rows); `:oai=True` switches to the
OAI-2019 settings (adaptive KL, reward whitening, a -1 score for responses with no stop token).
`:gold=True` replaces the RM by the embedded task's gold labeler (the oracle upper bound of
Gao et al. 2022; the value network then starts from the SFT trunk with a fresh head).
`:target=v5p-256` (or another of `common.TARGETS`) lays a full-size run out on that machine
(`common.mesh_for`). The RM's and the value network's shape is the RM checkpoint's (InstructGPT: 6B
for every policy size), not a key of this config.

python -m rlhf_jax.main --config=experiments/ppo.py:tiny --config.init.checkpoint=runs/sft_tiny/checkpoints \\
    --config.init.reward_checkpoint=runs/rm_tiny/checkpoints --workdir=runs/ppo_tiny
python -m rlhf_jax.memory --config=experiments/ppo.py:size=175b,target=v5p-256 --reward_size=6b
"""
import ml_collections

from experiments import common


def get_config(arg=None):
  arg = common.parse_arg(arg, size='tiny', smoke=False, ptx=False, oai=False, gold=False, data='synthetic',
                         target='', rm_size='')
  size = 'smoke' if arg.smoke else arg.size
  cpu = size in common.CPU_SIZES
  synthetic = arg.data == 'synthetic'
  c = ml_collections.ConfigDict()
  c.stage = 'ppo'
  c.seed = 0
  c.model = common.model(size, dropout=0.0)   # the SFT checkpoint's shape; no dropout in PPO
  c.tokenizer = common.tokenizer(arg.data)
  if not synthetic:
    c.model.vocab_size = common.SIZES['1.3b']['vocab_size']
  c.task = dict(seed=0)
  c.data = dict(source=arg.data, manual_dir='' if synthetic else '../shared/data',
                data_dir='' if synthetic else '~/tensorflow_datasets', valid_split='test',
                n_prompts=0 if size != 'smoke' else 256,   # 0: all (the embedded task: its default)
                prompt_len=48 if cpu else 1024, gen_len=33 if cpu else 256,
                seq_len=64 if cpu else 2048,               # validation and pretraining loss
                n_valid=256 if size == 'tiny' else 32, n_pretrain=20000 if size == 'tiny' else 512,
                pretrain_source='synthetic' if synthetic else 'plain_text_corpus/tinyshakespeare',
                ptx_seq_len=64 if cpu else 2048)
  c.init = dict(checkpoint='', reward_checkpoint='', value_checkpoint='')
  # source 'gold': the embedded task's labeler (an oracle run). size: the RM's (and value network's) size
  # when it is not the policy's (InstructGPT: 6b), for laying out the mesh and for rlhf_jax.memory; the
  # networks themselves are read from init.reward_checkpoint.
  c.reward = dict(source='gold' if arg.gold else 'rm', size=arg.rm_size)
  c.ppo = dict(beta=0.02, adaptive_kl=False, kl_target=6.0, kl_horizon=10000, kl_estimator='k1',
               gamma=1.0, lam=0.95, clip=0.2, value_clip=0.2, vf_coef=0.1, ent_coef=0.0,
               epochs=1, minibatches=8, whiten_rewards=False, whiten_advantages=True,
               temperature=1.0, logprob_temperature=True, stop_token=-1, truncate_after=0,
               penalize_no_stop=False, penalty=-1.0,
               recompute_logprobs=False, value_model='separate',
               ptx_coef=27.8 if arg.ptx else 0.0, ptx_ratio=8, ema_decay=0.992,
               # full size: the 8x pretraining rows of a minibatch in 8 chunks, each the size of the
               # PPO minibatch (in one pass, 1.3B PPO-ptx needs ~71 of an H100's 80 GiB before XLA's
               # temporaries: rlhf_jax.memory)
               ptx_microbatches=1 if cpu else 8)
  c.optim = dict(lr=1e-5, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0, grad_clip=1.0,
                 schedule='constant', warmup_steps=0, final_lr_frac=1.0)
  c.value_optim = dict(c.optim.to_dict(), lr=9e-6)
  c.train = dict(batch_size=512, steps=256, warmup_iterations=10, log_every=1, eval_every=25,
                 eval_batch_size=64, checkpoint_every=25, keep_checkpoints=2, skip_nonfinite=False)
  c.eval = dict(gold_prompts=0, prompt_len=c.data.prompt_len, gen_len=c.data.gen_len)
  if arg.oai:
    c.ppo.update(adaptive_kl=True, beta=0.15, whiten_rewards=True, penalize_no_stop=True, epochs=4, minibatches=1)
  if cpu:
    c.ppo.update(minibatches=4, epochs=2, ptx_ratio=2, ptx_coef=1.0 if arg.ptx else 0.0, ema_decay=0.9)
    c.optim.lr, c.value_optim.lr = 1e-4, 3e-4
    c.train.update(batch_size=64, steps=60, warmup_iterations=2, log_every=5, eval_every=30,
                   checkpoint_every=30)
    c.eval.gold_prompts = 128 if size == 'tiny' else 8
  if arg.smoke:
    c.ppo.minibatches = 2                     # 8 episodes per minibatch: one per simulated device
    c.train.update(batch_size=16, steps=4, log_every=1, eval_every=2, eval_batch_size=16, checkpoint_every=2)
    c.data.gen_len = c.eval.gen_len = 8
  c.mesh = common.mesh()
  B, mbs = c.train.batch_size, c.ppo.minibatches
  largest = max(size, arg.rm_size or size, key=list(common.SIZES).index)   # the mesh holds both
  common.use_target(c, largest, arg.target, {'train.batch_size': B, 'train.batch_size / ppo.minibatches': B // mbs,
                                          'train.eval_batch_size': c.train.eval_batch_size})
  return c


def get_sweep():
  return [{'optim.lr': lr, 'ppo.beta': beta} for lr in (1e-5, 3e-5) for beta in (0.01, 0.02, 0.05)]
