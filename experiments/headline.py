"""InstructGPT's headline in miniature: is a PPO-ptx policy preferred to an SFT-only policy with more
than four times its parameters? (The paper: the 1.3B PPO-ptx model over the 175B SFT model.)

The main job (experiments/instructgpt.py:tiny) plus one stage, `sft_large`: SFT on the same
demonstrations, for the same steps, with a 4.0M-parameter policy (d_model 256, 5 layers; the tiny
policy has 0.85M) at a learning rate of 1e-3 instead of the tiny policy's 3e-3. At 3e-3 the larger
policy ends *worse* than the small one (greedy gold 0.360 against 0.452), which would make the
comparison meaningless; at 1e-3 it is the better SFT policy (0.500), as a larger model should be.
The evaluation adds the win rate of PPO-ptx (and PPO) against it, judged by the gold labeler, the
held-out labeler and the RM. Run it in the main job's workdir to reuse its stages:

python -m rlhf_jax.main --config=experiments/headline.py --workdir=runs/tiny
"""
from experiments import instructgpt, sft

LARGE = dict(d_model=256, n_layer=5, n_head=8, d_ff=1024)


def get_config(arg=None):
  c = instructgpt.get_config(arg or 'tiny')
  smoke = (arg or '').startswith('smoke')
  c.sft_large = sft.get_config('smoke' if smoke else 'size=tiny')
  c.sft_large.model.update({k: (v // 4 if smoke else v) for k, v in LARGE.items() if k != 'n_layer'})
  c.sft_large.model.n_layer = 2 if smoke else LARGE['n_layer']
  if not smoke:   # the tiny SFT stage's data and schedule: only the shape and the learning rate differ
    c.sft_large.data = c.sft.data.copy_and_resolve_references()
    c.sft_large.train = c.sft.train.copy_and_resolve_references()
    c.sft_large.optim = c.sft.optim.copy_and_resolve_references()
    c.sft_large.optim.lr = 1e-3   # wider model, lower learning rate (see the docstring)
  c.stages = 'sft,sft_mix,rm,ppo,ppo_ptx,sft_large,evals'
  c.evals.models += ',sft_large'
  c.evals.comparisons = 'ppo_ptx:sft_large,ppo:sft_large,sft:sft_large'
  return c
