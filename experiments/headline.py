"""InstructGPT's headline in miniature: is a PPO-ptx policy preferred to an SFT-only policy with more
than four times its parameters? (The paper: the 1.3B PPO-ptx model over the 175B SFT model.)

The main job (experiments/instructgpt.py:tiny) plus two stages of a 4.0M-parameter policy (d_model
256, 5 layers; the tiny policy has 0.85M): `pretrain_large`, its own base model on the same
pretraining corpus, and `sft_large`, SFT from it on the same demonstrations for the same steps. Only
the shape and the learning rate differ: 1e-3 instead of the tiny policy's 3e-3 (at 3e-3 a policy of
this width ended *worse* than the tiny one in an earlier version of this experiment, which would make
the comparison meaningless). The evaluation adds the win rates of PPO-ptx, PPO and SFT against it,
judged by the gold labeler, the held-out labeler and the RM. Run it in the main job's workdir to reuse
its stages:

python -m rlhf_jax.main --config=experiments/headline.py --workdir=runs/tiny
"""
from experiments import common, instructgpt, sft

LARGE = dict(d_model=256, n_layer=5, n_head=8, d_ff=1024)


def get_config(arg=None):
  c = instructgpt.get_config(arg or 'tiny')
  a = common.parse_arg(arg or 'tiny', size='tiny', smoke=False, target='')
  smoke = a.smoke
  if not smoke and a.size not in common.CPU_SIZES:
    # At full size, the paper's own comparison: this size's PPO-ptx policy against the 175B SFT policy
    # (which starts, like every full-size SFT run, from the pretrained LM in its init.checkpoint).
    c.sft_large = sft.get_config('size=175b' + (f',target={a.target}' if a.target else ''))
    c.stages = c.stages.replace(',evals', ',sft_large,evals')
    c.evals.models += ',sft_large'
    c.evals.comparisons = 'ppo_ptx:sft_large,ppo:sft_large,sft:sft_large'
    return c
  for name, src in (('pretrain_large', 'pretrain'), ('sft_large', 'sft')):
    s = sft.get_config(('smoke' if smoke else 'size=tiny') + (',pretrain=True' if name == 'pretrain_large' else ''))
    s.model.update({k: (v // 4 if smoke else v) for k, v in LARGE.items() if k != 'n_layer'})
    s.model.n_layer = 2 if smoke else LARGE['n_layer']
    if not smoke:   # the tiny stage's data and schedule: only the shape and the learning rate differ
      s.data = c[src].data.copy_and_resolve_references()
      s.train = c[src].train.copy_and_resolve_references()
      s.optim = c[src].optim.copy_and_resolve_references()
      s.optim.lr = 1e-3   # wider model, lower learning rate (see the docstring)
    c[name] = s
  c.stages = c.stages.replace(',evals', ',pretrain_large,sft_large,evals')
  c.evals.models += ',sft_large'
  c.evals.comparisons = 'ppo_ptx:sft_large,ppo:sft_large,sft:sft_large'
  return c
