"""The embedded default task: synthetic instructions with a gold labeler.

The main job must run on a fresh machine with no files, so its data is made
here, in the spirit of gold-reward-model studies (Gao et al. 2022):

  * prompts: short instructions from a few task families (by default upper
    and lower case, copy, repeat, a pair of words, and the held-out length;
    `FAMILIES` has more), split by a hash of the prompt text into
    train/valid/test, plus a `heldout` split of whole families and templates
    never seen in training;
  * `gold_score`: a program that grades any response in [0, 1] (correctness,
    explicit format constraints, stopping properly), standing in for humans;
  * `demonstrate`: a noisy demonstrator, right only part of the time, so RLHF
    has room to improve on imitation. Its lapses are mostly behavioural (not
    stopping, the wrong form, not doing the task) rather than wrong answers:
    a small model learns the skills, samples the lapses it imitated, and a
    reward model of its size can learn to see them, as in InstructGPT, where
    RLHF mostly fixes following the instruction rather than knowledge;
  * `Labeler`: Plackett-Luce rankings of K candidate responses on the gold
    utility with noise; two labelers differ slightly, to measure how a reward
    model generalises to held-out labelers;
  * `pretraining_text`: an off-distribution corpus for PPO-ptx.

Everything is a pure function of its seed (never global RNG state). Texts are
ASCII, so byte lengths equal string lengths: prompts stay within
`MAX_PROMPT_BYTES` and responses within `MAX_RESPONSE_BYTES`, small enough for
a ~1M-parameter byte-level model to learn on CPU in minutes.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import math
import random
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    'MAX_PROMPT_BYTES', 'MAX_RESPONSE_BYTES', 'SPLITS', 'FAMILIES', 'LEXICON',
    'TaskConfig', 'DEFAULT_CONFIG', 'Instance', 'parse', 'answer',
    'format_prompt', 'split_of', 'Gold', 'gold_components', 'gold_score',
    'demonstrate', 'candidates', 'Labeler', 'TRAIN_LABELER', 'HELDOUT_LABELER',
    'LABELERS', 'prompts', 'sft_examples', 'comparisons', 'pretraining_text',
]

MAX_PROMPT_BYTES = 64
MAX_RESPONSE_BYTES = 32
SPLITS = ('train', 'valid', 'test', 'heldout')

# ----------------------------------------------------------------------------
# Lexicon: a few hundred short lowercase words, tagged for the tiny grammar of
# the pretraining corpus.

_NOUNS = tuple('''
cat dog fox owl bee ant cow pig hen bat rat elk yak emu ape eel cod bird fish
frog duck goat lamb mole mouse horse tiger zebra panda koala camel otter lion
bear wolf deer seal crab snail apple pear plum kiwi lemon lime mango grape
melon peach berry olive onion bean corn rice bread cake honey salt sugar milk
tea soup pie jam nut egg tree leaf rose lily moss fern seed root stone rock
sand hill lake river sea moon star sun rain snow wind cloud storm fire road
town city farm house door room roof wall desk chair lamp book pen cup bowl box
bag hat coat shoe sock ring bell drum kite ship boat train car bus map key coin
clock song game toy ball doll king queen baker child pilot nurse farmer
'''.split())
_VERBS = tuple('''
see like find take hold make want need keep move pull help love hear eat read
open build break visit jump sing paint draw write bring send call greet meet
chase guard count'''.split())
_ADJS = tuple('''
red blue green black white pink gray brown gold small big tall short long tiny
huge old young new fast slow warm cold hot cool soft hard loud quiet happy sad
calm wild brave kind shy wise dark light bright sweet sour fresh dry wet clean
round flat thin thick rich poor busy lazy'''.split())
LEXICON = tuple(sorted({w for w in _NOUNS + _VERBS + _ADJS if 3 <= len(w) <= 7}))
_LETTERS = 'abcdefghijklmnopqrstuvwxyz'
_RANDOM_WORD_P = 0.25  # share of random letter strings among task words


# ----------------------------------------------------------------------------
# Randomness. Every draw goes through `rng.random()`, so callers may pass a
# `np.random.Generator` or a `random.Random`. Builders key one `random.Random`
# per example by (seed, stream, split, index): its seeding and scalar draws
# cost a fraction of numpy's, which keeps 10^4-example sets near a second, and
# example i does not depend on how many are drawn.

Rng = np.random.Generator | random.Random


def _rng(*keys: int | str) -> random.Random:
  """A private generator for one example; str seeds hash stably (SHA-512)."""
  return random.Random('|'.join(map(str, keys)))


def _pick(rng: Rng, seq: Sequence[Any]) -> Any:
  return seq[int(rng.random() * len(seq))]


def _randint(rng: Rng, lo: int, hi: int) -> int:
  """Uniform integer in [lo, hi], inclusive."""
  return lo + int(rng.random() * (hi - lo + 1))


def _letters(rng: Rng, lo: int, hi: int) -> str:
  return ''.join(_pick(rng, _LETTERS) for _ in range(_randint(rng, lo, hi)))


def _word(rng: Rng) -> str:
  """A lexicon word, or a random letter string so skills cannot be memorised."""
  return _letters(rng, 3, 6) if rng.random() < _RANDOM_WORD_P else _pick(rng, LEXICON)


def _clip(text: str) -> str:
  return text[:MAX_RESPONSE_BYTES]


# ----------------------------------------------------------------------------
# Task families. A template index selects the question form; `sample` draws
# its fields and `solve` computes the one correct response from them.

Fields = dict[str, str]


@dataclasses.dataclass(frozen=True)
class _Family:
  kind: str  # how gold scores partial answers: word|upper|number|yesno|letter
  templates: tuple[str, ...]
  sample: Callable[[Rng, int], Fields]
  solve: Callable[[int, Fields], str]


def _sample_count(rng: Rng, _: int) -> Fields:
  w = _word(rng)
  return {'w': w, 'c': _pick(rng, w) if rng.random() < 0.7 else _pick(rng, _LETTERS)}


def _sample_arith(rng: Rng, _: int) -> Fields:
  a, b, op = _randint(rng, 0, 20), _randint(rng, 0, 20), _pick(rng, '+-')
  a, b = (max(a, b), min(a, b)) if op == '-' else (a, b)
  return {'a': str(a), 'b': str(b), 'op': op, 'opw': 'plus' if op == '+' else 'minus'}


def _solve_arith(_: int, f: Fields) -> str:
  op = f.get('op') or {'plus': '+', 'minus': '-'}[f['opw']]
  a, b = int(f['a']), int(f['b'])
  return str(a + b if op == '+' else a - b)


def _sample_yesno(rng: Rng, t: int) -> Fields:
  if t == 2:
    w = _word(rng)
    return {'w': w, 'c': _pick(rng, w) if rng.random() < 0.5 else _pick(rng, _LETTERS)}
  a, b = _randint(rng, 0, 20), _randint(rng, 0, 20)
  if t in (0, 1):
    b = b if a != b else (a + 1) % 21
    return {'a': str(a), 'b': str(b)}
  s = a + b + (0 if rng.random() < 0.5 else _pick(rng, (-2, -1, 1, 2)))
  return {'a': str(a), 'b': str(b), 's': str(max(s, 0))}


def _solve_yesno(t: int, f: Fields) -> str:
  if t == 2:
    truth = f['c'] in f['w']
  else:
    a, b = int(f['a']), int(f['b'])
    truth = [a > b, a < b, None, a + b == int(f.get('s', -1))][t]
  return 'yes' if truth else 'no'


_YN = ' Answer yes or no.'
FAMILIES: dict[str, _Family] = {
    'reverse': _Family('word', (
        'Reverse: {w}', 'Reverse the word {w}.', 'Write {w} backwards.',
        'Spell {w} in reverse order.'),
        lambda rng, t: {'w': _word(rng)}, lambda t, f: f['w'][::-1]),
    'sort': _Family('word', (
        'Sort the letters of {w}.', 'Sort: {w}',
        'Put the letters of {w} in alphabetical order.'),
        lambda rng, t: {'w': _word(rng)}, lambda t, f: ''.join(sorted(f['w']))),
    'count': _Family('number', (
        'How many {c} in {w}?', 'Count the letter {c} in {w}.',
        'How many times does {c} appear in {w}?'),
        _sample_count, lambda t, f: str(f['w'].count(f['c']))),
    'upper': _Family('upper', (
        'Write {w} in upper case.', 'Uppercase: {w}',
        'Say {w} in capital letters.'),
        lambda rng, t: {'w': _word(rng)}, lambda t, f: f['w'].upper()),
    'repeat': _Family('word', (
        'Repeat {w} {t}.', 'Say {w} {t}.', 'Write the word {w} {t}.'),
        lambda rng, t: {'w': _word(rng), 't': _pick(rng, ('twice', '3 times'))},
        lambda t, f: ' '.join([f['w']] * (2 if f['t'] == 'twice' else 3))),
    'arith': _Family('number', (
        'What is {a}{op}{b}?', 'Compute {a} {op} {b}.', 'What is {a} {opw} {b}?',
        '{a} {opw} {b} equals?'),
        _sample_arith, _solve_arith),
    'yesno': _Family('yesno', (
        'Is {a} greater than {b}?' + _YN, 'Is {a} less than {b}?' + _YN,
        'Does {w} contain the letter {c}?' + _YN, 'Is {a}+{b} equal to {s}?' + _YN),
        _sample_yesno, _solve_yesno),
    'letter': _Family('letter', (
        'First letter of {w}?', 'What is the last letter of {w}?',
        'Last letter: {w}', 'What is the first letter of {w}?'),
        lambda rng, t: {'w': _word(rng)},
        lambda t, f: f['w'][0] if t in (0, 3) else f['w'][-1]),
    'lower': _Family('word', (
        'Write {W} in lower case.', 'Lowercase: {W}', 'Say {W} in small letters.'),
        lambda rng, t: {'W': _word(rng).upper()}, lambda t, f: f['W'].lower()),
    'copy': _Family('word', (
        'Copy: {w}', 'Write {w}.', 'Repeat after me: {w}'),
        lambda rng, t: {'w': _word(rng)}, lambda t, f: f['w']),
    'pair': _Family('word', (
        'Write {w} then {v}.', 'Say {w} and {v}.', 'Write {v} after {w}.'),
        lambda rng, t: {'w': _word(rng), 'v': _word(rng)}, lambda t, f: f'{f["w"]} {f["v"]}'),
    'length': _Family('number', (
        'How many letters are in {w}?', 'Length of {w}?',
        'How long is the word {w}?'),
        lambda rng, t: {'w': _word(rng)}, lambda t, f: str(len(f['w']))),
}

_FIELD_PATTERNS = {'w': '[a-z]+', 'W': '[A-Z]+', 'v': '[a-z]+', 'c': '[a-z]', 'a': r'\d+', 'b': r'\d+',
                   's': r'\d+', 'op': '[+-]', 'opw': 'plus|minus',
                   't': 'twice|3 times'}


def _compile(template: str) -> tuple[re.Pattern[str], tuple[str, ...]]:
  """A template as a full-match regex, so any prompt can be parsed back."""
  parts = re.split(r'\{(\w+)\}', template)
  names = tuple(parts[1::2])
  regex = ''.join(re.escape(p) if i % 2 == 0 else f'(?P<{p}>{_FIELD_PATTERNS[p]})'
                  for i, p in enumerate(parts))
  return re.compile(regex), names


_PARSERS = {(name, t): _compile(tpl) for name, fam in FAMILIES.items()
            for t, tpl in enumerate(fam.templates)}


class Instance(NamedTuple):
  """A parsed prompt: which family/template it is and its correct answer."""
  prompt: str
  family: str
  template: str  # '<family>/<index>'
  fields: Fields
  answer: str

  @property
  def kind(self) -> str:
    return FAMILIES[self.family].kind


def _instance(family: str, t: int, fields: Fields) -> Instance:
  fam = FAMILIES[family]
  _, names = _PARSERS[family, t]
  fields = {k: fields[k] for k in names}
  return Instance(fam.templates[t].format(**fields), family, f'{family}/{t}',
                  fields, fam.solve(t, fields))


@functools.lru_cache(maxsize=1 << 16)
def parse(prompt: str) -> Instance:
  """Recovers the task from prompt text (raw or `format_prompt`-ed)."""
  text = prompt.strip()
  for (family, t), (regex, _) in _PARSERS.items():
    m = regex.fullmatch(text)
    if m:
      return _instance(family, t, m.groupdict())
  raise ValueError(f'not a prompt of the synthetic task: {prompt!r}')


def answer(prompt: str) -> str:
  """The correct response (the text before EOS) for a prompt."""
  return parse(prompt).answer


def format_prompt(prompt: str) -> str:
  """What every stage feeds the model: the response starts after the newline."""
  return prompt + '\n'


# ----------------------------------------------------------------------------
# Configuration and splits.


@functools.lru_cache(maxsize=64)
def _cells(config: TaskConfig, split: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
  """(family, template indices) a split draws from; families weigh equally."""
  held = split == 'heldout'
  out = []
  for fam in config.families:
    ts = tuple(t for t in range(len(FAMILIES[fam].templates))
               if (fam in config.heldout_families
                   or f'{fam}/{t}' in config.heldout_templates) == held)
    if ts:
      out.append((fam, ts))
  return tuple(out)


@dataclasses.dataclass(frozen=True)
class TaskConfig:
  """What the task is; builder calls choose only which samples to draw."""
  seed: int = 0  # salts the train/valid/test hash split and default streams
  families: tuple[str, ...] = ('upper', 'lower', 'copy', 'repeat', 'pair', 'length')
  heldout_families: tuple[str, ...] = ('length',)
  heldout_templates: tuple[str, ...] = (
      'upper/2', 'lower/2', 'copy/2')
  split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
  demo_accuracy: float = 0.4
  # How the demonstrator errs when it does (weights): not stopping after the answer, the answer in a
  # form the instruction did not ask for (case, a spelled-out number, separators), not doing the task
  # (echoing the input, hedging, an unrelated word), a wrong answer in the right form (a typo, off by
  # one). The first three are lapses a labeler sees at a glance; the last needs the task solved.
  lapse_mix: tuple[float, float, float, float] = (0.45, 0.3, 0.15, 0.1)
  k_min: int = 4
  k_max: int = 9
  # Where ranking candidates come from: demonstrator, corrupted answer,
  # the answer itself, junk.
  candidate_mix: tuple[float, float, float, float] = (0.35, 0.35, 0.1, 0.2)
  n_sft: int = 20_000
  n_comparisons: int = 10_000
  n_prompts: int = 20_000
  n_eval: int = 500  # default size of valid/test/heldout sets

  def __post_init__(self):
    unknown = set(self.families + self.heldout_families) - set(FAMILIES)
    if unknown:
      raise ValueError(f'unknown families {sorted(unknown)}')
    for tid in self.heldout_templates:
      fam, _, t = tid.partition('/')
      if fam not in FAMILIES or not t.isdigit() or int(t) >= len(FAMILIES[fam].templates):
        raise ValueError(f'unknown template {tid!r}')
    if not 2 <= self.k_min <= self.k_max:
      raise ValueError(f'need 2 <= k_min <= k_max, got {self.k_min}, {self.k_max}')
    if not 0.0 <= self.demo_accuracy <= 1.0:
      raise ValueError(f'demo_accuracy must be in [0, 1], got {self.demo_accuracy}')
    if len(self.lapse_mix) != 4 or min(self.lapse_mix) < 0 or not sum(self.lapse_mix) > 0:
      raise ValueError(f'lapse_mix must be 4 non-negative weights, not all 0, got {self.lapse_mix}')
    if not _cells(self, 'train') or not _cells(self, 'heldout'):
      raise ValueError('both training and held-out prompts must be possible')


DEFAULT_CONFIG = TaskConfig()


def split_of(prompt: str, config: TaskConfig = DEFAULT_CONFIG) -> str:
  """The one split a prompt belongs to: held-out by construction, else a hash."""
  inst = parse(prompt)
  if inst.family in config.heldout_families or inst.template in config.heldout_templates:
    return 'heldout'
  return _hash_split(inst.prompt, config)


def _hash_split(prompt: str, config: TaskConfig) -> str:
  digest = hashlib.blake2b(f'{config.seed}|{prompt}'.encode(), digest_size=8).digest()
  u = int.from_bytes(digest, 'little') / 2.0**64
  f_train, f_valid, _ = config.split_fractions
  return 'train' if u < f_train else 'valid' if u < f_train + f_valid else 'test'


def _sample_instance(rng: Rng, split: str, config: TaskConfig) -> Instance:
  """Draws until the prompt hashes into `split`, keeping splits disjoint."""
  if split not in SPLITS:
    raise ValueError(f'split must be one of {SPLITS}, got {split!r}')
  cells = _cells(config, split)
  for _ in range(10_000):
    fam, ts = _pick(rng, cells)
    t = _pick(rng, ts)
    fields = FAMILIES[fam].sample(rng, t)
    if split == 'heldout' or _hash_split(FAMILIES[fam].templates[t].format(**fields),
                                         config) == split:
      return _instance(fam, t, fields)
  raise RuntimeError(f'split {split!r} is (nearly) empty under {config}')


# ----------------------------------------------------------------------------
# Gold labeler.


class Gold(NamedTuple):
  """Gold score components; `score` = correct * stop."""
  correct: float  # task credit of the answer part, partial for near misses
  format: float  # 1 when the answer part has the asked form (yes/no, digits, ...)
  stop: float  # 1 when nothing follows the answer, lower with trailing text
  length: int  # response bytes
  score: float


_PUNCT = '.,!?;:'


def _head(response: str, answer: str) -> str:
  """The answer part: as many leading space-separated tokens as the answer has."""
  core = response.lstrip()
  if not core:
    return ''
  head = re.match(r'\S+(?: \S+){0,%d}' % answer.count(' '), core).group()
  return head.rstrip(_PUNCT) if answer[-1] not in _PUNCT else head


def _overlap(head: str, ans: str) -> float:
  """Partial credit < 0.7: right letters (any order) and right positions."""
  if not head:
    return 0.0
  n = max(len(head), len(ans))
  letters = sum(min(head.count(ch), ans.count(ch)) for ch in set(ans)) / n
  placed = sum(x == y for x, y in zip(head, ans)) / n
  return 0.3 * letters + 0.4 * placed


def _credit(inst: Instance, head: str) -> float:
  ans, kind = inst.answer, inst.kind
  if head == ans:
    return 1.0
  if kind == 'number':
    if not (head.isascii() and head.isdigit()):
      return 0.0
    d = abs(int(head) - int(ans))  # d == 0 here means a form like '07'
    return 0.5**max(d, 1) if d <= 3 else 0.0
  if kind == 'yesno':
    return 0.5 if head.lower() == ans else 0.0
  if kind == 'letter':
    if head.lower() == ans:
      return 0.5
    return 0.2 if len(head) == 1 and head in inst.fields['w'] else 0.0
  if kind == 'upper':
    if head.upper() == ans:
      return 0.5
    return _overlap(head.upper(), ans) * (1.0 if head.isupper() else 0.6)
  return _overlap(head, ans)


def _format_ok(kind: str, head: str) -> bool:
  if kind == 'number':
    return head.isascii() and head.isdigit()
  if kind == 'yesno':
    return head in ('yes', 'no')
  if kind == 'letter':
    return len(head) == 1 and head.islower()
  if kind == 'upper':
    return head.replace(' ', '').isalpha() and head.isupper()
  return bool(head) and head.replace(' ', '').isalpha() and head.islower()


def gold_components(prompt: str, response: str) -> Gold:
  """Grades a response (the text before EOS) against the prompt's task.

  The answer part is the leading tokens (as many as the answer has; trailing
  punctuation peeled off). Anything else, leading spaces included, is extra
  text: it costs at least 15% and at most 60% of the score, so models must stop.
  """
  inst = parse(prompt)
  head = _head(response, inst.answer)
  extra = len(response) - len(head)
  correct = _credit(inst, head)
  stop = 1.0 if extra == 0 else max(0.4, 0.85 - 0.03 * extra)
  return Gold(correct, float(_format_ok(inst.kind, head)), stop, len(response.encode()),
              correct * stop)


def gold_score(prompt: str, response: str) -> float:
  """Gold reward in [0, 1]; 1.0 exactly for `answer(prompt)` and nothing else."""
  return gold_components(prompt, response).score


# ----------------------------------------------------------------------------
# Noisy demonstrator and ranking candidates.


def _typo(rng: Rng, s: str) -> str:
  i = _randint(rng, 0, len(s) - 1)
  op = rng.random()
  if op < 0.4:
    return s[:i] + _pick(rng, _LETTERS) + s[i + 1:]
  if op < 0.7 and len(s) > 1:
    return s[:i] + s[i + 1:]
  if op < 0.9 and i + 1 < len(s):
    return s[:i] + s[i + 1] + s[i] + s[i + 2:]
  return s[:i] + _pick(rng, _LETTERS) + s[i:]


def _wrong(inst: Instance, rng: Rng) -> str:
  """A plausible task-specific mistake (may rarely equal the answer)."""
  ans, f, kind, r = inst.answer, inst.fields, inst.kind, rng.random()
  if kind == 'number':
    return str(max(0, int(ans) + _pick(rng, (-2, -1, -1, 1, 1, 2))))
  if kind == 'yesno':
    flip = 'no' if ans == 'yes' else 'yes'
    return flip if r < 0.6 else ans.capitalize() if r < 0.8 else _pick(rng, ('maybe', 'Yes', 'No'))
  if kind == 'letter':
    w = f['w']
    return _pick(rng, w) if r < 0.5 else ans.upper() if r < 0.8 else w
  if kind == 'upper':
    return (f['w'] if r < 0.3 else f['w'].capitalize() if r < 0.5
            else _typo(rng, ans))
  if inst.family == 'repeat' and r < 0.4:
    n = ans.count(' ') + 1
    return ' '.join([f['w']] * (n + _pick(rng, (-1, 1))))
  if inst.family in ('reverse', 'sort') and r < 0.4:  # untransformed or the other skill
    w = f['w']
    return w if r < 0.2 else ''.join(sorted(w)) if inst.family == 'reverse' else w[::-1]
  return _typo(rng, ans)


def _verbose(text: str, rng: Rng) -> str:
  """Failing to stop: polite filler, repetition or a rambling continuation."""
  r = rng.random()
  if r < 0.4:
    tail = _pick(rng, ('.', '!', ' please', ' ok', ' done', ' thanks', '\n'))
  elif r < 0.6:
    tail = ' ' + text
  elif r < 0.8:
    tail = '\n' + _pick(rng, LEXICON)
  else:
    tail = ' ' + ' '.join(_pick(rng, LEXICON) for _ in range(_randint(rng, 1, 3)))
  return _clip(text + tail)


_NUMBER_WORDS = ('zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen '
                 'fifteen sixteen seventeen eighteen nineteen').split()
_TENS = ('', '', 'twenty', 'thirty', 'forty', 'fifty', 'sixty', 'seventy', 'eighty', 'ninety')


def _spelled(n: int) -> str:
  """0 <= n < 100 in words ('forty-two')."""
  if n < 20:
    return _NUMBER_WORDS[n]
  return _TENS[n // 10] + ('-' + _NUMBER_WORDS[n % 10] if n % 10 else '')


def _format_lapse(inst: Instance, rng: Rng) -> str:
  """The right answer in a form the instruction did not ask for."""
  ans, kind = inst.answer, inst.kind
  if kind == 'number':
    return _spelled(int(ans))
  if kind == 'yesno':
    return _pick(rng, (ans.capitalize(), ans.upper(), ans.capitalize() + '.'))
  if kind == 'letter':
    return ans.upper()
  if kind == 'upper':
    return _pick(rng, (inst.fields['w'], inst.fields['w'].capitalize()))
  return _pick(rng, (ans.capitalize(), ans.upper(), ans.replace(' ', ', ')))


def _off_task(inst: Instance, rng: Rng) -> str:
  """Not doing the task: echoing the input, hedging, or an unrelated word."""
  r = rng.random()
  word = inst.fields.get('w') or inst.fields.get('W')
  if r < 0.4 and word:
    return word
  if r < 0.7:
    return _pick(rng, ("I don't know", 'not sure', 'ok', 'maybe', 'sure'))
  return _pick(rng, LEXICON)


def _mistake(inst: Instance, rng: Rng, lapse_mix: Sequence[float] = DEFAULT_CONFIG.lapse_mix) -> str:
  """Any response other than the answer, as an imperfect demonstrator errs: by `lapse_mix`, not
  stopping after the answer, the answer in the wrong form, not doing the task, or a wrong answer."""
  total = sum(lapse_mix)
  cum = [c / total for c in itertools.accumulate(lapse_mix)]
  for _ in range(20):
    r = rng.random()
    if r < cum[0]:
      text = _verbose(inst.answer, rng)
    elif r < cum[1]:
      text = _format_lapse(inst, rng)
    elif r < cum[2]:
      text = _off_task(inst, rng)
    else:
      text = _wrong(inst, rng)
    text = _clip(text)
    if text != inst.answer:
      return text
  return inst.answer + '.'


def demonstrate(prompt: str, rng: Rng, accuracy: float = DEFAULT_CONFIG.demo_accuracy,
                lapse_mix: Sequence[float] = DEFAULT_CONFIG.lapse_mix) -> str:
  """A labeler's demonstration: exactly right with probability `accuracy`, else a lapse."""
  inst = parse(prompt)
  return inst.answer if rng.random() < accuracy else _mistake(inst, rng, lapse_mix)


def _junk(inst: Instance, rng: Rng) -> str:
  r = rng.random()
  if r < 0.15:
    return ''
  if r < 0.4:
    return _letters(rng, 1, 10)
  if r < 0.7:
    return ' '.join(_pick(rng, LEXICON) for _ in range(_randint(rng, 1, 4)))
  if r < 0.85:
    return str(_randint(rng, 0, 99))
  return _pick(rng, ("I don't know", 'ok', 'yes', 'no', 'maybe', inst.fields.get('w', 'what')))


def candidates(prompt: str, rng: Rng,
               config: TaskConfig = DEFAULT_CONFIG) -> list[str]:
  """K distinct responses to rank, K uniform in [k_min, k_max].

  Identical strings would tie with themselves, so duplicates are dropped and
  sources are redrawn; should a small response space (e.g. yes/no) still fall
  short, numbered verbose variants of the answer fill it, so K is always met.
  """
  inst = parse(prompt)
  k = _randint(rng, config.k_min, config.k_max)
  total = sum(config.candidate_mix)
  cum = [c / total for c in itertools.accumulate(config.candidate_mix)]
  seen: dict[str, None] = {}
  for _ in range(8 * k):
    if len(seen) == k:
      break
    r = rng.random()
    if r < cum[0]:
      text = demonstrate(prompt, rng, config.demo_accuracy, config.lapse_mix)
    elif r < cum[1]:
      text = _mistake(inst, rng, config.lapse_mix)
      text = _verbose(text, rng) if rng.random() < 0.3 else text
    elif r < cum[2]:
      text = inst.answer
    else:
      text = _junk(inst, rng)
    seen[_clip(text)] = None
  i = 0
  while len(seen) < k:
    seen[_clip(f'{inst.answer} {i}')] = None
    i += 1
  return list(seen)


@dataclasses.dataclass(frozen=True)
class Labeler:
  """A simulated labeler: Plackett-Luce choices on a noisy gold utility.

  utility = correct * stop**stop_weight + format_weight * (format - 1)
            + length_weight * min(bytes, 32) / 32
  With the default weights the utility is the gold score. `beta` is the
  temperature: a full ranking is drawn with P(best = i) ∝ exp(u_i / beta),
  then recursively on the rest (Gumbel-max sorting, exact for Plackett-Luce).
  """
  name: str
  beta: float
  stop_weight: float = 1.0
  format_weight: float = 0.0
  length_weight: float = 0.0

  def utility(self, prompt: str, response: str) -> float:
    g = gold_components(prompt, response)
    return (g.correct * g.stop**self.stop_weight + self.format_weight * (g.format - 1.0)
            + self.length_weight * min(g.length, MAX_RESPONSE_BYTES) / MAX_RESPONSE_BYTES)

  def rank(self, prompt: str, responses: Sequence[str],
           rng: Rng) -> list[str]:
    """Responses best first; duplicates must already be removed."""
    if len(set(responses)) != len(responses):
      raise ValueError('duplicate responses cannot be ranked; dedupe first')
    keys = [self.utility(prompt, r) / self.beta - math.log(-math.log(max(rng.random(), 1e-300)))
            for r in responses]
    return [responses[i] for i in sorted(range(len(keys)), key=lambda i: -keys[i])]


TRAIN_LABELER = Labeler('train', beta=0.1)
# Stricter about stopping and format, likes brevity, a little less noisy.
HELDOUT_LABELER = Labeler('heldout', beta=0.08, stop_weight=2.0, format_weight=0.1,
                          length_weight=-0.05)
LABELERS = {lab.name: lab for lab in (TRAIN_LABELER, HELDOUT_LABELER)}


# ----------------------------------------------------------------------------
# Dataset builders: plain Python lists, identical for identical arguments.
# Each stage draws from its own stream, so the same seed gives different
# prompts to SFT, the reward model and RL.


def _defaults(split: str, n: int | None, seed: int | None, config: TaskConfig,
              n_train: int) -> tuple[int, int]:
  """Unset sizes and seeds come from the config."""
  if n is None:
    n = n_train if split == 'train' else config.n_eval
  return n, config.seed if seed is None else seed


def prompts(split: str, n: int | None = None, seed: int | None = None,
            config: TaskConfig = DEFAULT_CONFIG) -> list[dict[str, str]]:
  """Prompts for RL and evaluation: {'prompt', 'family', 'template'}."""
  n, seed = _defaults(split, n, seed, config, config.n_prompts)
  out = []
  for i in range(n):
    inst = _sample_instance(_rng(seed, 'rl', split, i), split, config)
    out.append({'prompt': inst.prompt, 'family': inst.family, 'template': inst.template})
  return out


def sft_examples(split: str, n: int | None = None, seed: int | None = None,
                 config: TaskConfig = DEFAULT_CONFIG) -> list[dict[str, str]]:
  """Demonstrations: {'prompt', 'response', 'family'}; responses are noisy."""
  n, seed = _defaults(split, n, seed, config, config.n_sft)
  out = []
  for i in range(n):
    rng = _rng(seed, 'sft', split, i)
    inst = _sample_instance(rng, split, config)
    out.append({'prompt': inst.prompt, 'family': inst.family,
                'response': demonstrate(inst.prompt, rng, config.demo_accuracy, config.lapse_mix)})
  return out


def comparisons(split: str, n: int | None = None, seed: int | None = None,
                labeler: Labeler = TRAIN_LABELER,
                config: TaskConfig = DEFAULT_CONFIG) -> list[dict[str, Any]]:
  """Ranked groups: {'prompt', 'responses' (best first), 'labeler', 'family'}.

  Candidates do not depend on the labeler, so two labelers rank the very same
  groups and their agreement can be measured directly.
  """
  n, seed = _defaults(split, n, seed, config, config.n_comparisons)
  out = []
  for i in range(n):
    rng = _rng(seed, 'rm', split, i)
    inst = _sample_instance(rng, split, config)
    group = candidates(inst.prompt, rng, config)
    ranked = labeler.rank(inst.prompt, group, _rng(seed, 'rank', labeler.name, split, i))
    out.append({'prompt': inst.prompt, 'responses': ranked, 'labeler': labeler.name,
                'family': inst.family})
  return out


# ----------------------------------------------------------------------------
# Pretraining corpus: simple prose, number runs and word lists, a different
# distribution from the instructions, for PPO-ptx and the alignment tax.

_SENTENCES = (
    'the {a} {n} {v}s the {m}.', 'a {n} {v}s a {a} {m}.', 'the {n} is {a}.',
    'every {n} can {v}.', 'the {n} and the {m} {v} together.',
    'my {n} is {a} and {b}.', 'we {v} the {a} {n} near the {m}.')


def _sentence(rng: Rng) -> str:
  s = _pick(rng, _SENTENCES).format(
      a=_pick(rng, _ADJS), b=_pick(rng, _ADJS), n=_pick(rng, _NOUNS),
      m=_pick(rng, _NOUNS), v=_pick(rng, _VERBS))
  return s[0].upper() + s[1:]


def pretraining_text(n_docs: int, seed: int = 0) -> list[str]:
  """`n_docs` documents of 32-200 bytes: prose, number runs or word lists."""
  docs = []
  for i in range(n_docs):
    rng = _rng(seed, 'ptx', i)
    target, r = _randint(rng, 32, 200), rng.random()
    if r < 0.6:
      piece, sep = (lambda: _sentence(rng)), ' '
    elif r < 0.8:
      start, step = _randint(rng, 0, 50), _randint(rng, 1, 9)
      counter = iter(range(start, 10**6, step))
      piece, sep = (lambda: str(next(counter))), ' '
    else:
      piece, sep = (lambda: _pick(rng, LEXICON)), ', '
    doc = ''
    while len(doc) < target:
      p = piece()
      if len(doc) + len(sep) + len(p) > 200:
        break
      doc = p if not doc else doc + sep + p
    docs.append(doc)
  return docs
