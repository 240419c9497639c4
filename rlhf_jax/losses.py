"""Losses. Each is a pure function of model outputs and a batch; maths only, no model calls."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def token_logprobs(logits, targets):
  """log softmax(logits)[target] per position. logits [B, T, V] (f32), targets [B, T] -> [B, T]."""
  logz = jax.nn.logsumexp(logits, axis=-1)                                    # [B, T]
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]   # [B, T]
  return picked - logz


def masked_mean(x, mask, axis=None):
  mask = mask.astype(x.dtype)
  return (x * mask).sum(axis) / jnp.maximum(mask.sum(axis), 1.0)


def next_token_targets(tokens, loss_mask):
  """Targets and mask aligned with the logits: position t predicts token t+1, the last position
  nothing. Shifting the (small) targets instead of slicing the [B, T, V] logits spares a copy
  of the logits and a pad of their gradient."""
  targets = jnp.roll(tokens, -1, axis=1)                                      # [B, T]
  mask = jnp.roll(loss_mask, -1, axis=1).at[:, -1].set(0)                     # [B, T]
  return targets, mask


def sft_loss(logits, tokens, loss_mask):
  """Next-token cross-entropy, a mean over the tokens the mask selects (the response tokens).

  logits [B, T, V]: position t predicts tokens[:, t + 1]; loss_mask [B, T] marks the tokens whose
  prediction counts (1 on response tokens, 0 on prompt and padding). Returns (loss, n_tokens).
  """
  targets, mask = next_token_targets(tokens, loss_mask)
  logp = token_logprobs(logits, targets)                                      # [B, T]
  return -masked_mean(logp, mask), mask.sum()
