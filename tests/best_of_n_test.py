"""Best-of-n: the exact expectation over n-subsets against brute-force enumeration, the KL bound
against the exact KL of a discrete best-of-n distribution, and `run` end to end on stand-in models."""
import itertools
import math

import numpy as np
import pytest

from rlhf_jax.data import synthetic
from rlhf_jax.evals import best_of_n, winrate


def _enumerate(proxy, values, n):
  """Mean over prompts of the average, over every n-subset of the draws, of `values` at the subset's
  first proxy-argmax (a slow reference)."""
  N, P = proxy.shape
  out = []
  for p in range(P):
    picks = [values[max(s, key=lambda i: (proxy[i, p], -i)), p] for s in itertools.combinations(range(N), n)]
    out.append(np.mean(picks))
  return float(np.mean(out))


@pytest.mark.parametrize('n', [1, 2, 3, 5, 7])
def test_pick_weights_equal_enumeration_with_ties(n):
  rng = np.random.default_rng(n)
  N, P = 7, 5
  proxy = rng.integers(0, 3, (N, P)).astype(float)   # many ties: repeated responses score alike
  values = rng.normal(size=(N, P))
  w = best_of_n.pick_weights(proxy, n)
  np.testing.assert_allclose(w.sum(0), 1.0, atol=1e-12)
  assert (w * values).sum(0).mean() == pytest.approx(_enumerate(proxy, values, n), abs=1e-12)


def test_pick_weights_endpoints_and_bad_n():
  proxy = np.array([[0.1, 5.0], [0.7, -1.0], [0.3, 2.0]])
  np.testing.assert_allclose(best_of_n.pick_weights(proxy, 1), np.full((3, 2), 1 / 3))
  np.testing.assert_allclose(best_of_n.pick_weights(proxy, 3), [[0, 1], [1, 0], [0, 0]])   # the argmax
  with pytest.raises(ValueError, match='1 <= n <= 3'):
    best_of_n.pick_weights(proxy, 4)


@pytest.mark.parametrize('n', [2, 4, 16])
def test_kl_bound_is_the_limit_of_the_exact_kl(n):
  # Best-of-n of a uniform draw from m distinct outcomes ranked 1..m picks rank k with probability
  # (k^n - (k-1)^n) / m^n; its KL to the uniform draw tends to log n - (n-1)/n as m grows.
  m = 200_000
  k = np.arange(1, m + 1, dtype=np.float64)
  q = (k / m) ** n - ((k - 1) / m) ** n
  exact = float(np.sum(q[q > 0] * np.log(q[q > 0] * m)))
  assert best_of_n.kl_bound(n) == pytest.approx(exact, abs=1e-3)
  assert best_of_n.kl_bound(1) == 0.0


def test_curve_figures():
  raw = [p['prompt'] for p in synthetic.prompts('test', 6, 'bon-test')]
  answers = [synthetic.answer(p) for p in raw]
  # Four draws per prompt: draw 0 is the right answer, draws 1-3 junk. A proxy that ranks draw 0 last
  # picks junk whenever it can; the gold oracle finds draw 0 whenever the subset holds it.
  draws = [answers] + [['zzz'] * len(raw)] * 3
  gold = np.stack([winrate.GoldJudge().scores(raw, d) for d in draws])
  assert (gold[0] == 1).all() and (gold[1:] == 0).all()
  proxy = np.array([[-1.0] * len(raw)] + [[1.0] * len(raw)] * 3)
  rows = best_of_n.curve(raw, draws, proxy, gold, [1, 2, 4], baseline=['zzz'] * len(raw))
  assert [r['n'] for r in rows] == [1, 2, 4]
  for r in rows:
    n = r['n']
    assert r['kl_bound'] == pytest.approx(math.log(n) - (n - 1) / n)
    # The proxy picks draw 0 only from the subset {0}: probability 1/4 at n = 1, never after.
    assert r['gold'] == pytest.approx(0.25 if n == 1 else 0.0)
    # The oracle's subset holds draw 0 with probability n/4.
    assert r['gold_oracle'] == pytest.approx(n / 4)
    # Against junk: draw 0 wins, junk ties (1/2).
    assert r['win_rate']['win_rate'] == pytest.approx(0.25 + 0.75 * 0.5 if n == 1 else 0.5)


def test_run_draws_scores_and_reshapes():
  raw = [p['prompt'] for p in synthetic.prompts('test', 3, 'bon-run')]
  by_formatted = {synthetic.format_prompt(p): p for p in raw}

  class LM:
    def generate(self, prompts, **kw):
      # All draws of a prompt arrive together (prompt-major); even positions answer right.
      return [synthetic.answer(by_formatted[p]) if i % 2 == 0 else 'x' for i, p in enumerate(prompts)]

  proxy = winrate.RewardModelJudge(lambda prompts, ys: np.array([float(y == 'x') for y in ys]))
  r = best_of_n.run(LM(), proxy, raw, samples=4, max_new_tokens=8, prompt_len=48)
  assert r['samples'] == 4 and [c['n'] for c in r['curve']] == [1, 2, 4]
  # Two right draws (0, 2) and two 'x' of each prompt; the proxy prefers 'x', so it picks a right one
  # only when the subset has no 'x': n = 1 with probability 1/2, n = 2 with 1/C(4, 2).
  assert [c['gold'] for c in r['curve']] == pytest.approx([0.5, 1 / 6, 0.0])
  assert [c['gold_oracle'] for c in r['curve']] == pytest.approx([0.5, 5 / 6, 1.0])


def test_gold_win_rate_equals_the_judge_path_and_n_includes_the_sample_count():
  # The default (gold) win rate reuses the draws' gold scores; it must equal asking the judge.
  raw = [p['prompt'] for p in synthetic.prompts('test', 5, 'bon-judge')]
  rng = np.random.default_rng(0)
  pool = [synthetic.answer(p) for p in raw] + ['zzz', 'a', '1', 'yes']
  draws = [[pool[rng.integers(len(pool))] for _ in raw] for _ in range(6)]
  base = [pool[rng.integers(len(pool))] for _ in raw]
  gold = np.stack([winrate.GoldJudge().scores(raw, d) for d in draws])
  proxy = rng.normal(size=gold.shape)
  fast = best_of_n.curve(raw, draws, proxy, gold, [1, 3, 6], baseline=base)
  slow = best_of_n.curve(raw, draws, proxy, gold, [1, 3, 6], baseline=base, judge=winrate.GoldJudge())
  assert [r['win_rate'] for r in fast] == [r['win_rate'] for r in slow]

  class LM:
    def generate(self, prompts, **kw):
      return ['x'] * len(prompts)

  r = best_of_n.run(LM(), winrate.RewardModelJudge(lambda p, y: np.zeros(len(y))), raw, samples=6,
                    max_new_tokens=4, prompt_len=48)
  assert [c['n'] for c in r['curve']] == [1, 2, 4, 6]
