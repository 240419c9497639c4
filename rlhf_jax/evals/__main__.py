"""Evaluate any policy checkpoint from the command line; prints one JSON object.

python -m rlhf_jax.evals --checkpoint=runs/tiny/ppo/checkpoints --evals=gold,truthfulqa,piqa
python -m rlhf_jax.evals --checkpoint=runs/tiny/ppo/checkpoints --baseline=runs/tiny/sft/checkpoints \\
    --evals=winrate --judge=heldout_labeler
python -m rlhf_jax.evals --checkpoint=runs/tiny/ppo_ptx/checkpoints --evals=toxicity,pretrain_nll
python -m rlhf_jax.evals --checkpoint=runs/tiny/sft_mix/checkpoints --evals=best_of_n \\
    --reward_checkpoint=runs/tiny/rm/checkpoints --baseline=runs/tiny/sft/checkpoints --samples=16

Evaluations: gold (the embedded task's gold score of greedy and sampled responses), winrate (against
--baseline, judged by --judge: gold, train_labeler, heldout_labeler, or rm with --reward_checkpoint),
truthfulqa (each file of --truthfulqa), piqa, toxicity (RealToxicityPrompts, plain and respectful),
pretrain_nll (held-out documents of the embedded task's pretraining corpus), best_of_n (--samples
draws per prompt, the RM of --reward_checkpoint picks the best of n = 1, 2, 4, ... of them, the gold
labeler scores the pick; with --baseline also the pick's win rate against the baseline's samples).

Several processes (a TPU pod, SLURM, launch/local.py) run the same command, each holding its part
of every batch (rlhf_jax.distributed reads where the others are from the environment); the first
prints the result.
"""
import json
import logging
import os

from absl import app, flags

_CKPT = flags.DEFINE_string('checkpoint', None, "a finished SFT or PPO run's checkpoints/")
_BASELINE = flags.DEFINE_string('baseline', '', 'checkpoints/ of the policy to compare against (winrate)')
_EVALS = flags.DEFINE_list('evals', ['gold'], 'gold, winrate, truthfulqa, piqa, toxicity, pretrain_nll, best_of_n')
_JUDGE = flags.DEFINE_string('judge', 'gold', 'winrate judge: gold, train_labeler, heldout_labeler, rm')
_RM = flags.DEFINE_string('reward_checkpoint', '', "a finished RM run's checkpoints/ (judge=rm, best_of_n)")
_SAMPLES = flags.DEFINE_integer('samples', 16, 'best_of_n: draws per prompt')
_DATA = flags.DEFINE_string('data_dir', '../shared/data', 'where eval/truthfulqa, eval/piqa, ... are')
_TRUTHFULQA = flags.DEFINE_list('truthfulqa', ['eval/truthfulqa/mc_task.json', 'eval/truthfulqa/v0/mc_task.json'],
                                'TruthfulQA files under --data_dir')
_N = flags.DEFINE_integer('n', 256, 'prompts (gold, winrate, toxicity) or questions (truthfulqa, piqa; 0 = all)')
_GEN_LEN = flags.DEFINE_integer('gen_len', 33, 'new tokens per response')
_TEMPERATURE = flags.DEFINE_float('temperature', 1.0, 'sampling temperature of the sampled responses')
_MAX_LEN = flags.DEFINE_integer('max_len', 0, 'tokens per scored row (0: the model\'s max_len)')
_SEED = flags.DEFINE_integer('seed', 0, 'sampling seed')


def main(argv):
  del argv
  logging.getLogger('absl').setLevel(logging.WARNING)
  from rlhf_jax import distributed
  distributed.initialize()
  import jax
  from rlhf_jax.data import synthetic
  from rlhf_jax.evals import multiple_choice, toxicity, winrate
  from rlhf_jax.evals.lm import LM
  lm = LM.from_checkpoint(_CKPT.value)
  max_len = _MAX_LEN.value or lm.model.cfg.max_len
  prompt_len = max_len - _GEN_LEN.value
  out = {'checkpoint': _CKPT.value}
  raw = [p['prompt'] for p in synthetic.prompts('test', _N.value, f'{_SEED.value}/eval')]
  prompts = [synthetic.format_prompt(p) for p in raw]
  gen = dict(max_new_tokens=_GEN_LEN.value, prompt_len=min(prompt_len, 64))
  for name in _EVALS.value:
    if name == 'gold':
      judge = winrate.GoldJudge()
      out['gold_score'] = {
          'sampled': float(judge.scores(raw, lm.generate(prompts, temperature=_TEMPERATURE.value,
                                                         seed=_SEED.value, **gen)).mean()),
          'greedy': float(judge.scores(raw, lm.generate(prompts, **gen)).mean())}
    elif name == 'winrate':
      if not _BASELINE.value:
        raise app.UsageError('--evals=winrate needs --baseline')
      base = LM.from_checkpoint(_BASELINE.value, mesh=lm.mesh)
      a = lm.generate(prompts, temperature=_TEMPERATURE.value, seed=_SEED.value, **gen)
      b = base.generate(prompts, temperature=_TEMPERATURE.value, seed=_SEED.value, **gen)
      out['win_rate'] = {_JUDGE.value: winrate.compare(raw, a, b, _judge(lm))}
    elif name == 'best_of_n':
      from rlhf_jax.evals import best_of_n, report
      if not _RM.value:
        raise app.UsageError('--evals=best_of_n needs --reward_checkpoint')
      rm = report.rm_judge_from(_RM.value, lm.mesh, lm.tok, seq_len=max_len, batch_size=lm.batch_size)
      base = None
      if _BASELINE.value:
        base = LM.from_checkpoint(_BASELINE.value, mesh=lm.mesh).generate(
            prompts, temperature=_TEMPERATURE.value, seed=_SEED.value, **gen)
      out['best_of_n'] = best_of_n.run(lm, rm, raw, samples=_SAMPLES.value, baseline=base,
                                       temperature=_TEMPERATURE.value, seed=_SEED.value + 1, **gen)
    elif name == 'truthfulqa':
      out['truthfulqa'] = {f: multiple_choice.truthfulqa(lm, os.path.join(_DATA.value, f), limit=_N.value or None,
                                                         max_len=max_len) for f in _TRUTHFULQA.value}
    elif name == 'piqa':
      out['piqa'] = multiple_choice.piqa(lm, os.path.join(_DATA.value, 'eval/piqa'), limit=_N.value or None,
                                         max_len=max_len)
    elif name == 'toxicity':
      rtp = os.path.join(_DATA.value, 'eval/realtoxicityprompts')
      scorer, agreement = toxicity.default_scorer(rtp)
      out['toxicity'] = toxicity.run_both(lm, scorer, rtp, n_prompts=_N.value, max_new_tokens=20,
                                          prompt_len=max_len - 20, seed=_SEED.value)
      out['toxicity_scorer'] = agreement
    elif name == 'pretrain_nll':
      docs = synthetic.pretraining_text(min(_N.value or 256, 256))
      out['pretrain_nll'] = multiple_choice.text_loglik(lm, docs, max_len=max_len)['nll_per_token']
    else:
      raise app.UsageError(f'unknown evaluation {name!r}; valid: {_EVALS.help}')
  if jax.process_index() == 0:
    print(json.dumps(out, indent=1, default=float))


def _judge(lm):
  from rlhf_jax.evals import winrate
  j = _JUDGE.value
  if j == 'gold':
    return winrate.GoldJudge()
  if j.endswith('_labeler'):
    return winrate.LabelerJudge(j[:-len('_labeler')])
  if j == 'rm':
    from rlhf_jax.evals import report
    if not _RM.value:
      raise app.UsageError('--judge=rm needs --reward_checkpoint')
    return report.rm_judge_from(_RM.value, lm.mesh, lm.tok, seq_len=lm.model.cfg.max_len, batch_size=lm.batch_size)
  raise app.UsageError(f'unknown judge {j!r}')


if __name__ == '__main__':
  flags.mark_flags_as_required(['checkpoint'])
  app.run(main)
