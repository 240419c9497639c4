"""Best-of-n against a reward model: is the RM worth optimising? (Gao et al. 2022, Stiennon et al. 2020)

Draw N responses per prompt from a policy, let a proxy (the RM) pick the best of n of them, and
measure the pick with the gold judge. Best-of-n is the simplest optimiser of the proxy: its KL to the
policy is known in closed form (at most log n - (n - 1)/n nats), and it needs no training, so its
gold score against n shows how much a policy can gain by following this RM at that KL. If the RM's
pick is no better than a random draw, PPO against the same RM cannot do much better either: it
optimises the same proxy, only by gradient steps. The gold judge's own pick (`gold_oracle`) bounds
what any selector could reach from the same draws.

Each figure is the exact expectation over all n-subsets of the N draws (not the first n draws
alone): with the draws of one prompt ranked by the proxy, the draw with i draws ranked below it is
the best of a uniformly random n-subset with probability C(i, n-1) / C(N, n). Ties in the proxy
(repeated responses score alike) go to the earlier draw, as `argmax` does. A win rate's interval
is over prompts, for these draws: each prompt's outcome is already its expectation over subsets.

    from rlhf_jax.evals import best_of_n
    result = best_of_n.run(lm, rm_judge, raw_prompts, samples=16, baseline=sft_responses)
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from rlhf_jax.evals import winrate


def kl_bound(n: int) -> float:
  """KL(best-of-n || policy) in nats for a policy whose draws never repeat; with repeats it is less."""
  return math.log(n) - (n - 1) / n


def pick_weights(proxy: np.ndarray, n: int) -> np.ndarray:
  """[N, P] probabilities that each draw is the proxy's pick from a uniformly random n-subset of the N
  draws of its prompt (column). Each column sums to 1."""
  proxy = np.asarray(proxy, np.float64)
  N = proxy.shape[0]
  if not 1 <= n <= N:
    raise ValueError(f'best-of-{n} needs 1 <= n <= {N} draws')
  # Rank within each prompt: ascending proxy; among equal scores the earlier draw ranks higher (it wins
  # argmax), so sort by (score, -index).
  index = np.broadcast_to(np.arange(N)[:, None], proxy.shape)
  order = np.lexsort((-index, proxy), axis=0)                      # [N, P]: draws, lowest rank first
  below = np.empty_like(order)
  np.put_along_axis(below, order, index, axis=0)                   # below[i, p]: draws ranked under i
  total = math.comb(N, n)
  table = np.array([math.comb(i, n - 1) / total for i in range(N)])
  return table[below]


def curve(raw_prompts: Sequence[str], draws: Sequence[Sequence[str]], proxy: np.ndarray, gold: np.ndarray,
          ns: Sequence[int], baseline: Sequence[str] | None = None, judge=None) -> list[dict]:
  """Per n: the KL bound, the mean proxy and gold score of the proxy's pick, the gold judge's own
  best-of-n (`gold_oracle`), and (with `baseline` responses) the pick's expected win rate against
  them under `judge` (default: the gold judge), with its interval. draws[i][p] is draw i for prompt p;
  proxy and gold are the [N, P] scores of the draws."""
  proxy, gold = np.asarray(proxy, np.float64), np.asarray(gold, np.float64)
  N, P = proxy.shape
  if gold.shape != (N, P) or len(draws) != N or any(len(d) != P for d in draws) or len(raw_prompts) != P:
    raise ValueError(f'{len(raw_prompts)} prompts, {len(draws)} draws, proxy {proxy.shape}, gold {gold.shape}')
  outcomes = None
  if baseline is not None and judge is None:   # the gold judge: the draws' gold scores are at hand
    outcomes = winrate.outcomes_from_scores(gold, winrate.GoldJudge().scores(raw_prompts, baseline)[None])
  elif baseline is not None:
    outcomes = np.stack([judge.prefer(raw_prompts, d, baseline) for d in draws])   # [N, P]
  out = []
  for n in ns:
    w = pick_weights(proxy, n)
    row = {'n': int(n), 'kl_bound': kl_bound(n), 'proxy': float((w * proxy).sum(0).mean()),
           'gold': float((w * gold).sum(0).mean()),
           'gold_oracle': float((pick_weights(gold, n) * gold).sum(0).mean())}
    if outcomes is not None:
      row['win_rate'] = winrate.win_rate(np.clip((w * outcomes).sum(0), 0.0, 1.0))
    out.append(row)
  return out


def run(lm, proxy_judge, raw_prompts: Sequence[str], *, samples: int = 16, baseline: Sequence[str] | None = None,
        max_new_tokens: int, prompt_len: int, temperature: float = 1.0, seed: int = 0,
        ns: Sequence[int] | None = None) -> dict:
  """Draw `samples` responses per prompt from `lm` (an `evals.lm.LM`), score them with `proxy_judge`
  (a `winrate.RewardModelJudge`) and with the gold labeler, and return
  {'samples', 'temperature', 'proxy', 'curve': `curve(...)` at n = 1, 2, 4, ... and `samples`}."""
  from rlhf_jax.data import synthetic
  ns = list(ns or sorted({2 ** i for i in range(int(math.log2(samples)) + 1)} | {samples}))
  prompts = [synthetic.format_prompt(p) for p in raw_prompts]
  # One generate call over all draws (each prompt repeated), one batch of compiled work.
  flat = lm.generate([p for p in prompts for _ in range(samples)], max_new_tokens=max_new_tokens,
                     prompt_len=prompt_len, temperature=temperature, seed=seed, desc=f'best-of-{samples} draws')
  draws = [[flat[p * samples + i] for p in range(len(prompts))] for i in range(samples)]
  gold_judge = winrate.GoldJudge()
  proxy = np.stack([proxy_judge.score(prompts, d) for d in draws])
  gold = np.stack([gold_judge.scores(raw_prompts, d) for d in draws])
  return {'samples': samples, 'temperature': temperature, 'proxy': proxy_judge.name,
          'curve': curve(raw_prompts, draws, proxy, gold, ns, baseline)}
