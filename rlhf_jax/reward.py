"""The reward model's maths: the K-way ranking loss (InstructGPT eq. 1), pairwise metrics, and
the normalisation of scores. Pure functions of scores and masks; no model calls.

A batch element is one prompt with its K_max response slots: `ranks` [B, K] (0 = best; a lower
rank beats a higher one, equal ranks are a tie and form no pair) and `valid` [B, K] (1 on real
responses, 0 on the padding slots of prompts with fewer than K_max responses). The pairs of a
prompt are all (i, j) with both valid and ranks[i] < ranks[j]: C(K, 2) of them for a strict
ranking of K responses.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

NORM_MODES = ('none', 'demonstrations', 'reference')


def pair_mask(ranks, valid):
  """[B, K, K] bool: m[b, i, j] iff response i of prompt b is ranked above response j."""
  valid = valid.astype(bool)
  return (ranks[:, :, None] < ranks[:, None, :]) & valid[:, :, None] & valid[:, None, :]


def ranking_loss(scores, ranks, valid):
  """InstructGPT eq. 1: per prompt, the mean over its pairs of −log σ(r_w − r_l); then the mean
  over the prompts that have at least one pair, so each prompt weighs the same whatever its K.

  scores [B, K] (float32): the reward of each response. Padded responses and prompts (no valid
  pair) contribute nothing, to the loss or its gradient. Returns (loss, metrics): the fraction of
  pairs ordered correctly, and the numbers of pairs and prompts.
  """
  m = pair_mask(ranks, valid)
  scores = jnp.where(valid.astype(bool), scores, 0.0)        # no NaN/inf from padding slots
  diff = scores[:, :, None] - scores[:, None, :]            # [B, K, K]: r_i − r_j
  nll = jnp.where(m, -jax.nn.log_sigmoid(diff), 0.0)
  pairs = m.sum((1, 2))                                     # [B]
  per_prompt = nll.sum((1, 2)) / jnp.maximum(pairs, 1)
  has = pairs > 0
  n_prompts = has.sum()
  loss = jnp.where(has, per_prompt, 0.0).sum() / jnp.maximum(n_prompts, 1)
  correct = jnp.where(m, (diff > 0).astype(jnp.float32), 0.0).sum()
  n_pairs = m.sum()
  return loss, {'accuracy': correct / jnp.maximum(n_pairs, 1), 'pairs': n_pairs, 'prompts': n_prompts}


# ----------------------------------------------------------------------------
# Host-side metrics over a whole evaluation set (numpy).


def pairs_of(ranks: np.ndarray) -> list[tuple[int, int]]:
  """(winner, loser) index pairs of one prompt's ranks (ties form no pair)."""
  k = len(ranks)
  return [(i, j) for i in range(k) for j in range(k) if ranks[i] < ranks[j]]


def pairwise_metrics(scores: list[np.ndarray], ranks: list[np.ndarray]) -> dict[str, float]:
  """Accuracy over all pairs (a tie of scores counts half) and eq. 1's loss (mean over prompts of
  the per-prompt mean pair loss) of one evaluation set; one array per prompt."""
  hits, n, per_prompt = 0.0, 0, []
  for s, r in zip(scores, ranks):
    ps = pairs_of(r)
    if not ps:
      continue
    d = np.array([s[i] - s[j] for i, j in ps], np.float64)
    hits += float((d > 0).sum() + 0.5 * (d == 0).sum())
    n += len(ps)
    per_prompt.append(float(np.mean(np.logaddexp(0.0, -d))))
  return {'accuracy': hits / max(n, 1), 'log_loss': float(np.mean(per_prompt)) if per_prompt else float('nan'),
          'pairs': float(n)}


# ----------------------------------------------------------------------------
# Normalisation.


@dataclasses.dataclass(frozen=True)
class Normalization:
  """score = gain · raw + bias. Saved with the RM checkpoint (its JSON) and applied by every
  consumer of the RM's scores (`apply`).

  mode 'demonstrations' (InstructGPT): gain 1, bias so that demonstrations score mean 0.
  mode 'reference' (Ziegler et al. 2019): gain and bias so that samples of a reference policy
  score mean 0 and std 1, so a KL coefficient means the same whatever the RM's scale.
  """
  mode: str = 'none'
  gain: float = 1.0
  bias: float = 0.0
  n: int = 0                     # how many scores it was fitted on

  def apply(self, raw):
    return raw * self.gain + self.bias

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any] | None) -> 'Normalization':
    return cls(**d) if d else cls()


def fit_normalization(raw: np.ndarray, mode: str) -> Normalization:
  """The constants that map `raw` scores to mean 0 (and std 1 in mode 'reference')."""
  raw = np.asarray(raw, np.float64)
  if mode == 'none':
    return Normalization()
  if mode not in NORM_MODES:
    raise ValueError(f'reward normalisation mode {mode!r}; valid: {NORM_MODES}')
  if raw.size == 0:
    raise ValueError(f'cannot fit the {mode!r} normalisation on zero scores')
  mean = float(raw.mean())
  if mode == 'demonstrations':
    return Normalization(mode, 1.0, -mean, int(raw.size))
  std = float(raw.std())
  if not math.isfinite(std) or std <= 0:
    raise ValueError(f'reference-policy scores have std {std}: cannot fit a gain')
  return Normalization(mode, 1.0 / std, -mean / std, int(raw.size))
