"""The recipe's evaluations of every model and the report: report.json, report.md and PNG plots.

`evaluate_recipe(config, workdir)` is the recipe's last stage. It loads each model of
`evals.models` ('untrained' is the SFT shape at its random initialisation, 'pretrain' the base LM
that SFT starts from) and measures, on the
embedded task's held-out prompts and on the real evaluation sets in `evals.data_dir`:

  gold_score        the gold labeler's mean score of sampled (evals.temperature) and greedy responses
  win_rate_vs_<b>   per judge (gold, held-out labeler, RM): the win rate against model <b> with its
                    95 % interval (rlhf_jax.evals.winrate)
  truthfulqa        MC1 / MC2 per release file
  toxicity          RealToxicityPrompts continuations, plain and with the respectful instruction
  pretrain_nll      per-token NLL on held-out pretraining text; piqa: zero-shot accuracy
                    (the alignment tax)

plus the reward model's held-out accuracy (from its run), the PPO runs' reward-vs-KL frontier
(from their metrics) and best-of-n against the RM from `evals.best_of_n`'s samples
(rlhf_jax.evals.best_of_n: how much gold score following this RM can buy at a given KL). The keys
of report.json are documented in the README and stay stable.
"""
from __future__ import annotations

import io
import json
import logging
import os
import time
from typing import Any

import jax
import numpy as np

from rlhf_jax import metrics as metrics_lib
from rlhf_jax import fs, recipe, sharding, tokenizers
from rlhf_jax.evals import winrate
from rlhf_jax.evals.lm import LM

log = logging.getLogger('rlhf_jax')

REPORT_VERSION = 1
LABELS = {'untrained': 'untrained', 'pretrain': 'pretrained', 'sft': 'SFT', 'sft_mix': 'SFT + mix', 'ppo': 'PPO',
          'ppo_ptx': 'PPO-ptx', 'pretrain_large': 'pretrained (large)', 'sft_large': 'SFT (large)',
          'sft_rm': 'SFT (RM shape)'}


# ----------------------------------------------------------------------------
# Loading.


def load_models(c, workdir: str, names: list[str], mesh, tok, batch_size: int) -> dict[str, LM]:
  """name -> LM: 'untrained' is the SFT config's model at its random initialisation; every other name
  is a finished stage of the recipe in `workdir` (PPO stages: the EMA weights)."""
  from rlhf_jax import trainer
  out = {}
  for name in names:
    if name == 'untrained':   # the SFT model's shape at its random initialisation
      model = trainer.build_model(c.sft)
      abstract, shardings = trainer._abstract_params(model, mesh)
      params = jax.jit(lambda k: model.init(k, np.zeros((1, 8), np.int32))['params'],
                       out_shardings=shardings)(jax.random.key(c.sft.seed))
    else:
      model, params = trainer.load_policy(recipe.checkpoints(workdir, name), mesh)
    out[name] = LM(model, params, tok, mesh, batch_size)
  return out


def _data(e, rel: str) -> str | None:
  """An evaluation file under evals.data_dir, or None (logged) when it is absent."""
  path = os.path.join(e.data_dir, rel)
  if not os.path.exists(path):
    log.warning('evals: %s not found; that evaluation is skipped', path)
    return None
  return path


# ----------------------------------------------------------------------------
# Evaluations.


def task_evals(e, lms: dict[str, LM], judges: list, seed: int = 0):
  """Gold scores and win rates against `e.baseline` on `e.n_prompts` held-out prompts of the task:
  (per-model figures, head-to-head comparisons, the raw prompts, the baseline's sampled responses)."""
  from rlhf_jax.data import synthetic
  raw = [p['prompt'] for p in synthetic.prompts(e.split, e.n_prompts, f'{seed}/eval')]
  prompts = [synthetic.format_prompt(p) for p in raw]
  gen = dict(max_new_tokens=e.gen_len, prompt_len=e.prompt_len)
  sampled = {n: lm.generate(prompts, temperature=e.temperature, seed=seed, desc=f'{n} samples', **gen)
             for n, lm in lms.items()}
  greedy = {n: lm.generate(prompts, temperature=0.0, desc=f'{n} greedy', **gen) for n, lm in lms.items()}
  gold = winrate.GoldJudge()
  families = np.array([synthetic.parse(p).family for p in raw])
  scores = {n: gold.scores(raw, ys) for n, ys in sampled.items()}
  out = {}
  for n in lms:
    r = {'gold_score': {'sampled': float(scores[n].mean()),
                        'greedy': float(gold.scores(raw, greedy[n]).mean())},
         'by_family': _by_family(families, scores[n], scores.get(e.baseline)),
         'examples': [{'prompt': p, 'sampled': s, 'greedy': g}
                      for p, s, g in list(zip(raw, sampled[n], greedy[n]))[:8]]}
    if e.baseline in sampled:
      r[f'win_rate_vs_{e.baseline}'] = {j.name: winrate.compare(raw, sampled[n], sampled[e.baseline], j)
                                        for j in judges}
    out[n] = r
  comparisons = {f'{a}_vs_{b}': {j.name: winrate.compare(raw, sampled[a], sampled[b], j) for j in judges}
                 for a, b in _pairs(e.comparisons)}
  return out, comparisons, raw, sampled.get(e.baseline)


def _by_family(families: np.ndarray, scores: np.ndarray, baseline: np.ndarray | None) -> dict:
  """Per task family, from the gold scores of a model's samples and of the baseline's (same prompts):
  the prompts' count `n`, the mean gold score, and the gold win rate against the baseline (where PPO
  gains and where it exploits the RM)."""
  out = {}
  for f in sorted(set(families)):
    idx = families == f
    out[str(f)] = {'n': int(idx.sum()), 'gold_score': float(scores[idx].mean())}
    if baseline is not None:
      out[str(f)]['win_rate_gold'] = winrate.win_rate(winrate.outcomes_from_scores(scores[idx], baseline[idx]))
  return out


def bon_evals(e, lms: dict[str, LM], judges: list, raw: list[str], baseline: list[str] | None,
              seed: int = 0) -> dict | None:
  """Best-of-n against the RM from `e.best_of_n`'s samples (the policy PPO starts from), judged by the
  gold labeler, with the pick's win rate against the baseline's samples; None when off or without an RM."""
  from rlhf_jax.evals import best_of_n
  rm = next((j for j in judges if isinstance(j, winrate.RewardModelJudge)), None)
  if not e.best_of_n or rm is None:
    return None
  if e.best_of_n not in lms:
    raise ValueError(f'evals.best_of_n={e.best_of_n!r} is not one of evals.models ({", ".join(lms)})')
  out = best_of_n.run(lms[e.best_of_n], rm, raw, samples=e.best_of_n_samples, baseline=baseline,
                      max_new_tokens=e.gen_len, prompt_len=e.prompt_len, temperature=e.temperature,
                      seed=seed + 1)
  return {'policy': e.best_of_n, **out}


def _pairs(spec: str) -> list[tuple[str, str]]:
  """'ppo_ptx:sft_large,ppo:sft' -> [('ppo_ptx', 'sft_large'), ('ppo', 'sft')]."""
  out = []
  for item in filter(None, spec.split(',')):
    a, sep, b = item.partition(':')
    if not sep or not a or not b:
      raise ValueError(f"evals.comparisons: {item!r} is not 'model_a:model_b'")
    out.append((a, b))
  return out


def real_data_evals(e, lm: LM, scorer) -> dict:
  """TruthfulQA (each release file), PIQA and RealToxicityPrompts of one model, when the files exist."""
  from rlhf_jax.evals import multiple_choice, toxicity
  out: dict[str, Any] = {}
  tq = {}
  for rel in filter(None, e.truthfulqa.split(',')):
    path = _data(e, rel)
    if path:
      tq[rel] = multiple_choice.truthfulqa(lm, path, limit=e.truthfulqa_limit or None, max_len=e.max_len)
  if tq:
    out['truthfulqa'] = tq
  path = _data(e, e.piqa) if e.piqa else None
  if path:
    out['piqa'] = multiple_choice.piqa(lm, path, limit=e.piqa_limit or None, max_len=e.max_len)
  path = _data(e, e.rtp) if e.rtp and scorer is not None else None
  if path:
    out['toxicity'] = toxicity.run_both(lm, scorer, path, n_prompts=e.rtp_prompts, max_new_tokens=e.rtp_gen_len,
                                        prompt_len=e.max_len - e.rtp_gen_len)
  return out


def rm_judge(workdir: str, mesh, tok, seq_len: int, batch_size: int):
  """The recipe's RM as a win-rate judge, or None if the run has no RM."""
  path = recipe.checkpoints(workdir, 'rm')
  return rm_judge_from(path, mesh, tok, seq_len=seq_len, batch_size=batch_size) if os.path.isdir(path) else None


def rm_judge_from(path: str, mesh, tok, *, seq_len: int, batch_size: int) -> winrate.RewardModelJudge:
  """A finished RM run's checkpoints as a win-rate judge (its normalised scores)."""
  from rlhf_jax import trainer
  from rlhf_jax.data import synthetic
  model, params, norm = trainer.load_reward_model(path, mesh)
  scorer = trainer.RewardScorer(model, tok, mesh, seq_len=seq_len, batch_size=batch_size)
  return winrate.RewardModelJudge(lambda p, y: norm.apply(scorer.texts(params, p, y)), synthetic.format_prompt)


def rm_figures(workdir: str) -> dict:
  """The RM run's final held-out figures (accuracy on the training and held-out labelers, ...)."""
  rows = [r for r in metrics_lib.read(os.path.join(workdir, 'rm')) if any(k.startswith('eval/') for k in r)]
  if not rows:
    return {}
  return {k[len('eval/'):]: v for k, v in rows[-1].items() if k.startswith('eval/') and 'by_length' not in k}


def frontier(workdir: str, stage: str) -> list[dict]:
  """Per PPO iteration: KL to the reference, the RM score and the gold score of the rollouts."""
  rows = metrics_lib.read(os.path.join(workdir, stage))
  keys = {'kl': 'objective/kl', 'rm_score': 'objective/score', 'gold_score': 'objective/gold_score'}
  return [{'iteration': r['step'], **{k: r[v] for k, v in keys.items() if v in r}}
          for r in rows if 'objective/kl' in r]


def curves(workdir: str, stages: list[str]) -> dict[str, list[dict]]:
  return {s: metrics_lib.read(os.path.join(workdir, s)) for s in stages
          if fs.exists(os.path.join(workdir, s, 'metrics.jsonl'))}


# ----------------------------------------------------------------------------
# The recipe's evaluation stage.


def evaluate_recipe(c, workdir: str) -> dict:
  """Evaluate every model of a recipe run and write report.json, report.md and the plots."""
  e = c.evals
  t0 = time.time()
  mesh = sharding.make_mesh(**c.ppo.mesh.to_dict())
  tok = tokenizers.from_config(c.sft.tokenizer.to_dict())
  names = [n for n in e.models.split(',') if n]
  lms = load_models(c, workdir, names, mesh, tok, e.batch_size)
  judges = []
  for j in e.judges.split(','):
    if j == 'gold':
      judges.append(winrate.GoldJudge())
    elif j.endswith('_labeler'):
      judges.append(winrate.LabelerJudge(j[:-len('_labeler')]))
    elif j == 'rm':
      judge = rm_judge(workdir, mesh, tok, c.rm.data.seq_len, e.batch_size)
      if judge is not None:
        judges.append(judge)
    elif j:
      raise ValueError(f'evals.judges: unknown judge {j!r}; valid: gold, train_labeler, heldout_labeler, rm')
  models, comparisons, raw, baseline = task_evals(e, lms, judges, seed=c.sft.seed)
  bon = bon_evals(e, lms, judges, raw, baseline, seed=c.sft.seed)

  from rlhf_jax.data import synthetic
  # The SFT run's held-out pretraining documents (the first data.n_valid of the corpus).
  docs = synthetic.pretraining_text(min(e.pretrain_docs, c.sft.data.n_valid), c.sft.task.seed)
  scorer, agreement = None, None
  rtp_dir = _data(e, e.rtp) if e.rtp else None
  if rtp_dir:
    from rlhf_jax.evals import toxicity
    scorer, agreement = toxicity.default_scorer(rtp_dir, cache_dir=os.path.join(workdir, 'evals'))
  from rlhf_jax.evals import multiple_choice
  for n, lm in lms.items():
    models[n]['params'] = int(sum(x.size for x in jax.tree.leaves(lm.params)))
    models[n]['pretrain_nll'] = multiple_choice.text_loglik(lm, docs, max_len=e.max_len)['nll_per_token']
    models[n].update(real_data_evals(e, lm, scorer))
  report = {
      'version': REPORT_VERSION,
      'baseline': e.baseline,
      'models': models,
      'comparisons': comparisons,
      'reward_model': rm_figures(workdir),
      'ppo_frontier': {s: frontier(workdir, s) for s in ('ppo', 'ppo_ptx')
                       if fs.exists(os.path.join(workdir, s, 'metrics.jsonl'))},
      'best_of_n': bon,
      'toxicity_scorer': agreement,
      'stage_seconds': _stage_seconds(workdir),
      'eval_seconds': time.time() - t0,
  }
  if jax.process_index() == 0:
    write(report, curves(workdir, list(recipe.INPUTS)), workdir, plots=e.plots)
  return report


def _stage_seconds(workdir: str) -> dict:
  out = {}
  for s in recipe.INPUTS:
    p = recipe.done_path(workdir, s)
    if fs.exists(p):
      out[s] = json.loads(fs.read_text(p))['seconds']
  return out


# ----------------------------------------------------------------------------
# Writing.


def write(report: dict, stage_curves: dict, workdir: str, *, plots: bool = True) -> None:
  fs.write_text(os.path.join(workdir, 'report.json'), json.dumps(report, indent=1, default=float))
  images = plot(report, stage_curves, workdir) if plots else []
  fs.write_text(os.path.join(workdir, 'report.md'), markdown(report, images))
  log.info('report: %s', os.path.join(workdir, 'report.md'))


def _fmt(x, digits: int = 3) -> str:
  return '–' if x is None else f'{x:.{digits}f}'


def _get(d: dict, *keys):
  for k in keys:
    if not isinstance(d, dict) or k not in d:
      return None
    d = d[k]
  return d


def _release(path: str) -> str:
  """'v0' for the 817-question release's files (under v0/), 'v1' for the current one."""
  return 'v0' if '/v0/' in f'/{path}' else 'v1'


def markdown(report: dict, images: list[str]) -> str:
  """The report page: one table of every model against every evaluation, then the plots."""
  b = report['baseline']
  models = report['models']
  judges = sorted({j for m in models.values() for j in (m.get(f'win_rate_vs_{b}') or {})})
  tq = sorted({r for m in models.values() for r in (m.get('truthfulqa') or {})})
  cols = ['model', 'params', 'gold (sampled)', 'gold (greedy)']
  cols += [f'win vs {LABELS.get(b, b)} ({j})' for j in judges]
  cols += [f'TruthfulQA {_release(r)} {m}' for r in tq for m in ('MC1', 'MC2')]
  cols += ['tox. plain', 'tox. respectful', 'pretrain NLL', 'PIQA']
  lines = ['# rlhf_jax report', '', '| ' + ' | '.join(cols) + ' |', '|' + '---|' * len(cols)]
  for n, m in models.items():
    row = [LABELS.get(n, n), f"{m.get('params', 0):,}", _fmt(_get(m, 'gold_score', 'sampled')),
           _fmt(_get(m, 'gold_score', 'greedy'))]
    for j in judges:
      w = _get(m, f'win_rate_vs_{b}', j)
      row.append('–' if w is None else f"{w['win_rate']:.2f} [{w['ci_low']:.2f}, {w['ci_high']:.2f}]")
    for r in tq:
      row += [_fmt(_get(m, 'truthfulqa', r, 'mc1')), _fmt(_get(m, 'truthfulqa', r, 'mc2'))]
    row += [_fmt(_get(m, 'toxicity', 'plain', 'all', 'mean_toxicity')),
            _fmt(_get(m, 'toxicity', 'respectful', 'all', 'mean_toxicity')),
            _fmt(m.get('pretrain_nll')), _fmt(_get(m, 'piqa', 'acc'))]
    lines.append('| ' + ' | '.join(row) + ' |')
  counts = {f: r['n'] for m in models.values() for f, r in (m.get('by_family') or {}).items()}
  fams = sorted(counts)
  if fams:
    lines += ['', f'## By task family: gold score of samples / gold win rate vs {LABELS.get(b, b)}', '',
              '| model | ' + ' | '.join(f'{f} (n {counts[f]})' for f in fams) + ' |', '|---|' + '---|' * len(fams)]
    for n, m in models.items():
      cells = []
      for f in fams:
        g, w = _get(m, 'by_family', f, 'gold_score'), _get(m, 'by_family', f, 'win_rate_gold', 'win_rate')
        cells.append(_fmt(g) + ('' if w is None else f' / {w:.2f}'))
      lines.append(f'| {LABELS.get(n, n)} | ' + ' | '.join(cells) + ' |')
  for pair, ws in (report.get('comparisons') or {}).items():
    a, b = pair.split('_vs_')
    params = {n: models.get(n, {}).get('params') for n in (a, b)}
    lines += ['', f'## {LABELS.get(a, a)} ({params[a] or 0:,} params) vs {LABELS.get(b, b)} ({params[b] or 0:,} params)',
              '', '| judge | win rate [95 % CI] | wins / ties / losses |', '|---|---|---|']
    lines += [f"| {j} | {w['win_rate']:.3f} [{w['ci_low']:.3f}, {w['ci_high']:.3f}] | "
              f"{w['wins']} / {w['ties']} / {w['losses']} |" for j, w in ws.items()]
  rm = report.get('reward_model') or {}
  if rm:
    lines += ['', '## Reward model (held-out comparisons)', '',
              '| figure | value |', '|---|---|'] + [f'| {k} | {_fmt(v)} |' for k, v in sorted(rm.items())]
  bon = report.get('best_of_n') or {}
  if bon:
    lines += ['', f"## Best-of-n against the RM ({LABELS.get(bon['policy'], bon['policy'])}'s samples, "
              f"judged by the gold labeler)", '',
              '| n | KL bound | RM score of the pick | gold of the RM\'s pick | gold of the gold\'s pick | '
              f"win vs {LABELS.get(report['baseline'], report['baseline'])} (gold) |", '|---|---|---|---|---|---|']
    for r in bon['curve']:
      w = r.get('win_rate')
      lines.append(f"| {r['n']} | {r['kl_bound']:.2f} | {_fmt(r['proxy'])} | {_fmt(r['gold'])} | "
                   f"{_fmt(r['gold_oracle'])} | "
                   + ('–' if w is None else f"{w['win_rate']:.2f} [{w['ci_low']:.2f}, {w['ci_high']:.2f}]") + ' |')
  agr = report.get('toxicity_scorer')
  if agr:
    lines += ['', '## Toxicity scorer: agreement with Perspective on held-out records', '',
              ', '.join(f'{k} {_fmt(v) if isinstance(v, float) else v}' for k, v in agr.items())]
  secs = report.get('stage_seconds') or {}
  if secs:
    lines += ['', '## Time', '', ', '.join(f'{k} {v:.0f} s' for k, v in secs.items())
              + f", evals {report.get('eval_seconds', 0):.0f} s"]
  for n, m in models.items():
    ex = m.get('examples') or []
    if ex:
      lines += ['', f'## Samples: {LABELS.get(n, n)}', '', '| prompt | sampled | greedy |', '|---|---|---|']
      cell = lambda text: repr(text).replace('|', '\\|')  # noqa: E731  (a '|' would end the cell)
      lines += [f"| {cell(x['prompt'])} | {cell(x['sampled'])} | {cell(x['greedy'])} |" for x in ex[:4]]
  if images:
    lines += ['', '## Plots', ''] + [f'![{os.path.splitext(i)[0]}]({i})' for i in images]
  return '\n'.join(lines) + '\n'


def plot(report: dict, stage_curves: dict, workdir: str) -> list[str]:
  """PNG plots next to the report; returns their file names."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  out = []

  def save(fig, name):
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format='png', dpi=110)
    fs.write_bytes(os.path.join(workdir, name), buf.getvalue())
    plt.close(fig)
    out.append(name)

  # Training curves of each stage.
  if stage_curves:
    fig, axes = plt.subplots(1, len(stage_curves), figsize=(3.2 * len(stage_curves), 3), squeeze=False)
    for ax, (s, rows) in zip(axes[0], stage_curves.items()):
      stage = 'ppo' if s.startswith('ppo') else 'rm' if s == 'rm' else 'sft'
      key = {'sft': 'sft/loss', 'rm': 'rm/loss', 'ppo': 'objective/score'}[stage]
      pts = [(r['step'], r[key]) for r in rows if key in r]
      if pts:
        ax.plot(*zip(*pts), lw=1)
      ev = 'eval/gold_score' if stage != 'rm' else 'eval/accuracy'
      pts = [(r['step'], r[ev]) for r in rows if ev in r]
      if pts:
        ax2 = ax.twinx()
        ax2.plot(*zip(*pts), 'o-', color='C1', ms=3)
        ax2.set_ylabel(ev.split('/')[-1], color='C1', fontsize=8)
      ax.set_title(LABELS.get(s, s), fontsize=9)
      ax.set_xlabel('iteration' if stage == 'ppo' else 'step', fontsize=8)
      ax.set_ylabel(key.split('/')[-1], fontsize=8)
    save(fig, 'training_curves.png')

  # Win rate against the baseline, per model and judge.
  b = report['baseline']
  models = {n: m[f'win_rate_vs_{b}'] for n, m in report['models'].items() if m.get(f'win_rate_vs_{b}')}
  if models:
    judges = sorted({j for w in models.values() for j in w})
    fig, ax = plt.subplots(figsize=(1.4 + 1.2 * len(models), 3))
    width = 0.8 / len(judges)
    for i, j in enumerate(judges):
      xs = np.arange(len(models)) + i * width
      w = [models[n].get(j, {}).get('win_rate', np.nan) for n in models]
      lo = [w_ - models[n].get(j, {}).get('ci_low', w_) for w_, n in zip(w, models)]
      hi = [models[n].get(j, {}).get('ci_high', w_) - w_ for w_, n in zip(w, models)]
      ax.bar(xs, w, width, yerr=[lo, hi], capsize=2, label=j)
    ax.axhline(0.5, color='k', lw=0.6, ls='--')
    ax.set_xticks(np.arange(len(models)) + 0.4 - width / 2, [LABELS.get(n, n) for n in models], fontsize=8)
    ax.set_ylabel(f'win rate vs {LABELS.get(b, b)}')
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    save(fig, 'win_rates.png')

  # Reward vs KL during PPO: the RM score keeps rising while the gold score levels off or falls.
  fr = report.get('ppo_frontier') or {}
  if any(fr.values()):
    fig, axes = plt.subplots(1, 2, figsize=(7, 3))
    for s, rows in fr.items():
      kl = [r.get('kl') for r in rows]
      for ax, key in zip(axes, ('gold_score', 'rm_score')):
        pts = [(k, r[key]) for k, r in zip(kl, rows) if key in r and k is not None]
        if pts:
          ax.plot(*zip(*pts), '.-', label=LABELS.get(s, s), ms=3, lw=0.8)
    for ax, t in zip(axes, ('gold score', 'RM score')):
      ax.set_xlabel('KL(policy || SFT) per response')
      ax.set_ylabel(t)
      ax.legend(fontsize=7)
    save(fig, 'reward_vs_kl.png')

  # Best-of-n against the RM: the gold score its pick buys per nat of KL, next to the gold labeler's
  # own pick from the same draws (the ceiling) and the PPO runs' rollouts.
  bon = report.get('best_of_n') or {}
  if bon.get('curve'):
    fig, ax = plt.subplots(figsize=(4.6, 3.2))
    c = bon['curve']
    kl = [r['kl_bound'] for r in c]
    ax.plot(kl, [r['gold'] for r in c], 'o-', ms=3, label="best-of-n, RM's pick")
    ax.plot(kl, [r['gold_oracle'] for r in c], 's--', ms=3, label="best-of-n, gold's pick")
    for n_, x, y in zip([r['n'] for r in c], kl, [r['gold'] for r in c]):
      ax.annotate(f'n={n_}', (x, y), fontsize=6, xytext=(2, -8), textcoords='offset points')
    for s, rows in fr.items():
      pts = [(r['kl'], r['gold_score']) for r in rows if 'gold_score' in r and r.get('kl') is not None]
      if pts:
        ax.plot(*zip(*pts), '.', ms=3, alpha=0.6, label=f'{LABELS.get(s, s)} rollouts')
    ax.set_xlabel('KL to the sampling policy (nats per response)')
    ax.set_ylabel('gold score')
    ax.set_title(f"best-of-n from {LABELS.get(bon['policy'], bon['policy'])}", fontsize=9)
    ax.legend(fontsize=7)
    save(fig, 'best_of_n.png')

  # The alignment tax: pretraining NLL and PIQA per model.
  ms = report['models']
  if any('pretrain_nll' in m for m in ms.values()):
    panels = [('pretrain_nll', 'pretraining NLL / token (lower is better)')]
    if any('piqa' in m for m in ms.values()):
      panels.append(('piqa', 'PIQA accuracy'))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
      names = [n for n in ms if key in ms[n]]
      vals = [ms[n][key] if key != 'piqa' else ms[n][key]['acc'] for n in names]
      ax.bar(range(len(names)), vals, color=['C2' if n == 'ppo_ptx' else 'C3' if n == 'ppo' else 'C0'
                                            for n in names])
      ax.set_xticks(range(len(names)), [LABELS.get(n, n) for n in names], fontsize=7, rotation=20)
      ax.set_title(title, fontsize=9)
    save(fig, 'alignment_tax.png')
  return out
