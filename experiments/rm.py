"""Reward model on K-way rankings (InstructGPT §3.5, App. C.2).

The default trains on the embedded task's rankings (K = 4..9 candidates ranked by the simulated
training labeler) from the tiny SFT checkpoint, and evaluates against held-out rankings, the
held-out labeler and the gold labeler. Sizes: smoke (tests), tiny (2 CPU cores), 6b (InstructGPT's
RM: 1 epoch, lr 9e-6, cosine to 10 %, 64 prompts per batch, each with all its C(K, 2) pairs).
`:flat=True` is the shuffled-pairs ablation; `:norm=reference` the OAI-2019 normalisation;
`:comparisons=policy` ranks K samples of the SFT policy per prompt (as InstructGPT collects its
comparisons) instead of the task's candidate generator (`both`: the two together). `:target=v4-64`
(or another of `common.TARGETS`) lays a full-size run out on that machine (`common.mesh_for`).

python -m rlhf_jax.main --config=experiments/rm.py:tiny --config.init.checkpoint=runs/sft_tiny/checkpoints \\
    --workdir=runs/rm_tiny
python -m rlhf_jax.main --config=experiments/rm.py:smoke,data=oasst_rankings --workdir=runs/rm_oasst
python -m rlhf_jax.main --config=experiments/rm.py:size=6b,data=oasst_rankings --config.data.manual_dir=/data/oasst \\
    --config.init.checkpoint=gs://bucket/sft_6b/checkpoints --workdir=gs://bucket/rm_6b
python -m rlhf_jax.memory --config=experiments/rm.py:size=6b,target=v4-64   # will it fit?
"""
import ml_collections

from experiments import common


def get_config(arg=None):
  arg = common.parse_arg(arg, size='tiny', smoke=False, flat=False, norm='demonstrations', data='synthetic',
                         comparisons='candidates', target='')
  size = 'smoke' if arg.smoke else arg.size
  cpu = size in common.CPU_SIZES
  synthetic = arg.data == 'synthetic'
  c = ml_collections.ConfigDict()
  c.stage = 'rm'
  c.seed = 0
  c.model = common.model(size, dropout=0.0)   # must match the SFT checkpoint's shape
  c.tokenizer = common.tokenizer(arg.data)
  c.task = dict(seed=0)
  c.data = dict(source=arg.data, manual_dir='' if synthetic else '../shared/data',
                data_dir='' if synthetic else '~/tensorflow_datasets', valid_split='test',
                seq_len=72 if cpu else 2048,
                k_max=0,                     # 0: the largest K in the data
                n_train=0 if size != 'smoke' else 256,  # rankings of the embedded task (0: its default, 10k)
                n_valid=512 if size == 'tiny' else 64, n_heldout=256 if size == 'tiny' else 0,
                # 'policy': rank K samples of the init policy per prompt (InstructGPT); 'both': and the candidates
                comparisons=arg.comparisons, n_policy=2000 if size == 'tiny' else 32,
                n_policy_valid=256 if size == 'tiny' else 16, policy_temperature=1.0, policy_batch=256)
  if not synthetic:
    c.model.vocab_size = common.SIZES['1.3b']['vocab_size']
  c.init = dict(checkpoint='',                # the SFT run's checkpoints/ (empty: random init)
                # the policy whose samples data.comparisons='policy'/'both' ranks and norm.mode='reference'
                # centres on: the one PPO will optimise (empty: init.checkpoint)
                policy_checkpoint='')
  # pack_len > 0: a batch's responses share rows of that many tokens (>= data.seq_len), each its own
  # segment, instead of K_max padded slots per prompt; pack_rows / pack_docs (rows per process,
  # responses per row) 0: the least that holds every batch of the run.
  c.rm = dict(mode='flat' if arg.flat else 'grouped', pack_len=0, pack_rows=0, pack_docs=0)
  c.norm = dict(mode=arg.norm, n=512 if size == 'tiny' else 64, demo_source='oasst_demos',
                policy_checkpoint='', temperature=1.0)
  c.optim = dict(lr=3e-4 if cpu else 9e-6, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0, grad_clip=1.0,
                 schedule='cosine', warmup_steps=0, final_lr_frac=0.1)
  c.train = dict(batch_size=64 if not cpu else 32, steps=0, epochs=1, log_every=20, eval_every=100,
                 eval_batch_size=64, checkpoint_every=100, keep_checkpoints=2, skip_nonfinite=False)
  c.eval = dict(prompt_len=48 if cpu else 1024, gen_len=32 if cpu else 256)
  c.mesh = common.mesh()
  if arg.smoke:
    c.train.update(batch_size=8, epochs=0, steps=6, log_every=2, eval_every=3, eval_batch_size=16,
                   checkpoint_every=3)
    c.eval.update(gen_len=8)
    c.norm.n = 16
  common.use_target(c, size, arg.target, {'train.batch_size': c.train.batch_size,
                                          'train.eval_batch_size': c.train.eval_batch_size})
  return c


def get_sweep():
  return [{'rm.mode': mode, 'optim.lr': lr} for mode in ('grouped', 'flat') for lr in (1e-4, 3e-4)]
