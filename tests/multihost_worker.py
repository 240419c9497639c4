"""One process of the multi-host tests (tests/multihost_test.py starts it, in one process with 8
devices or through launch/local.py in several).

  python tests/multihost_worker.py recipe WORKDIR     SFT, RM and PPO of the smoke recipe on a
      (data, fsdp, tensor) = (2, 2, 2) mesh, then the evaluations' generate and loglik on the PPO policy
  python tests/multihost_worker.py sft WORKDIR D,F,T  the smoke recipe's SFT stage on that mesh (it
      resumes from WORKDIR/sft/checkpoints when they exist)
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rlhf_jax import distributed  # noqa: E402

distributed.initialize()   # from the environment launch/local.py sets; nothing for one process

import jax  # noqa: E402

from experiments import instructgpt  # noqa: E402
from rlhf_jax import recipe, trainer  # noqa: E402
from rlhf_jax.evals import lm as lm_lib  # noqa: E402

PROMPTS = ['Reverse the word: lantern', 'Count the vowels in "banana".', 'Sort: pear apple fig',
           'Repeat twice: ok', 'Uppercase: quiet', 'Name a colour.', 'Add 2 and 3.', 'Spell "cat" backwards.']


def main(mode: str, workdir: str, mesh: str = '2,2,2') -> None:
  c = instructgpt.get_config('smoke')
  with c.unlocked():
    del c['pretrain']   # SFT from random weights: the stages compared here are SFT, RM and PPO
    c.rm.init.checkpoint = c.ppo.init.checkpoint = recipe.checkpoints(workdir, 'sft')
    # Kept short for the suite: the sampler is exercised by SFT's gold evaluation, PPO's rollouts and
    # the LM evaluations below, so the RM trains on the task's candidates only; two PPO iterations.
    c.rm.data.comparisons = 'candidates'
    c.rm.rm.pack_len = 128   # packed rankings: each process packs its own rows (global score slots)
    c.ppo.train.steps = 2
    for stage in ('sft', 'rm', 'ppo'):
      c[stage].mesh.data, c[stage].mesh.fsdp, c[stage].mesh.tensor = map(int, mesh.split(','))
  if mode == 'sft':
    trainer.train_sft(recipe.stage_config(c, 'sft', workdir), os.path.join(workdir, 'sft'))
    return
  c.stages = 'sft,rm,ppo'
  recipe.run(c, workdir)
  lm = lm_lib.LM.from_checkpoint(recipe.checkpoints(workdir, 'ppo'), batch_size=8)
  out = {'greedy': lm.generate(PROMPTS[:6], max_new_tokens=12, prompt_len=32),
         'sampled': lm.generate(PROMPTS, max_new_tokens=12, prompt_len=32, temperature=1.0, seed=3),
         'loglik': lm.loglik(PROMPTS[:5], [' yes', ' no', ' 5', ' tac', ' red'], max_len=48)[0].tolist(),
         'processes': jax.process_count()}
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'lm.json'), 'w') as f:
      json.dump(out, f)


if __name__ == '__main__':
  main(*sys.argv[1:])
