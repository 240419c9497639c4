"""The main job in smoke size: every stage, the evaluations and the report; skipping finished stages;
stage inputs from the config; the notebook runs on the result."""
import json
import os

import pytest

from experiments import instructgpt
from rlhf_jax import recipe
from rlhf_jax.data import synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, '..', 'shared', 'data')


def smoke_config():
  c = instructgpt.get_config('smoke')
  c.evals.data_dir = DATA   # the evaluation sets; the evaluations are skipped (logged) where it is absent
  return c


STAGES = smoke_config().stages.split(',')   # pretrain .. ppo_ptx, evals (not the headline's stages)


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('recipe'))
  report = recipe.run(smoke_config(), workdir)
  return workdir, report


def test_every_stage_ran_and_the_report_is_written(run):
  workdir, report = run
  for name in STAGES:
    assert os.path.exists(recipe.done_path(workdir, name)), name
  with open(os.path.join(workdir, 'report.json')) as f:
    on_disk = json.load(f)
  assert on_disk['version'] == 1 and on_disk['baseline'] == 'sft'
  assert STAGES[0] == 'pretrain'
  assert set(on_disk['models']) == {'untrained', 'pretrain', 'sft', 'sft_mix', 'ppo', 'ppo_ptx'}
  for name, m in on_disk['models'].items():
    assert 0 <= m['gold_score']['sampled'] <= 1 and 0 <= m['gold_score']['greedy'] <= 1
    w = m['win_rate_vs_sft']
    assert set(w) == {'gold', 'heldout_labeler', 'rm'}
    for r in w.values():
      assert r['ci_low'] <= r['win_rate'] <= r['ci_high'] and r['n'] == 16
    assert m['pretrain_nll'] > 0
    # Per family: the counts cover the prompts, and their weighted gold scores and wins make up the whole.
    fam = m['by_family']
    assert set(fam) <= set(synthetic.FAMILIES) and sum(f['n'] for f in fam.values()) == 16
    assert sum(f['n'] * f['gold_score'] for f in fam.values()) / 16 == pytest.approx(m['gold_score']['sampled'])
    assert (sum(f['win_rate_gold']['wins'] + f['win_rate_gold']['ties'] / 2 for f in fam.values()) / 16
            == pytest.approx(w['gold']['win_rate']))
    if os.path.isdir(DATA):
      assert set(m['truthfulqa']) == {'eval/truthfulqa/mc_task.json', 'eval/truthfulqa/v0/mc_task.json'}
      assert 0 <= m['truthfulqa']['eval/truthfulqa/v0/mc_task.json']['mc2'] <= 1
      assert 0 <= m['piqa']['acc'] <= 1
      assert set(m['toxicity']) == {'plain', 'respectful'}
  # The baseline against itself: every prompt a tie.
  assert on_disk['models']['sft']['win_rate_vs_sft']['gold']['ties'] == 16
  assert {'accuracy', 'heldout_labeler_accuracy', 'gold_agreement'} <= set(on_disk['reward_model'])
  assert set(on_disk['ppo_frontier']) == {'ppo', 'ppo_ptx'}
  assert all({'kl', 'rm_score', 'gold_score'} <= set(r) for r in on_disk['ppo_frontier']['ppo'])
  # Best-of-n against the RM from SFT + mix's 4 draws: the gold labeler's own pick is never worse
  # than the RM's, and both start from the same random draw at n = 1.
  bon = on_disk['best_of_n']
  assert bon['policy'] == 'sft_mix' and bon['samples'] == 4 and [r['n'] for r in bon['curve']] == [1, 2, 4]
  assert bon['curve'][0]['gold'] == pytest.approx(bon['curve'][0]['gold_oracle'])
  for r in bon['curve']:
    assert r['gold'] <= r['gold_oracle'] + 1e-12 and r['win_rate']['n'] == 16
  assert [r['gold_oracle'] for r in bon['curve']] == sorted(r['gold_oracle'] for r in bon['curve'])
  for png in ('training_curves.png', 'win_rates.png', 'reward_vs_kl.png', 'alignment_tax.png', 'best_of_n.png'):
    with open(os.path.join(workdir, png), 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n', png
  with open(os.path.join(workdir, 'report.md')) as f:
    md = f.read()
  for label in ('| untrained |', '| pretrained |', '| SFT |', '| PPO |', '| PPO-ptx |', 'win_rates.png',
                '## Best-of-n'):
    assert label in md


def test_a_second_run_skips_finished_stages(run):
  workdir, _ = run
  stamps = {n: os.path.getmtime(recipe.done_path(workdir, n)) for n in STAGES}
  assert recipe.run(smoke_config(), workdir) is None      # nothing ran, so no new report
  assert stamps == {n: os.path.getmtime(recipe.done_path(workdir, n)) for n in STAGES}


def test_a_changed_evaluation_reruns_only_the_evaluation(run, tmp_path):
  """experiments/headline.py run in the main job's workdir adds comparisons: the evaluation reruns
  (in a copy of the workdir, so the other tests keep theirs), the training stages stay finished."""
  import shutil
  workdir = str(tmp_path / 'w')
  shutil.copytree(run[0], workdir)
  stamps = {n: os.path.getmtime(recipe.done_path(workdir, n)) for n in STAGES if n != 'evals'}
  c = smoke_config()
  c.evals.comparisons = 'ppo_ptx:sft_mix'
  report = recipe.run(c, workdir)
  assert set(report['comparisons']) == {'ppo_ptx_vs_sft_mix'}
  assert stamps == {n: os.path.getmtime(recipe.done_path(workdir, n)) for n in stamps}
  assert recipe.run(c, workdir) is None      # now finished with this config


def test_stage_inputs_come_from_earlier_stages_unless_given():
  c = smoke_config()
  sub = recipe.stage_config(c, 'ppo', '/w')
  assert sub.init.checkpoint == '/w/sft_mix/checkpoints' and sub.init.reward_checkpoint == '/w/rm/checkpoints'
  c.ppo.init.checkpoint = '/elsewhere/sft/checkpoints'
  sub = recipe.stage_config(c, 'ppo', '/w')
  assert sub.init.checkpoint == '/elsewhere/sft/checkpoints' and sub.init.reward_checkpoint == '/w/rm/checkpoints'
  # SFT and SFT + mix are two fine-tuning runs of the pretrained base model (InstructGPT).
  assert recipe.stage_config(c, 'sft', '/w').init.checkpoint == '/w/pretrain/checkpoints'
  assert recipe.stage_config(c, 'sft_mix', '/w').init.checkpoint == '/w/pretrain/checkpoints'
  rm = recipe.stage_config(c, 'rm', '/w').init   # InstructGPT: the RM starts from SFT, ranks the PPO policy's samples
  assert (rm.checkpoint, rm.policy_checkpoint) == ('/w/sft/checkpoints', '/w/sft_mix/checkpoints')
  c.stages = 'sft,typo'
  with pytest.raises(ValueError, match="unknown \\['typo'\\]"):
    recipe.run(c, '/w')


def test_a_stage_whose_input_stage_has_not_run_names_both(tmp_path):
  c = smoke_config()
  c.stages = 'sft'     # SFT starts from the pretraining stage's checkpoints, which do not exist here
  with pytest.raises(ValueError, match="config.sft.init.checkpoint is empty.*'pretrain'.*config.stages"):
    recipe.run(c, str(tmp_path))
  assert not os.path.exists(os.path.join(str(tmp_path), 'sft'))


def test_full_size_recipe_trains_a_6b_rm_from_a_6b_sft_run():
  """InstructGPT's RM is 6B for every policy size: the 1.3B recipe adds the stage sft_rm and starts the
  RM from it (`{workdir}` in a config's init path is the recipe's workdir), ranking samples of the
  1.3B SFT + mix policy; PPO's value network starts from the RM, its policy from the 1.3B SFT + mix."""
  from experiments import instructgpt
  c = instructgpt.get_config('size=1.3b')
  assert c.stages.split(',')[:4] == ['sft', 'sft_mix', 'sft_rm', 'rm']
  # No pretraining stage at full size: SFT and SFT + mix start from init.checkpoint (a pretrained LM).
  assert 'pretrain' not in c and recipe.stage_config(c, 'sft_mix', 'gs://b/run').init.checkpoint == ''
  assert c.sft_rm.model.d_model == c.rm.model.d_model == 4096 and c.ppo.model.d_model == 2048
  rm = recipe.stage_config(c, 'rm', 'gs://b/run').init
  assert (rm.checkpoint, rm.policy_checkpoint) == ('gs://b/run/sft_rm/checkpoints', 'gs://b/run/sft_mix/checkpoints')
  ppo = recipe.stage_config(c, 'ppo', 'gs://b/run').init
  assert (ppo.checkpoint, ppo.reward_checkpoint) == ('gs://b/run/sft_mix/checkpoints', 'gs://b/run/rm/checkpoints')
  assert 'sft_rm' not in instructgpt.get_config('size=6b')   # the policy's own SFT + mix is 6B already


def test_the_notebook_executes(run, monkeypatch):
  workdir, _ = run
  monkeypatch.setenv('RLHF_WORKDIR', workdir)
  monkeypatch.setenv('RLHF_NOTEBOOK_PROMPTS', '16')
  with open(os.path.join(ROOT, 'experiments', 'walkthrough.ipynb')) as f:
    nb = json.load(f)
  scope = {}
  for cell in nb['cells']:
    if cell['cell_type'] == 'code':
      exec(compile(''.join(cell['source']), 'walkthrough.ipynb', 'exec'), scope)
  assert set(scope['lms']) == {'sft', 'sft_mix', 'ppo', 'ppo_ptx'}
  assert len(scope['samples']['ppo']) == 6
  assert scope['results']['sft']['win_rate'] == 0.5
  assert set(scope['report']['models']) >= {'sft', 'ppo'}


def test_evaluations_run_from_the_command_line(run):
  import subprocess
  import sys
  workdir, _ = run
  out = subprocess.run([sys.executable, '-m', 'rlhf_jax.evals', f'--checkpoint={workdir}/ppo/checkpoints',
                        f'--baseline={workdir}/sft/checkpoints', '--evals=gold,winrate,pretrain_nll,best_of_n',
                        '--judge=heldout_labeler', f'--reward_checkpoint={workdir}/rm/checkpoints',
                        '--samples=2', '--n=8', '--gen_len=8'],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  res = json.loads(out.stdout[out.stdout.index('{'):])
  assert set(res) >= {'gold_score', 'win_rate', 'pretrain_nll'}
  assert res['win_rate']['heldout_labeler']['n'] == 8 and res['pretrain_nll'] > 0
  assert [r['n'] for r in res['best_of_n']['curve']] == [1, 2] and res['best_of_n']['curve'][1]['win_rate']['n'] == 8
