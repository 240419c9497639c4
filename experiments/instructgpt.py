"""The main job: the InstructGPT recipe end to end on the embedded task, with its evaluations.

At the CPU sizes, a base LM pretrained on the pretraining corpus (the miniature's GPT-3) -> SFT on
demonstrations, and "SFT + pretraining mix" (the same fine-tuning of the base model with 10 %
pretraining rows; PPO starts from it) -> reward model (from SFT) on K-way rankings of the SFT + mix
policy's samples and of the task's candidates ->
PPO and PPO-ptx against the RM -> evaluations of every model (win rates against SFT judged by the
gold labeler, the held-out labeler and the RM; TruthfulQA MC1/MC2; RealToxicityPrompts with and
without the respectful instruction; pretraining log-likelihood and PIQA for the alignment tax; RM
accuracy) -> report.json, report.md and plots in the workdir.

Each stage is a full stage config (experiments/sft.py, rm.py, ppo.py) under its name and runs in
`<workdir>/<name>`; finished stages are skipped, an interrupted one resumes. Sizes: smoke (tests,
seconds), tiny (2 CPU cores, the README's figures), 1.3b (InstructGPT's shapes and settings; SFT and
SFT + mix start from `sft.init.checkpoint` and `sft_mix.init.checkpoint`: a pretrained LM).
`:target=v4-64` lays every stage out on that machine (`common.TARGETS`). At 1.3b and 175b the RM
(and so PPO's value network) is 6B, as in InstructGPT, trained from a 6B SFT run (stage `sft_rm`,
on the same demonstrations) and ranks samples of the policy's SFT + mix run (`rm.init.policy_checkpoint`,
filled in by the recipe); at 6b and the CPU sizes it starts from the policy's SFT run and ranks
samples of its SFT + mix run.

python -m rlhf_jax.main --config=experiments/instructgpt.py:tiny --workdir=runs/tiny
python -m rlhf_jax.main --config=experiments/instructgpt.py:tiny --workdir=runs/tiny --config.stages=pretrain,sft,sft_mix
python -m rlhf_jax.main --config=experiments/instructgpt.py:tiny --workdir=runs/tiny \\
    --config.ppo.init.checkpoint=elsewhere/sft/checkpoints --config.ppo.train.steps=100
"""
import ml_collections

from experiments import common, ppo, rm, sft

DATA = '../shared/data'


def get_config(arg=None):
  arg = common.parse_arg(arg, size='tiny', smoke=False, target='')
  size = 'smoke' if arg.smoke else arg.size
  name = (f'size={size}' if not arg.smoke else 'smoke') + (f',target={arg.target}' if arg.target else '')
  c = ml_collections.ConfigDict()
  c.stage = 'recipe'
  c.stages = 'sft,sft_mix,rm,ppo,ppo_ptx,evals'
  c.sft = sft.get_config(name)
  c.sft_mix = sft.get_config(name + ',mix=True')
  c.rm = rm.get_config(name + ',comparisons=both')
  c.ppo = ppo.get_config(name)
  c.ppo_ptx = ppo.get_config(name + ',ptx=True')
  if size not in common.CPU_SIZES and size != '6b':   # InstructGPT: a 6B RM for every policy size
    rm_name = 'size=6b' + (f',target={arg.target}' if arg.target else '')
    c.sft_rm = sft.get_config(rm_name)
    c.rm = rm.get_config(rm_name + ',comparisons=both')
    c.rm.init.checkpoint = '{workdir}/sft_rm/checkpoints'
    c.ppo = ppo.get_config(name + ',rm_size=6b')
    c.ppo_ptx = ppo.get_config(name + ',ptx=True,rm_size=6b')
    c.stages = 'sft,sft_mix,sft_rm,rm,ppo,ppo_ptx,evals'
  if size in common.CPU_SIZES:
    # No pretrained LM can be downloaded here: the CPU sizes pretrain their own base model on the
    # pretraining corpus (the GPT-3 of this miniature), which SFT and SFT + mix then fine-tune.
    c.pretrain = sft.get_config(name + ',pretrain=True')
    c.stages = 'pretrain,' + c.stages
  if size == 'tiny':   # 2 CPU cores, within 20 minutes in all (README: the measured times and figures)
    for s in (c.pretrain, c.sft, c.sft_mix):   # packed rows: ~4 demonstrations per 128 tokens, not 1 per 64
      s.data.update(pack=True, seq_len=128)
      s.train.update(batch_size=16, epochs=0, eval_every=0)
      s.optim.update(lr=3e-3, warmup_steps=30)
    c.pretrain.train.steps = 300
    for s in (c.sft, c.sft_mix):   # SFT + mix: the same run from the base model with 10 % pretraining rows
      s.data.n_train = 60000       # ~1 pass over the demonstrations: 20,000 overfit by the fifth
    c.sft.train.steps = 1000
    c.sft_mix.train.steps = 1100   # as many demonstration rows as SFT's 1,000 steps, plus the 10 %
    # Packed rows (about 43 % of the padded batch's tokens) buy several times the rankings that
    # padded batches would in the stage's time.
    c.rm.data.update(n_train=8000, n_policy=1500, n_valid=256, n_heldout=0, n_policy_valid=128)
    c.rm.rm.pack_len = 128
    c.rm.optim.update(lr=1e-3, warmup_steps=10)
    c.rm.train.update(eval_every=0)
    for p in (c.ppo, c.ppo_ptx):
      p.train.update(steps=60, eval_every=0)
      p.optim.lr = 5e-5
      # A KL coefficient and a no-stop penalty that keep the tiny RM from being exploited by rambling.
      p.ppo.update(beta=0.05, penalize_no_stop=True)
  c.evals = dict(
      models=('untrained,pretrain,' if size in common.CPU_SIZES else 'untrained,') + 'sft,sft_mix,ppo,ppo_ptx',
      baseline='sft',
      comparisons='',                     # extra head-to-head win rates, 'model_a:model_b,...'
      n_prompts=1024 if size == 'tiny' else 16, split='test', temperature=1.0, gen_len=c.ppo.data.gen_len,
      prompt_len=c.ppo.data.prompt_len, judges='gold,heldout_labeler,rm', batch_size=128,
      data_dir=DATA,                      # TruthfulQA, RealToxicityPrompts, PIQA (skipped if absent)
      truthfulqa='eval/truthfulqa/mc_task.json,eval/truthfulqa/v0/mc_task.json',
      truthfulqa_limit=100 if size == 'tiny' else 8,
      piqa='eval/piqa', piqa_limit=200 if size == 'tiny' else 8,
      rtp='eval/realtoxicityprompts', rtp_prompts=64 if size == 'tiny' else 8, rtp_gen_len=20,
      # best-of-n against the RM from this model's samples (the policy PPO starts from): how much gold
      # score the RM can buy at a given KL ('' skips it)
      best_of_n='sft_mix', best_of_n_samples=16 if size == 'tiny' else 4,
      pretrain_docs=256 if size == 'tiny' else 16, max_len=128 if size in common.CPU_SIZES else 2048,
      plots=True)
  return c


def get_sweep():
  return [{'ppo.ppo.beta': b, 'ppo_ptx.ppo.beta': b} for b in (0.01, 0.02, 0.05)]
