"""Optimizer and learning-rate schedule from a config (optax).

InstructGPT trains every stage with Adam (β1 0.9, β2 0.95) and a cosine schedule that decays to
10 % of the peak; SFT and the RM use no warm-up, PPO a constant rate after 10 warm-up iterations.
"""
from __future__ import annotations

from typing import Any, Mapping

import optax

DEFAULTS = dict(lr=1e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0, grad_clip=1.0,
                schedule='cosine', warmup_steps=0, final_lr_frac=0.1)
SCHEDULES = ('cosine', 'constant', 'linear')


def schedule(c: Mapping[str, Any], total_steps: int) -> optax.Schedule:
  """Warm-up (linear from 0) then `constant`, `cosine` or `linear` decay to lr * final_lr_frac."""
  if c['schedule'] not in SCHEDULES:
    raise ValueError(f"optim.schedule={c['schedule']!r}; valid: {SCHEDULES}")
  warm = int(c['warmup_steps'])
  decay_steps = max(total_steps - warm, 1)
  end = c['lr'] * c['final_lr_frac']
  if c['schedule'] == 'constant':
    main = optax.constant_schedule(c['lr'])
  elif c['schedule'] == 'cosine':
    main = optax.cosine_decay_schedule(c['lr'], decay_steps, alpha=c['final_lr_frac'])
  else:
    main = optax.linear_schedule(c['lr'], end, decay_steps)
  if not warm:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, c['lr'], warm), main], [warm])


def make(c: Mapping[str, Any], total_steps: int) -> optax.GradientTransformation:
  """AdamW with optional global-norm clipping. `c` is `config.optim` (keys of DEFAULTS)."""
  unknown = set(c) - set(DEFAULTS)
  if unknown:
    raise ValueError(f'unknown optim config key(s) {sorted(unknown)}; valid: {sorted(DEFAULTS)}')
  c = {**DEFAULTS, **dict(c)}
  parts = [optax.clip_by_global_norm(c['grad_clip'])] if c['grad_clip'] else []
  parts.append(optax.adamw(schedule(c, total_steps), b1=c['b1'], b2=c['b2'], eps=c['eps'],
                           weight_decay=c['weight_decay']))
  return optax.chain(*parts)
