"""Tests for the embedded synthetic task: splits, gold labeler, demonstrator, rankings."""

import dataclasses
import itertools
import random

import numpy as np
import pytest

from rlhf_jax.data import synthetic as syn
from rlhf_jax.tokenizers import ByteTokenizer


# Every family of the registry, the default task's and the harder ones it leaves out.
EVERY_FAMILY = dataclasses.replace(syn.DEFAULT_CONFIG, families=tuple(syn.FAMILIES))


def _many_prompts(split: str = 'train', n: int = 400, seed: int = 3,
                  config: syn.TaskConfig = syn.DEFAULT_CONFIG) -> list[str]:
  return [p['prompt'] for p in syn.prompts(split, n, seed, config)]


# ----------------------------------------------------------------------------
# Determinism and splits.


@pytest.mark.parametrize('builder', [syn.prompts, syn.sft_examples, syn.comparisons])
def test_builders_are_deterministic_and_seeded(builder):
  a, b = builder('train', 50, seed=7), builder('train', 50, seed=7)
  assert a == b
  assert builder('train', 50, seed=8) != a
  assert builder('train', 20, seed=7) == a[:20]  # example i does not depend on n


def test_stages_and_labelers_draw_distinct_streams():
  sft = [e['prompt'] for e in syn.sft_examples('train', 50, 0)]
  assert sft != [p['prompt'] for p in syn.prompts('train', 50, 0)]
  tr = syn.comparisons('train', 30, 0, labeler=syn.TRAIN_LABELER)
  ho = syn.comparisons('train', 30, 0, labeler=syn.HELDOUT_LABELER)
  for a, b in zip(tr, ho):  # same groups, ranked by different labelers
    assert a['prompt'] == b['prompt'] and sorted(a['responses']) == sorted(b['responses'])
    assert (a['labeler'], b['labeler']) == ('train', 'heldout')


def test_pretraining_text_deterministic_sized_and_off_distribution():
  docs = syn.pretraining_text(300, seed=1)
  assert docs == syn.pretraining_text(300, seed=1)
  assert docs != syn.pretraining_text(300, seed=2)
  assert all(32 <= len(d.encode()) <= 200 for d in docs)
  assert len(set(docs)) > 290
  for d in docs:
    with pytest.raises(ValueError):
      syn.parse(d)


def test_splits_are_disjoint_and_consistent_with_split_of():
  sets = {s: {p['prompt'] for p in syn.prompts(s, 1500 if s == 'train' else 400, 0)}
          for s in syn.SPLITS}
  for a, b in itertools.combinations(syn.SPLITS, 2):
    assert not sets[a] & sets[b], (a, b)
  for s, ps in sets.items():
    assert all(syn.split_of(p) == s for p in ps)
  # Other seeds draw other prompts but never cross the split boundary.
  assert not {p['prompt'] for p in syn.prompts('test', 400, 5)} & sets['train']


def test_heldout_families_and_templates_appear_only_in_heldout():
  cfg = syn.DEFAULT_CONFIG
  held = syn.prompts('heldout', 600, 0)
  assert {p['family'] for p in held} >= set(cfg.heldout_families)
  assert {p['template'] for p in held} >= set(cfg.heldout_templates)
  assert all(p['family'] in cfg.heldout_families or p['template'] in cfg.heldout_templates
             for p in held)
  for split in ('train', 'valid', 'test'):
    for p in syn.prompts(split, 600, 0):
      assert p['family'] not in cfg.heldout_families
      assert p['template'] not in cfg.heldout_templates
  train_families = {p['family'] for p in syn.prompts('train', 600, 0)}
  assert train_families == set(cfg.families) - set(cfg.heldout_families)


def test_config_validation():
  with pytest.raises(ValueError):
    syn.TaskConfig(families=('reverse', 'nope'))
  with pytest.raises(ValueError):
    syn.TaskConfig(heldout_templates=('reverse/9',))
  with pytest.raises(ValueError):
    syn.TaskConfig(k_min=5, k_max=4)
  cfg = syn.TaskConfig(families=('reverse', 'sort'), heldout_families=('sort',),
                       heldout_templates=())
  assert {p['family'] for p in syn.prompts('train', 50, 0, cfg)} == {'reverse'}
  assert {p['family'] for p in syn.prompts('heldout', 50, 0, cfg)} == {'sort'}


def test_byte_lengths_within_limits():
  tok = ByteTokenizer()
  for split in syn.SPLITS:
    for e in syn.sft_examples(split, 300, 0):
      assert len(tok.encode(syn.format_prompt(e['prompt']))) <= syn.MAX_PROMPT_BYTES
      assert len(tok.encode(e['response'])) <= syn.MAX_RESPONSE_BYTES
    for c in syn.comparisons(split, 100, 0):
      assert all(len(r.encode()) <= syn.MAX_RESPONSE_BYTES for r in c['responses'])


# ----------------------------------------------------------------------------
# Gold labeler.


@pytest.mark.parametrize('prompt, response, score', [
    ('How many a in banana?', '3', 1.0),
    ('How many a in banana?', '2', 0.5),  # off by one
    ('How many a in banana?', '5', 0.25),  # off by two
    ('How many a in banana?', 'three', 0.0),
    ('How many a in banana?', '03', 0.5),  # right number, wrong form
    ('Reverse: abc', 'cba', 1.0),
    ('Reverse: abc', 'abc', 0.3 + 0.4 / 3),  # right letters, one in place
    ('Sort: cab', 'abc', 1.0),
    ('Sort: cab', 'cab', 0.3),
    ('Write kiwi in upper case.', 'KIWI', 1.0),
    ('Write kiwi in upper case.', 'kiwi', 0.5),  # ignores the case constraint
    ('Repeat kiwi twice.', 'kiwi kiwi', 1.0),
    ('Repeat kiwi twice.', 'kiwi kiwi kiwi', 0.85 - 0.03 * 5),  # did not stop
    ('What is 3+4?', '7', 1.0),
    ('What is 3+4?', '8', 0.5),
    ('What is 12 minus 5?', '7', 1.0),
    ('Is 7 greater than 3? Answer yes or no.', 'yes', 1.0),
    ('Is 7 greater than 3? Answer yes or no.', 'no', 0.0),
    ('Is 7 greater than 3? Answer yes or no.', 'Yes', 0.5),  # format constraint
    ('Is 7 greater than 3? Answer yes or no.', 'true', 0.0),
    ('Is 7 greater than 3? Answer yes or no.', 'yes.', 0.82),
    ('Does kiwi contain the letter w? Answer yes or no.', 'yes', 1.0),
    ('Is 2+2 equal to 5? Answer yes or no.', 'no', 1.0),
    ('First letter of kiwi?', 'k', 1.0),
    ('Last letter: kiwi', 'i', 1.0),
    ('First letter of kiwi?', 'i', 0.2),  # a letter of the word, wrong one
    ('How many letters are in kiwi?', '4', 1.0),
    ('Reverse: abc', '', 0.0),
    ('Write KIWI in lower case.', 'kiwi', 1.0),
    ('Lowercase: KIWI', 'KIWI', 0.0),  # echoes the input: no letter of the answer
    ('Copy: kiwi', 'kiwi', 1.0),
    ('Copy: kiwi', 'Kiwi', 0.3 * 3 / 4 + 0.4 * 3 / 4),  # i, w, i right and in place; K is not k
])
def test_gold_score_hand_computed(prompt, response, score):
  assert syn.gold_score(prompt, response) == pytest.approx(score)
  assert syn.gold_score(syn.format_prompt(prompt), response) == pytest.approx(score)


def test_answers_score_one_for_every_family_and_corruptions_score_lower():
  rng = random.Random(0)
  seen = set()
  for split in syn.SPLITS:
    for p in _many_prompts(split, 300, config=EVERY_FAMILY):
      inst = syn.parse(p)
      seen.add(inst.family)
      ans = syn.answer(p)
      assert syn.gold_score(p, ans) == 1.0
      for bad in (ans + ' ok', ans + '\n', ' ' + ans, ans + ' ' + ans, ans.upper() + 'X',
                  ans[:-1], '', 'zzz qq', syn._mistake(inst, rng)):
        if bad != ans:
          assert 0.0 <= syn.gold_score(p, bad) < 1.0, (p, bad)
  assert seen == set(syn.FAMILIES)


def test_gold_score_bounded_and_trailing_junk_lowers_it():
  rng = np.random.default_rng(0)
  for p in _many_prompts('train', 300):
    ans = syn.answer(p)
    short, long = syn.gold_score(p, ans + ' a'), syn.gold_score(p, ans + ' and so on ok')
    assert 1.0 > short > long > 0.0
    for _ in range(5):
      junk = ''.join(chr(c) for c in rng.integers(32, 127, rng.integers(0, 33)))
      assert 0.0 <= syn.gold_score(p, junk) <= 1.0
  with pytest.raises(ValueError):
    syn.gold_score('Tell me a story.', 'no')


# ----------------------------------------------------------------------------
# Demonstrator and rankings.


def test_demonstrator_accuracy_and_mean_gold():
  ex = syn.sft_examples('train', 2000, 0)
  acc = np.mean([e['response'] == syn.answer(e['prompt']) for e in ex])
  assert abs(acc - syn.DEFAULT_CONFIG.demo_accuracy) < 0.05
  gold = np.mean([syn.gold_score(e['prompt'], e['response']) for e in ex])
  assert 0.6 < gold < 0.9
  rng = np.random.default_rng(0)  # public API takes numpy generators too
  p = 'Reverse: abc'
  assert {syn.demonstrate(p, rng, accuracy=1.0) for _ in range(20)} == {'cba'}
  assert 'cba' not in {syn.demonstrate(p, rng, accuracy=0.0) for _ in range(50)}


def test_numbers_spelled_out():
  assert [syn._spelled(n) for n in (0, 7, 13, 20, 42, 99)] == [
      'zero', 'seven', 'thirteen', 'twenty', 'forty-two', 'ninety-nine']


def _normal(text: str) -> str:
  return text.lower().replace(',', '').rstrip('.')


@pytest.mark.parametrize('kind', ['verbose', 'format', 'off_task', 'wrong'])
def test_each_lapse_is_of_its_kind(kind):
  """lapse_mix weighs four kinds of mistakes; with one weight alone, every mistake is of that kind."""
  mix = tuple(float(k == kind) for k in ('verbose', 'format', 'off_task', 'wrong'))
  rng = random.Random(1)
  for p in _many_prompts('train', 300, config=EVERY_FAMILY):
    inst = syn.parse(p)
    y = syn.demonstrate(p, rng, accuracy=0.0, lapse_mix=mix)
    g = syn.gold_components(p, y)
    assert y != inst.answer and g.score < 1.0
    if kind == 'verbose':        # the answer, then more: right, but it did not stop
      assert y.startswith(inst.answer) and g.correct == 1.0 and g.stop < 1.0
    elif kind == 'format':       # the answer in another form: the labeler's format check fails
      assert g.format == 0.0
      if inst.kind == 'number':
        assert y == syn._spelled(int(inst.answer))
      else:
        assert _normal(y) == _normal(inst.answer)
    elif kind == 'off_task':     # the input echoed, a hedge or an unrelated word
      word = inst.fields.get('w') or inst.fields.get('W')
      assert y == word or y in syn.LEXICON or y in ("I don't know", 'not sure', 'ok', 'maybe', 'sure')
  with pytest.raises(ValueError):
    syn.TaskConfig(lapse_mix=(0.0, 0.0, 0.0, 0.0))
  with pytest.raises(ValueError):
    syn.TaskConfig(lapse_mix=(1.0, -0.5, 0.5, 0.0))


def test_group_sizes_distinct_and_cover_the_range():
  cfg = syn.DEFAULT_CONFIG
  groups = syn.comparisons('train', 400, 0)
  sizes = [len(g['responses']) for g in groups]
  assert set(sizes) == set(range(cfg.k_min, cfg.k_max + 1))
  assert all(len(set(g['responses'])) == len(g['responses']) for g in groups)
  # A yes/no task has few plausible answers: K must still be met.
  tight = dataclasses.replace(cfg, k_min=9, k_max=9)
  for i in range(30):
    group = syn.candidates('Is 7 greater than 3? Answer yes or no.', random.Random(i), tight)
    assert len(group) == 9 == len(set(group))
  with pytest.raises(ValueError):
    syn.TRAIN_LABELER.rank('Reverse: abc', ['cba', 'cba'], random.Random(0))


def test_noiseless_labeler_sorts_by_utility():
  lab = dataclasses.replace(syn.HELDOUT_LABELER, name='exact', beta=1e-9)
  for g in syn.comparisons('valid', 100, 0, labeler=lab):
    u = [lab.utility(g['prompt'], r) for r in g['responses']]
    assert u == sorted(u, reverse=True)


def test_default_labelers_prefer_better_responses_and_disagree_sometimes():
  tr = syn.comparisons('train', 1000, 1, labeler=syn.TRAIN_LABELER)
  ho = syn.comparisons('train', 1000, 1, labeler=syn.HELDOUT_LABELER)
  for groups in (tr, ho):
    top = np.mean([syn.gold_score(g['prompt'], g['responses'][0]) for g in groups])
    bottom = np.mean([syn.gold_score(g['prompt'], g['responses'][-1]) for g in groups])
    assert top > bottom + 0.5
  agree = total = 0
  for a, b in zip(tr, ho):
    pos = {r: i for i, r in enumerate(b['responses'])}
    for x, y in itertools.combinations(a['responses'], 2):  # x above y for labeler a
      agree += pos[x] < pos[y]
      total += 1
  assert 0.6 < agree / total < 0.99
